"""Sophia's Gauss-Newton-Bartlett (GNB) estimator of the Gauss-Newton diagonal.

Liu et al., "Sophia: A Scalable Stochastic Second-order Optimizer for Language Model
Pre-training" (2023), Algorithm 2: draw labels y_b ~ softmax(f(theta, x_b)) from the model's own
predictive distribution, take the gradient g of the mean cross-entropy of the logits against the
sampled labels over the B label positions of the batch, and return B * g * g. By Bartlett's first
identity (E[per-position gradient] = 0 under the model's own distribution) its expectation is the
diagonal of the batch-mean Gauss-Newton matrix J^T (diag(p) - p p^T) J / B.

**Where the logits come from.** GNB needs the logits, not just the loss:

* :meth:`GaussNewtonBartlett.estimate` takes a contract closure whose ``closure(backward=False)``
  returns ``(loss, logits)``, a mapping with keys ``"loss"`` and ``"logits"``, or an object with
  ``.loss`` and ``.logits`` attributes (a Hugging Face ``ModelOutput`` computed with ``labels``);
  one forward pass serves both the gradient and the estimate (two backward passes);
* :meth:`GaussNewtonBartlett.from_logits` takes logits that still carry their graph, for loops
  that run the model themselves (``Sophia.update_hessian(logits)``).

Logits have shape ``(..., V)`` (classes last); every position counts as one label (B = number of
positions). Mask padding out of the logits before passing them. The sampled labels are drawn from
a generator keyed by ``(seed, step)`` (:func:`anyorder.core.rng.generator_for`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from anyorder.core.closure import check_closure_output
from anyorder.core.rng import generator_for
from anyorder.curvature.hutchinson import CurvatureEstimate
from anyorder.curvature.hvp import (
    check_scalar_loss,
    grads_or_zeros,
    loss_with_graph,
    require_contract_closure,
)

__all__ = ["GaussNewtonBartlett", "split_loss_logits"]


def split_loss_logits(output: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss, logits)`` from a closure's output: a pair, a mapping or a ``ModelOutput`` (checked
    by :func:`anyorder.core.closure.check_closure_output`, the one check of closure outputs)."""
    loss, logits = check_closure_output(output, with_logits=True)
    return loss, logits  # type: ignore[return-value]


class GaussNewtonBartlett:
    """Sophia's GNB estimator of diag(Gauss-Newton) for cross-entropy (Liu et al., 2023, Alg. 2).

    Args:
        seed: label-sampling seed; labels of ``step`` come from a generator keyed by
            (seed, step).
        owner: name used in errors.
    """

    def __init__(self, seed: int = 0, *, owner: str = "GaussNewtonBartlett") -> None:
        if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
            raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
        self.seed = seed
        self.owner = owner
        self.calls = 0

    def sample_labels(self, logits: torch.Tensor, step: int) -> torch.Tensor:
        """Labels drawn from softmax(logits) over the last dimension, keyed by (seed, step)."""
        if logits.dim() < 2:
            raise ValueError(
                f"logits must have shape (..., num_classes), got {tuple(logits.shape)}"
            )
        flat = logits.detach().reshape(-1, logits.shape[-1]).float()
        probs = torch.softmax(flat, dim=-1)
        gen = generator_for(self.seed, step, device=logits.device)
        return torch.multinomial(probs, 1, generator=gen).view(logits.shape[:-1])

    def from_logits(
        self,
        logits: torch.Tensor,
        params: Sequence[torch.Tensor],
        step: int | None = None,
        *,
        retain_graph: bool = False,
    ) -> list[torch.Tensor]:
        """B * g * g for the gradient g of the mean cross-entropy against sampled labels."""
        if step is None:
            step = self.calls
        self.calls += 1
        if not logits.requires_grad:
            raise ValueError(
                "logits must carry their autograd graph (compute them outside torch.no_grad())"
            )
        labels = self.sample_labels(logits, step)
        n_labels = labels.numel()
        params = list(params)
        with torch.enable_grad():
            flat = logits.reshape(-1, logits.shape[-1])
            sampled = F.cross_entropy(flat, labels.reshape(-1))
            grads = torch.autograd.grad(
                sampled, params, allow_unused=True, retain_graph=retain_graph
            )
        with torch.no_grad():
            grads = grads_or_zeros(grads, params)
            diagonal = list(torch._foreach_mul(grads, grads))
            torch._foreach_mul_(diagonal, float(n_labels))
        return diagonal

    def estimate(
        self,
        closure: Callable[..., Any],
        params: Sequence[torch.Tensor],
        step: int | None = None,
        indices: Sequence[int] | None = None,
    ) -> CurvatureEstimate:
        """Gradient of the closure's loss and the GNB diagonal from its logits (one forward)."""
        require_contract_closure(closure, self.owner)
        params = list(params)
        loss, logits = split_loss_logits(loss_with_graph(closure))
        loss = check_scalar_loss(loss)
        grads = torch.autograd.grad(loss, params, allow_unused=True, retain_graph=True)
        grads = grads_or_zeros(grads, params)
        loss = loss.detach()
        if not torch.isfinite(loss):
            return CurvatureEstimate(loss, grads, [], "gnb")
        diagonal = self.from_logits(logits, params, step)
        return CurvatureEstimate(loss, grads, diagonal, "gnb")
