"""Hutchinson's estimator of the Hessian diagonal, diag(H) ~ mean_q z_q * (H z_q).

Bekas, Kokiopoulou & Saad, "An estimator for the diagonal of a matrix" (2007), after Hutchinson
(1990); the estimator of AdaHessian (Yao et al., 2021) and Sophia-H (Liu et al., 2023). With
E[z z^T] = I the estimate is unbiased; Rademacher probes (the default) give the smallest variance,
var[z_i (H z)_i] = sum_{j != i} H_ij^2 (Sophia's paper draws Gaussian probes: ``distribution=
"gaussian"``; AdaHessian's draws Rademacher).

Probes come from the library's one direction sampler, :func:`anyorder.core.rng.direction`: probe q
of a step is one flat direction keyed by ``(seed, step, q)`` over the parameters concatenated in
order. The same key replays the same probe, so an optimizer
resumed from its state dict (which holds the seed and the step) draws exactly the probes it would
have drawn, and a test can rebuild them with :meth:`HutchinsonDiagonal.probes`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from anyorder.core.rng import CHUNK, DEVICE_CHUNK, direction_chunks
from anyorder.curvature.hvp import HVPEngine, require_contract_closure

__all__ = ["CurvatureEstimate", "HutchinsonDiagonal"]


@dataclass(frozen=True)
class CurvatureEstimate:
    """One curvature estimate: the loss and gradient it was taken at (detached) and the
    estimated Hessian diagonal, one tensor per parameter (empty when the loss was not finite)."""

    loss: torch.Tensor
    grads: list[torch.Tensor]
    diagonal: list[torch.Tensor]
    method: str


class HutchinsonDiagonal:
    """Hutchinson's diagonal estimator (Bekas et al., 2007; used by AdaHessian and Sophia-H).

    Args:
        n_samples: probes per estimate (the variance falls as 1 / n_samples).
        seed: probe stream seed; probes are keyed by (seed, step, sample).
        distribution: ``"rademacher"`` (default) or ``"gaussian"``.
        hvp: ``"auto"`` (double backward, else finite differences with one warning),
            ``"autograd"`` or ``"finite_difference"``; see :mod:`anyorder.curvature.hvp`.
        owner: name used in warnings and errors.

    :meth:`estimate` calls ``closure(backward=False)`` and differentiates the loss itself.
    """

    def __init__(
        self,
        n_samples: int = 1,
        seed: int = 0,
        distribution: str = "rademacher",
        hvp: str = "auto",
        *,
        owner: str = "HutchinsonDiagonal",
    ) -> None:
        if not isinstance(n_samples, int) or isinstance(n_samples, bool) or n_samples < 1:
            raise ValueError(f"n_samples must be an integer >= 1, got {n_samples!r}")
        if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
            raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
        if distribution not in ("rademacher", "gaussian"):
            raise ValueError(
                f"unknown probe distribution {distribution!r}; choose rademacher or gaussian"
            )
        self.n_samples = n_samples
        self.seed = seed
        self.distribution = distribution
        self.engine = HVPEngine(hvp, owner=owner)
        self.owner = owner
        self.calls = 0

    def probes(
        self, params: Sequence[torch.Tensor], step: int, indices: Sequence[int] | None = None
    ) -> list[list[torch.Tensor]]:
        """The probe vectors of ``step``: ``n_samples`` lists, one tensor per parameter.

        Sample q is one flat direction keyed by (seed, step, q) over the parameters
        concatenated in order (one draw per 65,536 elements instead of one keyed draw per
        tensor: the per-tensor overhead dominated small models), split into the parameters'
        shapes. ``indices`` is accepted for interface compatibility and ignored.
        """
        if not params:
            return [[] for _ in range(self.n_samples)]
        first = params[0]
        sizes = [p.numel() for p in params]
        numel = sum(sizes)
        uniform = all(p.dtype == first.dtype and p.device == first.device for p in params)
        out = []
        for q in range(self.n_samples):
            chunks = direction_chunks(
                numel,
                self.seed,
                step,
                q,
                0,
                distribution=self.distribution,
                dtype=first.dtype,
                device=first.device,
                draw_on_device=first.device.type != "cpu",
            )
            if numel <= (CHUNK if first.device.type == "cpu" else DEVICE_CHUNK):
                flat = next(chunks)[2]  # one chunk: the direction itself, no copy
            else:
                flat = torch.empty(numel, dtype=first.dtype, device=first.device)
                for start, end, z in chunks:
                    flat[start:end] = z
            pieces = torch.split_with_sizes(flat, sizes)
            if uniform:
                out.append([piece.view_as(p) for piece, p in zip(pieces, params)])
            else:
                out.append(
                    [
                        piece.view(p.shape).to(device=p.device, dtype=p.dtype)
                        for piece, p in zip(pieces, params)
                    ]
                )
        return out

    def estimate(
        self,
        closure: Callable[..., Any],
        params: Sequence[torch.Tensor],
        step: int | None = None,
        indices: Sequence[int] | None = None,
    ) -> CurvatureEstimate:
        """Estimate diag(H) of the closure's loss at the current parameters.

        ``step`` keys the probes (default: a counter of this object's calls); ``indices`` are
        the parameters' keys (default: their positions).
        """
        require_contract_closure(closure, self.owner)
        if step is None:
            step = self.calls
        self.calls += 1
        params = list(params)
        vectors = self.probes(params, step, indices)
        loss, grads, products = self.engine.gradient_and_hvps(closure, params, vectors)
        if not products:
            return CurvatureEstimate(loss, grads, [], self.engine.resolved or "autograd")
        with torch.no_grad():
            diagonal = list(torch._foreach_mul(vectors[0], products[0]))
            for v, hv in zip(vectors[1:], products[1:]):
                torch._foreach_addcmul_(diagonal, v, hv)
            if self.n_samples > 1:
                torch._foreach_div_(diagonal, float(self.n_samples))
        return CurvatureEstimate(loss, grads, diagonal, self.engine.resolved or "autograd")
