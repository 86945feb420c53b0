"""AID: approximate implicit differentiation with warm-started inner steps and conjugate
gradient on the adjoint system.

Pedregosa, "Hyperparameter optimization with approximate gradient" (ICML 2016); Ghadimi & Wang,
"Approximation Methods for Bilevel Programming" (2018); Ji, Yang & Liang, "Bilevel
Optimization: Convergence Analysis and Enhanced Design" (ICML 2021, AID-BiO with warm starts).
The CG is :func:`anyorder.implicit.linear_solve.solve_cg`; MINRES
(:func:`~anyorder.implicit.linear_solve.solve_minres`) is offered for an inner Hessian that is not
positive definite (``adjoint=``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from anyorder.bilevel._base import BilevelOptimizer, check_int, check_positive
from anyorder.implicit.linear_solve import solve_cg, solve_minres
from anyorder.optim._curvature import total_norm

ADJOINTS = ("cg", "minres", "auto")

__all__ = ["AID"]


class AID(BilevelOptimizer):
    """Hypergradient by the implicit function theorem, with an inexact inner solution and an
    inexact adjoint solve.

    One step (warm starts: ``y`` and ``v`` continue from the previous step; ``v_{-1} = 0``):

        y <- y - alpha grad_y G(x, y)                          T times (``inner_steps``)
        v  = CG (or MINRES) on  d^2_yy G(x, y) v = grad_y F(x, y)  from v_{k-1}
             (at most ``cg_maxiter`` products, stop at ||r|| <= max(cg_rtol ||b||, cg_atol))
        h  = grad_x F(x, y) - d^2_xy G(x, y) v
        x <- x - lr h

    ``h`` is the exact hypergradient when ``y = y*(x)`` and the solve is exact. All products are
    taken at the final ``(x, y)`` from one double-backward graph. The last solve's statistics
    (residual norm, products, converged) are kept in ``last_solve`` (not in the state dict).

    Args:
        lr: outer step (per group); inner_lr: ``alpha``; inner_steps: ``T`` (``0`` allowed: a
            single-loop variant); cg_maxiter, cg_rtol, cg_atol: the adjoint solve;
        warm_start_adjoint: start CG from the last ``v`` (default; Ji et al.'s warm start) or
            from 0. Turn it off when ``cg_maxiter`` is far below what the inner Hessian's
            conditioning needs (an MLP inner problem): warm-started, the solve carries on across
            outer steps into the flattest directions of ``G``, where ``T`` inner steps do not
            track ``y*(x)``, and ``||v||`` and ``h`` grow without bound (on the hyper-cleaning
            MLP ``||v||`` went from 50 to 4,500 in 60 steps, then the weights blew up); from 0,
            a few CG products invert only the well-curved part of the spectrum and ``||v||``
            stayed at ~4;
        adjoint: the solver of the adjoint system. ``"cg"`` (default) assumes the inner
            Hessian positive definite (a strongly convex inner problem) and refuses, with a
            ``ValueError`` (the step rolled back), when CG meets a search direction of
            curvature ``p^T H p <= 0``: the inner Hessian is then not positive definite (an MLP
            inner problem away from a minimum, a saddle) and CG's answer would be meaningless.
            ``"minres"`` (Paige and Saunders) solves symmetric indefinite systems; ``"auto"``
            runs CG and re-solves that step's system with MINRES (same budget, from the same
            start) when CG meets such a direction, or when CG's final residual exceeds
            ``||grad_y F||`` (the residual of ``v = 0``: CG met a direction of tiny positive
            curvature in an indefinite matrix and overshot; on the MNIST hyper-cleaning MLP
            with an inner step above ``2 / lambda_max`` it returned ``||v||`` 738 with
            residual 168, the weights jumped and the detector lost 0.2 F1 in one step);
            ``last_solve["method"]`` says which ran;
        init_steps, init_lr: the inner warm-up of the first step (``init_steps`` gradient steps
            of size ``init_lr``, default ``inner_lr``, on ``G(x_0, .)`` before the first
            update; default none; see :mod:`anyorder.bilevel._base`).

    State: ``v`` (like ``inner``).
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        inner: Iterable[torch.Tensor],
        *,
        lr: float,
        inner_lr: float,
        inner_steps: int = 10,
        cg_maxiter: int = 10,
        cg_rtol: float = 1e-6,
        cg_atol: float = 0.0,
        warm_start_adjoint: bool = True,
        adjoint: str = "cg",
        init_steps: int = 0,
        init_lr: float | None = None,
        on_nonfinite: str = "raise",
    ) -> None:
        check_positive("lr", lr, allow_zero=True)
        super().__init__(params, inner, {"lr": lr}, on_nonfinite=on_nonfinite)
        self.inner_lr = check_positive("inner_lr", inner_lr)
        self.inner_steps = check_int("inner_steps", inner_steps, minimum=0)
        self.set_inner_warmup(init_steps, init_lr, self.inner_lr)
        self.cg_maxiter = check_int("cg_maxiter", cg_maxiter, minimum=1)
        self.cg_rtol = check_positive("cg_rtol", cg_rtol, allow_zero=True)
        self.cg_atol = check_positive("cg_atol", cg_atol, allow_zero=True)
        if not isinstance(warm_start_adjoint, bool):
            raise TypeError("warm_start_adjoint must be a bool")
        self.warm_start_adjoint = warm_start_adjoint
        if adjoint not in ADJOINTS:
            raise ValueError(f"adjoint must be one of {', '.join(ADJOINTS)}, got {adjoint!r}")
        self.adjoint = adjoint
        self.last_solve: dict[str, Any] | None = None

    def _step(self, inner_loss: Callable[..., Any], outer_loss: Callable[..., Any]) -> torch.Tensor:
        st = self.bstate
        self.inner_gd_(inner_loss, self.inner_steps, self.inner_lr)
        f, fx, fy = self.grad_xy(outer_loss, "outer_loss")
        hess = self.mixed(inner_loss)
        try:
            x0 = st.get("v") if self.warm_start_adjoint else None
            opts = {"rtol": self.cg_rtol, "atol": self.cg_atol, "maxiter": self.cg_maxiter,
                    "warn": False}
            solver = solve_minres if self.adjoint == "minres" else solve_cg
            res = solver(hess.hyy, fy, x0=x0, **opts)
            if res.indefinite_curvature is not None:
                if self.adjoint == "cg":
                    raise ValueError(
                        f"AID: the inner Hessian d^2G/dy^2 at the current (x, y) is not positive "
                        f"definite (CG met a direction p with p^T H p = "
                        f"{res.indefinite_curvature:.3e} <= 0 at step "
                        f"{self.global_state['step']}), so CG's adjoint would be meaningless; "
                        "pass adjoint='minres' (symmetric indefinite) or adjoint='auto'"
                    )
                res = solve_minres(hess.hyy, fy, x0=x0, **opts)
            elif self.adjoint == "auto" and res.residual_norm > float(total_norm(fy)):
                # CG ended farther from a solution than v = 0: a direction of tiny positive
                # curvature in an indefinite (or nearly singular) matrix; MINRES minimises the
                # residual over the same Krylov space, so it cannot do worse than v = 0 from 0
                res = solve_minres(hess.hyy, fy, x0=x0, **opts)
            v = [t.detach().clone() for t in res.solution]
            self.check_finite(v)
            hxv, _ = hess.products(v, retain=False)
        finally:
            hess.release()
        with torch.no_grad():
            torch._foreach_sub_(fx, hxv)
        self.outer_sgd_(fx)
        st["v"] = v
        self.last_solve = res.to_dict()
        return f
