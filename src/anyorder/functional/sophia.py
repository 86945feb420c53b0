"""Sophia's clipped update (Liu et al., "Sophia: A Scalable Stochastic Second-order Optimizer for
Language Model Pre-training", 2023, Algorithm 3)."""

from __future__ import annotations

import torch

__all__ = ["sophia_", "sophia_clip_count", "ema_"]


@torch.no_grad()
def ema_(averages: list[torch.Tensor], values: list[torch.Tensor], beta: float) -> None:
    """averages = beta * averages + (1 - beta) * values, in place."""
    if averages:
        torch._foreach_lerp_(averages, values, 1 - beta)


def _clipped_ratio(
    exp_avgs: list[torch.Tensor], hessians: list[torch.Tensor], rho: float, eps: float
) -> list[torch.Tensor]:
    """clip(m / max(rho h, eps), 1) element-wise, as new tensors."""
    denom = torch._foreach_mul(hessians, rho)
    torch._foreach_clamp_min_(denom, eps)
    ratio = torch._foreach_div(exp_avgs, denom)
    del denom
    torch._foreach_clamp_min_(ratio, -1.0)
    torch._foreach_clamp_max_(ratio, 1.0)
    return ratio


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
) -> None:
    """One Sophia step in place (the Hessian EMA ``hessians`` is refreshed by the caller).

    p = p (1 - lr wd);  m = b1 m + (1 - b1) g;  p -= lr clip(m / max(rho h, eps), 1),
    clip(x, 1) = max(min(x, 1), -1) element-wise.
    """
    if not params:
        return
    if weight_decay != 0:
        torch._foreach_mul_(params, 1 - lr * weight_decay)
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    torch._foreach_add_(params, _clipped_ratio(exp_avgs, hessians, rho, eps), alpha=-lr)


@torch.no_grad()
def sophia_clip_count(
    exp_avgs: list[torch.Tensor], hessians: list[torch.Tensor], *, rho: float, eps: float
) -> torch.Tensor:
    """Number of coordinates that Sophia's step clips, |m| >= max(rho h, eps), as a 0-dim
    tensor. Given the state after :func:`sophia_` (m updated, h as used), it counts the clipped
    coordinates of that step: the ratio is computed by the same operations, so bit for bit."""
    if not exp_avgs:
        return torch.zeros(())
    ratio = _clipped_ratio(exp_avgs, hessians, rho, eps)
    # clip(x) is +-1 exactly where clipped and in (-1, 1) elsewhere: trunc() leaves +-1 there and
    # 0 elsewhere, so its 1-norm counts the clipped coordinates.
    torch._foreach_trunc_(ratio)
    return torch.stack(torch._foreach_norm(ratio, 1)).sum()
