"""AdaHessian's update (Yao et al., "ADAHESSIAN: An Adaptive Second Order Optimizer for Machine
Learning", AAAI 2021), as the authors' code applies it."""

from __future__ import annotations

import math

import torch

__all__ = ["adahessian_", "spatial_average_"]


@torch.no_grad()
def spatial_average_(diagonals: list[torch.Tensor]) -> list[torch.Tensor]:
    """The paper's spatial averaging (its eq. 11): for convolution kernels (tensors of 3 or more
    dimensions, ``(out, in, *kernel)``) replace each entry by the mean over its kernel window.
    Other tensors pass unchanged. Returns the list (conv entries replaced by new tensors)."""
    out = []
    for d in diagonals:
        if d.dim() >= 3:
            dims = tuple(range(2, d.dim()))
            d = d.mean(dim=dims, keepdim=True).expand_as(d).contiguous()
        out.append(d)
    return out


@torch.no_grad()
def adahessian_(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_hessian_sqs: list[torch.Tensor],
    hessian_diagonals: list[torch.Tensor] | None,
    *,
    step: int,
    hessian_step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float = 0.0,
    hessian_power: float = 1.0,
) -> None:
    """One AdaHessian step in place.

    m = b1 m + (1 - b1) g;  if a new (spatially averaged) diagonal D is given:
    v = b2 v + (1 - b2) D^2;  denom = (sqrt(v) / sqrt(1 - b2^s))^k + eps (s = ``hessian_step``,
    the number of diagonals averaged into v);
    p -= lr * (m / (1 - b1^t) / denom + wd p): weight decay scaled by ``lr`` alone, as in the
    authors' code (``image_classification/optim_adahessian.py``; fairseq's version likewise), not
    by the bias-corrected step size.
    """
    if not params:
        return
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    if hessian_diagonals is not None:
        torch._foreach_mul_(exp_hessian_sqs, beta2)
        torch._foreach_addcmul_(exp_hessian_sqs, hessian_diagonals, hessian_diagonals, 1 - beta2)
    denom = torch._foreach_sqrt(exp_hessian_sqs)
    torch._foreach_div_(denom, math.sqrt(1 - beta2**hessian_step))
    if hessian_power != 1.0:
        torch._foreach_pow_(denom, hessian_power)
    torch._foreach_add_(denom, eps)
    step_size = lr / (1 - beta1**step)
    if weight_decay != 0:
        torch._foreach_mul_(params, 1 - lr * weight_decay)
    torch._foreach_addcdiv_(params, exp_avgs, denom, value=-step_size)
