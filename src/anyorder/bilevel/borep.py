"""BO-REP: Hao, Gong & Liu, "Bilevel Optimization under Unbounded Smoothness: A New Algorithm
and Convergence Analysis" (ICLR 2024)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch

from anyorder.bilevel._base import BilevelOptimizer, check_int, check_positive

__all__ = ["BOREP"]


class BOREP(BilevelOptimizer):
    """BO-REP: normalized momentum on ``x``, periodic inner refreshes, one step on ``z``.

    One step (iteration ``k = 0, 1, ...``; ``m_{-1} = 0``, ``z_{-1} = 0``):

        if k == 0:          y <- init_steps SGD steps  y <- y - init_lr grad_y G(x_0, y)
                            (the paper's initialization refinement: the inner warm-up
                            every algorithm of :mod:`anyorder.bilevel` offers)
        elif k % I == 0:    y <- N SGD steps           y <- y - gamma grad_y G(x_k, y)
                            (the periodic update; y is left alone in between)
        z_k = Proj_R(z_{k-1} - nu (d^2_yy G(x_k, y_k) z_{k-1} - grad_y F(x_k, y_k)))
        m_k = beta m_{k-1} + (1 - beta) (grad_x F(x_k, y_k) - d^2_xy G(x_k, y_k) z_k)
        x_{k+1} = x_k - eta m_k / ||m_k||

    ``||m||`` is the norm over all outer tensors together; each param group moves by its own
    ``lr`` (``eta``) along the common direction ``m / ||m||`` (a zero ``m`` leaves ``x`` as it
    is). ``Proj_R`` projects onto the ball ``||z|| <= R`` (the paper's bounded set for ``z``;
    ``z_radius=None`` leaves ``z`` unprojected). The products are taken at ``(x_k, y_k)`` from one
    double-backward graph; ``d^2_xy G z_k`` uses the new ``z_k``.

    The momentum uses the NEW ``z_k`` (``z`` is updated first, then ``d^2_xy G z_k``), as the
    authors' reference code does (``data_cleaning/bo_rep.py`` of
    github.com/MingruiLiu-ML-Lab/Bilevel-Optimization-under-Unbounded-Smoothness: ``z`` is
    updated in ``hypergradient`` before the mixed product); the paper's PDF was not available
    offline to check its index. The reference takes ``d^2_yy G z`` at ``y`` before that
    iteration's periodic inner update and ``grad_y F`` after it; here both are at the updated
    ``(x_k, y_k)``, as the update above is written; it also starts ``z`` at random values
    (here 0).

    Departure from the paper: the paper's initialization refinement runs epoch-SGD with
    decreasing steps; here it is ``init_steps`` plain SGD steps with ``init_lr`` (default
    ``inner_lr``: the same rule as the periodic updates).

    Args:
        lr: ``eta`` (per group); ``beta``: momentum ``beta`` in ``[0, 1)`` (per group);
        inner_lr: ``gamma``; inner_steps: ``N``; period: ``I``; init_steps: steps of the
        refinement at ``k = 0`` (default ``N``); init_lr: its step (default ``gamma``);
        z_lr: ``nu``; z_radius: ``R`` or ``None``.

    State: ``z`` (like ``inner``), ``m`` (like the outer tensors).
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        inner: Iterable[torch.Tensor],
        *,
        lr: float,
        inner_lr: float,
        z_lr: float,
        beta: float = 0.9,
        inner_steps: int = 1,
        period: int = 1,
        init_steps: int | None = None,
        init_lr: float | None = None,
        z_radius: float | None = None,
        on_nonfinite: str = "raise",
    ) -> None:
        check_positive("lr", lr, allow_zero=True)
        check_positive("beta", beta, allow_zero=True)
        if not beta < 1:
            raise ValueError(f"beta must be in [0, 1), got {beta!r}")
        super().__init__(params, inner, {"lr": lr, "beta": beta}, on_nonfinite=on_nonfinite)
        self.inner_lr = check_positive("inner_lr", inner_lr)
        self.z_lr = check_positive("z_lr", z_lr)
        self.inner_steps = check_int("inner_steps", inner_steps, minimum=0)
        self.period = check_int("period", period, minimum=1)
        self.set_inner_warmup(
            self.inner_steps if init_steps is None else init_steps, init_lr, self.inner_lr
        )
        self.z_radius = None if z_radius is None else check_positive("z_radius", z_radius)

    def _step(self, inner_loss: Callable[..., Any], outer_loss: Callable[..., Any]) -> torch.Tensor:
        st = self.bstate
        k = self.global_state["step"]
        x, y = self.outer, self.inner
        # k == 0: the base class ran the init_steps refinement (set_inner_warmup) before this
        if k > 0 and k % self.period == 0:
            self.inner_gd_(inner_loss, self.inner_steps, self.inner_lr)
        z = st.setdefault("z", [torch.zeros_like(t) for t in y])
        m = st.setdefault("m", [torch.zeros_like(p) for p in x])
        f, fx, fy = self.grad_xy(outer_loss, "outer_loss")
        hess = self.mixed(inner_loss)
        try:
            _, hyy = hess.products(z)
            with torch.no_grad():
                torch._foreach_sub_(hyy, fy)
                torch._foreach_add_(z, hyy, alpha=-self.z_lr)
                if self.z_radius is not None:
                    norm = _norm(z)
                    if norm > self.z_radius:
                        torch._foreach_mul_(z, self.z_radius / norm)
            self.check_finite(z)
            hxz, _ = hess.products(z, retain=False)
        finally:
            hess.release()
        with torch.no_grad():
            d = torch._foreach_sub(fx, hxz)
            betas = [float(g["beta"]) for g in self.param_groups for _ in g["params"]]
            for mi, di, b in zip(m, d, betas):
                mi.mul_(b).add_(di, alpha=1.0 - b)
        self.check_finite(m)
        norm = _norm(m)
        if norm > 0:
            with torch.no_grad():
                for p, mi, lr in zip(x, m, self._lr_per_outer()):
                    p.add_(mi, alpha=-lr / norm)
        return f


def _norm(tensors: list[torch.Tensor]) -> float:
    return math.sqrt(sum(float(t.double().square().sum()) for t in tensors))

