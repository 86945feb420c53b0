"""The fully first-order penalty method for bilevel optimization.

Kwon, Kwon, Wright & Nowak, "On Penalty Methods for Nonconvex Bilevel Optimization and
First-Order Stochastic Approximation" (ICLR 2024), in the single-loop stochastic form of their
F2SA algorithm (Kwon et al., "A Fully First-Order Method for Stochastic Bilevel Optimization",
ICML 2023). No Hessian-vector products: only gradients of ``F`` and ``G``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from anyorder.bilevel._base import BilevelOptimizer, check_int, check_positive

__all__ = ["Penalty"]


class Penalty(BilevelOptimizer):
    """F2SA-style penalty method: two inner sequences and a growing penalty ``lam``.

    The penalty function ``(1/sigma) [min_y (sigma F(x, y) + G(x, y)) - min_z G(x, z)]`` with
    ``sigma = 1 / lam`` is an ``O(sigma)`` approximation of the hyper-objective (the paper's
    main result). Its gradient in ``x`` is ``grad_x F(x, y) + lam (grad_x G(x, y) - grad_x G(x,
    z))`` at the two inner minimisers. One step (outer iteration ``k``, ``lam_k`` current):

        for t in 1..T (``inner_steps``):
            z <- z - gamma grad_y G(x, z)                         (the lower-level problem)
            y <- y - alpha (grad_y F(x, y) / lam_k + grad_y G(x, y))  (the penalised problem)
        x <- x - lr (grad_x F(x, y) + lam_k (grad_x G(x, y) - grad_x G(x, z)))
        lam_{k+1} = min(lam_k + delta, lam_max)

    The ``y`` step is written for ``sigma F + G`` (``sigma = 1/lam``, as in the penalty paper), so
    ``alpha`` is a step for ``G``'s curvature whatever ``lam``; F2SA writes the same step as
    ``alpha' (grad F + lam grad G)`` with ``alpha' = alpha / lam``. Both inner sequences are
    updated simultaneously from the values at the start of each inner step. ``z`` starts as a
    copy of ``y`` on the first step (the paper leaves its start free). Each closure call is one
    oracle access (fresh samples per call are the paper's stochastic setting).

    Args:
        params: outer tensors ``x`` or param groups (``lr`` per group, the step ``xi_k``).
        inner: the inner tensors ``y`` (updated in place).
        lr: outer step size ``xi``.
        inner_lr: ``alpha``, the step on ``sigma F + G`` for ``y``.
        z_lr: ``gamma``, the step on ``G`` for ``z`` (default: ``inner_lr``).
        inner_steps: ``T`` inner steps per outer step.
        lam: initial penalty ``lam_0 > 0``; ``lam_delta``: its growth ``delta >= 0`` per step;
            ``lam_max``: its cap.
        init_steps, init_lr: the inner warm-up of the first step (``init_steps`` gradient steps
            of size ``init_lr``, default ``inner_lr``, on ``G(x_0, .)`` before the first
            update; default none; see :mod:`anyorder.bilevel._base`); ``z`` starts as a copy
            of the warmed-up ``y``.

    State (``global_state["bilevel"]``): ``z`` (list of tensors like ``inner``), ``lam``.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        inner: Iterable[torch.Tensor],
        *,
        lr: float,
        inner_lr: float,
        z_lr: float | None = None,
        inner_steps: int = 1,
        lam: float = 1.0,
        lam_delta: float = 0.0,
        lam_max: float = float("inf"),
        init_steps: int = 0,
        init_lr: float | None = None,
        on_nonfinite: str = "raise",
    ) -> None:
        check_positive("lr", lr, allow_zero=True)
        super().__init__(params, inner, {"lr": lr}, on_nonfinite=on_nonfinite)
        self.inner_lr = check_positive("inner_lr", inner_lr)
        self.z_lr = self.inner_lr if z_lr is None else check_positive("z_lr", z_lr)
        self.inner_steps = check_int("inner_steps", inner_steps, minimum=1)
        self.set_inner_warmup(init_steps, init_lr, self.inner_lr)
        check_positive("lam", lam)
        self.lam_delta = check_positive("lam_delta", lam_delta, allow_zero=True)
        if not lam_max >= lam:
            raise ValueError(f"lam_max must be >= lam, got lam_max={lam_max!r}, lam={lam!r}")
        self.lam_max = float(lam_max)
        self.bstate["lam"] = float(lam)

    def _step(self, inner_loss: Callable[..., Any], outer_loss: Callable[..., Any]) -> torch.Tensor:
        st = self.bstate
        x, y = self.outer, self.inner
        if "z" not in st:
            st["z"] = [t.detach().clone() for t in y]
        z = st["z"]
        lam = st["lam"]
        for _ in range(self.inner_steps):
            with self.at(y, z):
                _, gz = self.grad(inner_loss, y, "inner_loss")
            _, fy = self.grad(outer_loss, y, "outer_loss")
            _, gy = self.grad(inner_loss, y, "inner_loss")
            with torch.no_grad():
                torch._foreach_add_(z, gz, alpha=-self.z_lr)
                torch._foreach_add_(gy, fy, alpha=1.0 / lam)
                torch._foreach_add_(y, gy, alpha=-self.inner_lr)
            self.check_finite(z + y)
        with self.at(y, z):
            _, gxz = self.grad(inner_loss, x, "inner_loss")
        f, fx = self.grad(outer_loss, x, "outer_loss")
        _, gxy = self.grad(inner_loss, x, "inner_loss")
        with torch.no_grad():
            diff = torch._foreach_sub(gxy, gxz)
            torch._foreach_add_(fx, diff, alpha=lam)
        self.outer_sgd_(fx)
        st["lam"] = min(lam + self.lam_delta, self.lam_max)
        return f
