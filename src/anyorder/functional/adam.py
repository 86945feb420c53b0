"""Adam (Kingma & Ba, 2015) and AdamW (Loshchilov & Hutter, 2019), as ``torch.optim`` defines
them."""

from __future__ import annotations

import math

import torch

__all__ = ["adam_", "adam_moments_"]


@torch.no_grad()
def adam_moments_(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    *,
    beta1: float,
    beta2: float,
    l2: float = 0.0,
) -> list[torch.Tensor]:
    """Adam's moment updates in place, shared by the rules built on them (Adam, diffGrad):
    g += l2 * p (coupled weight decay);  m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2.
    Returns the g used (a new list when ``l2 != 0``; the inputs are not modified)."""
    if l2 != 0:
        grads = torch._foreach_add(grads, params, alpha=l2)
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
    return grads


@torch.no_grad()
def adam_(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    *,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float = 0.0,
    decoupled: bool = False,
) -> None:
    """One Adam step in place; ``step`` counts updates including this one (1 on the first).

    Coupled (Adam): g += weight_decay * p. Decoupled (AdamW): p *= 1 - lr * weight_decay.
    m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2;
    p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps).
    """
    if not params:
        return
    if weight_decay != 0 and decoupled:
        torch._foreach_mul_(params, 1 - lr * weight_decay)
    adam_moments_(
        params,
        grads,
        exp_avgs,
        exp_avg_sqs,
        beta1=beta1,
        beta2=beta2,
        l2=0.0 if decoupled else weight_decay,
    )
    bias1 = 1 - beta1**step
    bias2_sqrt = math.sqrt(1 - beta2**step)
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denom, bias2_sqrt)
    torch._foreach_add_(denom, eps)
    torch._foreach_addcdiv_(params, exp_avgs, denom, value=-lr / bias1)
