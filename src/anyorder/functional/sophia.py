"""Sophia's clipped update (Liu et al., "Sophia: A Scalable Stochastic Second-order Optimizer for
Language Model Pre-training", 2023, Algorithm 3)."""

from __future__ import annotations

import torch

__all__ = ["sophia_", "ema_"]


@torch.no_grad()
def ema_(averages: list[torch.Tensor], values: list[torch.Tensor], beta: float) -> None:
    """averages = beta * averages + (1 - beta) * values, in place."""
    if averages:
        torch._foreach_lerp_(averages, values, 1 - beta)


@torch.no_grad()
def sophia_(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    hessians: list[torch.Tensor],
    *,
    lr: float,
    beta1: float,
    rho: float,
    eps: float,
    weight_decay: float = 0.0,
    count_clipped: bool = False,
) -> torch.Tensor | None:
    """One Sophia step in place (the Hessian EMA ``hessians`` is refreshed by the caller).

    p = p (1 - lr wd);  m = b1 m + (1 - b1) g;  p -= lr clip(m / max(rho h, eps), 1),
    clip(x, 1) = max(min(x, 1), -1) element-wise. With ``count_clipped``, returns the number of
    clipped coordinates (|m| >= max(rho h, eps)) as a 0-dim tensor.
    """
    if not params:
        return torch.zeros(()) if count_clipped else None
    if weight_decay != 0:
        torch._foreach_mul_(params, 1 - lr * weight_decay)
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    denom = torch._foreach_mul(hessians, rho)
    torch._foreach_clamp_min_(denom, eps)
    ratio = torch._foreach_div(exp_avgs, denom)
    del denom
    torch._foreach_clamp_min_(ratio, -1.0)
    torch._foreach_clamp_max_(ratio, 1.0)
    torch._foreach_add_(params, ratio, alpha=-lr)
    if not count_clipped:
        return None
    # clip(x) is +-1 exactly where clipped and in (-1, 1) elsewhere: trunc() leaves +-1 there and
    # 0 elsewhere, so its 1-norm counts the clipped coordinates.
    torch._foreach_trunc_(ratio)
    return torch.stack(torch._foreach_norm(ratio, 1)).sum()
