"""LV-HBA: Yao, Xu, Li, Zeng & Zhang, "Constrained Bi-Level Optimization: Proximal Lagrangian
Value function Approach and Hessian-free Algorithm" (ICLR 2024)."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from anyorder.bilevel._base import BilevelOptimizer, _evaluate, check_positive
from anyorder.core.base import NonFiniteLossError
from anyorder.curvature.hvp import grads_or_zeros

__all__ = ["LVHBA", "LVHBAStepWarning"]


class LVHBAStepWarning(RuntimeWarning):
    """LV-HBA's step sizes break a stability condition (the message says which)."""

Projection = Callable[[Sequence[torch.Tensor], Sequence[torch.Tensor]], None]


class LVHBA(BilevelOptimizer):
    """LV-HBA for ``min F(x, y)`` s.t. ``y in argmin {f(x, y) : g(x, y) <= 0}``, ``(x, y) in C``.

    The proximal Lagrangian value function
    ``v(x, y, z) = min_theta max_{lam >= 0} f(x, theta) + lam^T g(x, theta)
    + ||theta - y||^2 / (2 gamma1) - ||lam - z||^2 / (2 gamma2)`` turns the problem into
    ``min F`` s.t. ``f(x, y) - v(x, y, z) <= 0``; LV-HBA tracks the inner min-max point
    ``(theta, lam)`` by one projected gradient step each and moves ``(x, y, z)`` along the
    gradient of ``F / c_k + f - v``. One step ``k`` (``c_k = c (k + 1)^p``):

        theta+ = theta - eta (grad_y f(x, theta) + sum_i lam_i grad_y g_i(x, theta)
                              + (theta - y) / gamma1)
        lam+   = max(0, lam + eta (g(x, theta) - (lam - z) / gamma2))
        d_x = grad_x F(x, y) / c_k + grad_x f(x, y) - grad_x f(x, theta+)
              - sum_i lam+_i grad_x g_i(x, theta+)
        d_y = grad_y F(x, y) / c_k + grad_y f(x, y) - (y - theta+) / gamma1
        d_z = (z - lam+) / gamma2
        (x, y) <- Proj_C((x, y) - alpha (d_x, d_y))
        z      <- min(max(z - beta d_z, 0), z_max)

    No Hessians: only gradients of ``F``, ``f`` and ``g``. ``theta`` starts at ``y``, ``lam`` and
    ``z`` at 0. ``(theta, lam)`` take one joint projected gradient descent-ascent step from the
    same point ``(theta, lam)`` (``g`` at the old ``theta``), as in both of the authors'
    reference scripts (toy example and data cleaning); an earlier version of this class took
    the ``lam`` step at ``theta+`` (the paper's PDF was not available offline to quote).

    Step sizes: the analysis is two-time-scale: ``(theta, lam)`` track the inner min-max point
    faster than ``(x, y)`` move. Along a direction where ``f``, ``g`` and ``F`` are flat,
    ``e = y - theta`` follows ``e <- (1 + alpha_y / gamma1)(1 - eta / gamma1) e`` (``theta``
    moves towards ``y`` by ``eta / gamma1``, then the ``- v`` term pushes ``y`` away from
    ``theta+`` by ``alpha_y / gamma1``), which grows geometrically once
    ``alpha_y (1 - eta / gamma1) > eta``: that is why LV-HBA diverged on MNIST hyper-cleaning
    with ``inner_lr`` 1.0, ``theta_lr`` 0.5, ``gamma1`` 10 (factor 1.045 per step: ``||y||^2``
    grew 9% per step until the constraint switched on, ``lam`` jumped and the ``theta`` step
    blew up at step ~57). Such settings warn (:class:`LVHBAStepWarning`) at construction, and a
    step that meets a non-finite value says which settings break these conditions.

    Closures: ``outer_loss()`` is ``F``, ``inner_loss()`` is ``f`` and ``constraint()`` returns
    ``g(x, y)`` as a tensor of ``l`` values (any shape, flattened), feasible where ``<= 0``; it is
    passed to :meth:`step` as the third argument. ``project(x, y)``, if given, projects the
    lists of outer and inner tensors onto ``C`` in place (called under ``torch.no_grad()``); the
    paper's ``C`` holds ``X`` and the coupled constraint set ``{(x, y) : g(x, y) <= 0}`` when it
    is convex.

    Departures from the reference code (github.com/SUSTech-Optimization/LV-HBA), not from the
    paper: the reference updates its constraint variable out of place so that ``C`` never
    changes, and its "projection" of ``z`` rescales it upwards; here ``(x, y)`` go through the
    user's projection onto ``C`` and ``z`` is clipped to ``[0, z_max]`` as the paper's ``Z``.

    Args:
        lr: ``alpha`` for ``x`` (per group); inner_lr: ``alpha`` for ``y`` (default: the first
            group's ``lr``, read at every step so a scheduler moves both); theta_lr: ``eta``
            for ``theta`` and ``lam``; z_lr: ``beta``; gamma1, gamma2: the proximal parameters;
            c, p: ``c_k = c (k + 1)^p`` (the paper takes ``p`` in ``(0, 1/2)``); z_max: the
            bound of ``Z`` (default ``inf``); init_steps, init_lr: the inner warm-up of the
            first step (``init_steps`` gradient steps of size ``init_lr``, default
            ``theta_lr``, on ``f(x_0, .)`` alone, the constraint not seen, before the first
            update; ``theta`` then starts at the warmed-up ``y``; default none; see
            :mod:`anyorder.bilevel._base`).

    State: ``theta`` (like ``inner``), ``lam`` and ``z`` (``l`` values each).
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        inner: Iterable[torch.Tensor],
        *,
        lr: float,
        theta_lr: float,
        z_lr: float,
        gamma1: float = 10.0,
        gamma2: float = 0.01,
        c: float = 1.0,
        p: float = 0.3,
        inner_lr: float | None = None,
        z_max: float = float("inf"),
        project: Projection | None = None,
        init_steps: int = 0,
        init_lr: float | None = None,
        on_nonfinite: str = "raise",
    ) -> None:
        check_positive("lr", lr, allow_zero=True)
        super().__init__(params, inner, {"lr": lr}, on_nonfinite=on_nonfinite)
        self.inner_lr = None if inner_lr is None else check_positive("inner_lr", inner_lr)
        self.theta_lr = check_positive("theta_lr", theta_lr)
        self.set_inner_warmup(init_steps, init_lr, self.theta_lr)
        self.z_lr = check_positive("z_lr", z_lr)
        self.gamma1 = check_positive("gamma1", gamma1)
        self.gamma2 = check_positive("gamma2", gamma2)
        self.c = check_positive("c", c)
        self.p = check_positive("p", p, allow_zero=True)
        if not (isinstance(z_max, (int, float)) and z_max > 0):
            raise ValueError(f"z_max must be a number > 0 (inf allowed), got {z_max!r}")
        self.z_max = float(z_max)
        if project is not None and not callable(project):
            raise TypeError(f"project must be callable(x, y) or None, got {type(project).__name__}")
        self.project = project
        if self._conditions():
            warnings.warn(
                "LVHBA: " + "; ".join(self._conditions()), LVHBAStepWarning, stacklevel=2
            )

    def _conditions(self) -> list[str]:
        """The simple stability conditions the current step sizes break (see the class doc)."""
        alpha_y = self.inner_lr if self.inner_lr is not None else float(
            self.param_groups[0]["lr"])
        name = "inner_lr" if self.inner_lr is not None else "lr (used for y: inner_lr=None)"
        out = []
        factor = (1 + alpha_y / self.gamma1) * (1 - self.theta_lr / self.gamma1)
        if factor > 1.0:
            out.append(
                f"the y step {name}={alpha_y:g} is too large for theta_lr={self.theta_lr:g} "
                f"and gamma1={self.gamma1:g}: y - theta grows by (1 + {alpha_y:g}/gamma1)"
                f"(1 - {self.theta_lr:g}/gamma1) = {factor:.4g} per step where f is flat "
                "(take inner_lr <= theta_lr)"
            )
        if self.theta_lr / self.gamma1 >= 2.0:
            out.append(f"theta_lr / gamma1 = {self.theta_lr / self.gamma1:g} >= 2 (the theta "
                       "step overshoots its proximal term)")
        if self.theta_lr / self.gamma2 >= 2.0:
            out.append(f"theta_lr / gamma2 = {self.theta_lr / self.gamma2:g} >= 2 (the lam "
                       "step overshoots its proximal term)")
        if self.z_lr / self.gamma2 >= 2.0:
            out.append(f"z_lr / gamma2 = {self.z_lr / self.gamma2:g} >= 2 (the z step "
                       "overshoots)")
        return out

    @torch.no_grad()
    def step(  # type: ignore[override]
        self,
        inner_loss: Callable[..., Any],
        outer_loss: Callable[..., Any],
        constraint: Callable[..., Any] | None = None,
    ) -> torch.Tensor | None:
        """One LV-HBA iteration; ``constraint()`` returns ``g(x, y)`` (``<= 0`` feasible)."""
        if constraint is None or not callable(constraint):
            raise TypeError(
                "LVHBA.step needs constraint: a callable returning g(x, y) as a tensor "
                f"(<= 0 where feasible), got {type(constraint).__name__}"
            )
        self._constraint = constraint
        try:
            return super().step(inner_loss, outer_loss)
        except NonFiniteLossError as err:
            broken = self._conditions()
            lam = self.bstate.get("lam")
            why = (
                "step sizes that break LV-HBA's stability conditions: " + "; ".join(broken)
                if broken
                else "no simple step-size condition is broken; the curvature of f + lam^T g "
                f"(lam max {float(lam.max()) if lam is not None and lam.numel() else 0:.3g}) "
                f"may exceed 2 / theta_lr = {2 / self.theta_lr:.3g}: lower theta_lr"
            )
            raise NonFiniteLossError(f"{err}. Likely cause: {why}") from None
        finally:
            self._constraint = None

    def _g(self) -> torch.Tensor:
        out = self._constraint()
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"constraint() must return a tensor, got {type(out).__name__}")
        out = out.reshape(-1)
        lam = self.bstate.get("lam")
        if lam is not None and lam.numel() != out.numel():
            raise ValueError(
                f"constraint() returned {out.numel()} values, but {lam.numel()} before"
            )
        return out

    def _step(self, inner_loss: Callable[..., Any], outer_loss: Callable[..., Any]) -> torch.Tensor:
        st = self.bstate
        x, y = self.outer, self.inner
        k = self.global_state["step"]
        ck = self.c * (k + 1) ** self.p
        if "theta" not in st:
            with torch.enable_grad():
                l0 = self._g().numel()
            st["theta"] = [t.detach().clone() for t in y]
            st["lam"] = torch.zeros(l0, dtype=y[0].dtype, device=y[0].device)
            st["z"] = torch.zeros(l0, dtype=y[0].dtype, device=y[0].device)
        theta, lam, z = st["theta"], st["lam"], st["z"]

        def lagrangian(weights: torch.Tensor) -> Callable[[], torch.Tensor]:
            return lambda: inner_loss() + (weights * self._g()).sum()

        # One joint step of (theta, lam) from (theta, lam), g at the old theta:
        # theta+ = theta - eta (grad_y [f + lam^T g](x, theta) + (theta - y) / gamma1)
        # lam+   = max(0, lam + eta (g(x, theta) - (lam - z) / gamma2))
        with self.at(y, theta):
            with torch.enable_grad():
                g_theta = self._g()
                loss = _evaluate(inner_loss, "inner_loss") + (lam * g_theta).sum()
                d_theta = [t.detach() for t in grads_or_zeros(
                    torch.autograd.grad(loss, y, allow_unused=True), y)]
            g_theta = g_theta.detach()
            self.check_finite([loss.detach(), g_theta, *d_theta])
        with torch.no_grad():
            prox = torch._foreach_sub(theta, [t.detach() for t in y])
            torch._foreach_add_(d_theta, prox, alpha=1.0 / self.gamma1)
            new_theta = torch._foreach_add(theta, d_theta, alpha=-self.theta_lr)
        lam_new = _lam_step(lam, z, g_theta, self.theta_lr, self.gamma2)
        self.check_finite([*new_theta, lam_new])
        with self.at(y, new_theta):
            # grad_x [f + lam+^T g](x, theta+)
            _, gx_theta = self.grad(lagrangian(lam_new), x, "inner_loss + lam^T constraint")
        f_up, fx, fy = self.grad_xy(outer_loss, "outer_loss")
        _, lx, ly = self.grad_xy(inner_loss, "inner_loss")
        with torch.no_grad():
            d_x = [a / ck + b - c for a, b, c in zip(fx, lx, gx_theta)]
            d_y = [a / ck + b - (yy.detach() - th) / self.gamma1
                   for a, b, yy, th in zip(fy, ly, y, new_theta)]
            d_z = (z - lam_new) / self.gamma2
            self.check_finite(d_x + d_y + [d_z])
            for p_, d, lr in zip(x, d_x, self._lr_per_outer()):
                p_.add_(d, alpha=-lr)
            alpha_y = self.inner_lr if self.inner_lr is not None else float(
                self.param_groups[0]["lr"])
            torch._foreach_add_(y, d_y, alpha=-alpha_y)
            if self.project is not None:
                self.project(x, y)
            self.check_finite(x + y)
            st["z"] = (z - self.z_lr * d_z).clamp_(min=0.0, max=self.z_max)
        st["theta"] = new_theta
        st["lam"] = lam_new
        return f_up


def _lam_step(
    lam: torch.Tensor, z: torch.Tensor, g: torch.Tensor, eta: float, gamma2: float
) -> torch.Tensor:
    return (lam + eta * (g - (lam - z) / gamma2)).clamp_(min=0.0)
