"""diffGrad (Dubey et al., "diffGrad: An Optimization Method for Convolutional Neural Networks",
IEEE TNNLS 2019), as the authors' code defines it."""

from __future__ import annotations

import math

import torch

from anyorder.functional.adam import adam_moments_

__all__ = ["diffgrad_"]


@torch.no_grad()
def diffgrad_(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    previous_grads: list[torch.Tensor],
    *,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float = 0.0,
) -> None:
    """One diffGrad step in place; ``step`` counts updates including this one.

    g += wd p (L2, as the authors' code);  m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2;
    xi = sigmoid(|g_prev - g|) (g_prev = 0 on the first step);  g_prev = g;
    p -= lr sqrt(1 - b2^t) / (1 - b1^t) * xi m / (sqrt(v) + eps).
    """
    if not params:
        return
    grads = adam_moments_(
        params, grads, exp_avgs, exp_avg_sqs, beta1=beta1, beta2=beta2, l2=weight_decay
    )
    friction = torch._foreach_sub(previous_grads, grads)
    torch._foreach_abs_(friction)
    torch._foreach_sigmoid_(friction)
    torch._foreach_mul_(friction, exp_avgs)
    torch._foreach_copy_(previous_grads, grads)
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_add_(denom, eps)
    step_size = lr * math.sqrt(1 - beta2**step) / (1 - beta1**step)
    torch._foreach_addcdiv_(params, friction, denom, value=-step_size)
