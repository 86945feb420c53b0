"""Coordinate-wise gradient estimates (CGE) with sparsity, after DeepZero ("DeepZero: Scaling up
Zeroth-Order Optimization for Deep Model Training").

For each selected coordinate j of a parameter the estimate is the finite difference along the
unit vector e_j:

* forward (DeepZero's CGE): g_j = (f(w + mu e_j) - f(w)) / mu   (1 + k evaluations for k coordinates)
* central:                  g_j = (f(w + mu e_j) - f(w - mu e_j)) / (2 mu)   (2 k evaluations)

Both are exact for linear functions (up to rounding). Coordinates outside the ``mask`` get 0,
so the cost scales with the mask's density: DeepZero makes CGE affordable by estimating only the
coordinates that survive zeroth-order pruning; :func:`zo_pruning_mask` derives such a mask.
Each coordinate is restored by writing its saved value back, so the weights are unchanged
bit for bit afterwards.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from anyorder.core.closure import call_closure, check_closure_output

__all__ = ["CoordinateWise", "zo_pruning_mask"]


class CoordinateWise:
    """DeepZero's coordinate-wise estimate, optionally restricted to a sparse mask.

    Args:
        mu: finite-difference step (> 0).
        central: central instead of forward differences.
        mask: one boolean tensor per parameter (``True``: estimate this coordinate), or ``None``
            for every coordinate.
    """

    def __init__(
        self, mu: float = 1e-3, central: bool = False, mask: Sequence[torch.Tensor] | None = None
    ) -> None:
        if not isinstance(mu, (int, float)) or not mu > 0 or not math.isfinite(mu):
            raise ValueError(f"mu must be a finite number > 0, got {mu!r}")
        self.mu = float(mu)
        self.central = bool(central)
        self.mask = list(mask) if mask is not None else None

    def n_coordinates(self, params: Sequence[torch.Tensor]) -> int:
        """How many coordinates one estimate differentiates."""
        if self.mask is None:
            return sum(p.numel() for p in params)
        return sum(int(m.sum()) for m in self.mask)

    def evaluations(self, params: Sequence[torch.Tensor]) -> int:
        """Closure evaluations one estimate costs."""
        k = self.n_coordinates(params)
        return 2 * k if self.central else 1 + k

    @torch.no_grad()
    def estimate_(
        self, params: Sequence[torch.Tensor], closure: Callable[..., torch.Tensor]
    ) -> float:
        """Write the estimate into every ``p.grad``; returns f(w) (forward) or the mean loss.

        ``closure`` follows the closure contract and is called with ``backward=False``.
        """
        params = list(params)
        if self.mask is not None:
            if len(self.mask) != len(params):
                raise ValueError(f"mask has {len(self.mask)} tensors for {len(params)} parameters")
            for m, p in zip(self.mask, params):
                if m.shape != p.shape:
                    raise ValueError(
                        f"mask shape {tuple(m.shape)} != parameter shape {tuple(p.shape)}"
                    )

        def f() -> float:
            loss, _ = check_closure_output(call_closure(closure, backward=False))
            return float(loss.detach().double())

        base = None if self.central else f()
        values = [] if base is None else [base]
        for k, p in enumerate(params):
            grad = torch.zeros_like(p)
            flat, gflat = p.view(-1), grad.view(-1)
            if self.mask is None:
                coords = range(p.numel())
            else:
                coords = torch.nonzero(self.mask[k].reshape(-1)).reshape(-1).tolist()
            for j in coords:
                saved = flat[j].clone()
                try:  # any exception in the closure: the coordinate is put back exactly
                    flat[j] = saved + self.mu
                    plus = f()
                    if self.central:
                        flat[j] = saved - self.mu
                        minus = f()
                        gflat[j] = (plus - minus) / (2 * self.mu)
                        values += [plus, minus]
                    else:
                        gflat[j] = (plus - base) / self.mu
                        values.append(plus)
                finally:
                    flat[j] = saved
            p.grad = grad
        return sum(values) / len(values) if values else float("nan")


@torch.no_grad()
def zo_pruning_mask(
    params: Sequence[torch.Tensor],
    closure: Callable[..., torch.Tensor],
    density: float,
    *,
    estimator: object | None = None,
    n_estimates: int = 8,
    seed: int = 0,
) -> list[torch.Tensor]:
    """A per-tensor mask keeping the ``density`` fraction of coordinates with the largest
    zeroth-order connection sensitivity |w_j * ĝ_j|.

    ĝ is the mean of ``n_estimates`` estimates from ``estimator`` (default: SPSA with 8 queries
    each, seeded by ``seed``). This is the SNIP-style score computed from function values only;
    DeepZero's ZO-GraSP score (which needs a Hessian-gradient product) is not implemented. Each
    tensor keeps ``ceil(density * numel)`` coordinates (DeepZero's layer-wise allocation).
    """
    from anyorder.estimators.spsa import SPSA

    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density!r}")
    params = list(params)
    est = estimator if estimator is not None else SPSA(mu=1e-3, n_queries=8, seed=seed)
    saved_grads = [p.grad for p in params]
    total = [torch.zeros_like(p) for p in params]
    for step in range(n_estimates):
        if isinstance(est, CoordinateWise):
            est.estimate_(params, closure)
        else:
            est.estimate_(params, closure, step)
        for t, p in zip(total, params):
            t.add_(p.grad)
    masks = []
    for p, t, g in zip(params, total, saved_grads):
        score = (p.detach() * t).abs().reshape(-1)
        keep = max(1, math.ceil(density * score.numel()))
        mask = torch.zeros(score.numel(), dtype=torch.bool, device=p.device)
        mask[torch.topk(score, keep).indices] = True
        masks.append(mask.reshape(p.shape))
        p.grad = g
    return masks
