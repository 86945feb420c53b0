"""ITD: iterative (truncated reverse-mode) differentiation through the inner gradient steps.

Maclaurin, Duvenaud & Adams, "Gradient-based Hyperparameter Optimization through Reversible
Learning" (2015); Franceschi et al., "Forward and Reverse Gradient-Based Hyperparameter
Optimization" (2017); truncation as in Shaban, Cheng, Hatch & Boots, "Truncated
Back-propagation for Bilevel Optimization" (AISTATS 2019). The baseline against which the
papers of this module compare.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from anyorder.bilevel._base import BilevelOptimizer, check_int, check_positive

__all__ = ["ITD"]


class ITD(BilevelOptimizer):
    """Reverse-mode differentiation through ``T`` inner gradient steps, truncated to the last
    ``K``.

    One step, from the current ``y_0 = y`` (warm start: each step continues from the last
    inner iterate; ``y_0`` is treated as a constant of ``x``):

        y_{t+1} = y_t - alpha grad_y G(x, y_t),    t = 0..T-1
        a = grad_y F(x, y_T);  h = grad_x F(x, y_T)
        for t = T-1 down to T-K:
            h <- h - alpha d^2_xy G(x, y_t) a
            a <- a - alpha d^2_yy G(x, y_t) a
        x <- x - lr h

    This is exactly the gradient of ``F(x, y_T(x))`` through the last ``K`` steps (``K = T``:
    full reverse mode, what autograd through the unrolled loop returns), computed with one
    mixed Hessian-vector product per step at the stored iterates ``y_t`` instead of keeping the
    unrolled graph (memory: ``K`` copies of ``y``). After the step ``y = y_T``
    (``warm_start=False`` puts ``y`` back to ``y_0``).

    Args:
        lr: outer step (per group); inner_lr: ``alpha``; inner_steps: ``T``;
        truncate: ``K`` in ``1..T`` (default ``T``);
        init_steps, init_lr: the inner warm-up of the first step (``init_steps`` gradient steps
            of size ``init_lr``, default ``inner_lr``, on ``G(x_0, .)`` before the first
            update; default none; see :mod:`anyorder.bilevel._base`).

    State: none besides the step counter.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        inner: Iterable[torch.Tensor],
        *,
        lr: float,
        inner_lr: float,
        inner_steps: int = 10,
        truncate: int | None = None,
        warm_start: bool = True,
        init_steps: int = 0,
        init_lr: float | None = None,
        on_nonfinite: str = "raise",
    ) -> None:
        check_positive("lr", lr, allow_zero=True)
        super().__init__(params, inner, {"lr": lr}, on_nonfinite=on_nonfinite)
        self.inner_lr = check_positive("inner_lr", inner_lr)
        self.inner_steps = check_int("inner_steps", inner_steps, minimum=1)
        self.set_inner_warmup(init_steps, init_lr, self.inner_lr)
        k = self.inner_steps if truncate is None else check_int("truncate", truncate, minimum=1)
        if k > self.inner_steps:
            raise ValueError(f"truncate must be in 1..inner_steps={self.inner_steps}, got {k}")
        self.truncate = k
        if not isinstance(warm_start, bool):
            raise TypeError(f"warm_start must be a bool, got {type(warm_start).__name__}")
        self.warm_start = warm_start

    def _step(self, inner_loss: Callable[..., Any], outer_loss: Callable[..., Any]) -> torch.Tensor:
        y = self.inner
        T, K, alpha = self.inner_steps, self.truncate, self.inner_lr
        y0 = [t.detach().clone() for t in y]
        iterates: list[list[torch.Tensor]] = []
        for t in range(T):
            if t >= T - K:
                iterates.append([v.detach().clone() for v in y])
            _, g = self.grad(inner_loss, y, "inner_loss")
            self.sgd_(y, g, alpha)
        f, h, a = self.grad_xy(outer_loss, "outer_loss")
        y_final = [v.detach().clone() for v in y]
        try:
            for point in reversed(iterates):
                with torch.no_grad():
                    torch._foreach_copy_(y, point)
                hess = self.mixed(inner_loss)
                hxy, hyy = hess.products(a, retain=False)
                hess.release()
                with torch.no_grad():
                    torch._foreach_add_(h, hxy, alpha=-alpha)
                    torch._foreach_add_(a, hyy, alpha=-alpha)
        finally:
            with torch.no_grad():
                torch._foreach_copy_(y, y_final if self.warm_start else y0)
        self.outer_sgd_(h)
        return f
