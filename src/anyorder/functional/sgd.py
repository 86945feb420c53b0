"""SGD with heavy-ball momentum, as ``torch.optim.SGD`` defines it."""

from __future__ import annotations

import torch

__all__ = ["sgd_"]


@torch.no_grad()
def sgd_(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    momentum_buffers: list[torch.Tensor | None],
    *,
    lr: float,
    momentum: float = 0.0,
    dampening: float = 0.0,
    weight_decay: float = 0.0,
    nesterov: bool = False,
) -> list[torch.Tensor | None]:
    """One SGD step in place; returns the (possibly newly created) momentum buffers.

    d = g + weight_decay * p;  b = momentum * b + (1 - dampening) * d (b = d on the first step);
    p -= lr * (d + momentum * b if nesterov else b).
    ``grads`` may be overwritten (they are treated as scratch).
    """
    if not params:
        return momentum_buffers
    if weight_decay != 0:
        grads = torch._foreach_add(grads, params, alpha=weight_decay)
    if momentum != 0:
        fresh = [i for i, b in enumerate(momentum_buffers) if b is None]
        for i in fresh:
            momentum_buffers[i] = grads[i].detach().clone()
        old = [i for i in range(len(params)) if i not in set(fresh)]
        if old:
            bufs = [momentum_buffers[i] for i in old]
            torch._foreach_mul_(bufs, momentum)
            torch._foreach_add_(bufs, [grads[i] for i in old], alpha=1 - dampening)
        if nesterov:
            grads = torch._foreach_add(grads, momentum_buffers, alpha=momentum)
        else:
            grads = momentum_buffers
    torch._foreach_add_(params, grads, alpha=-lr)
    return momentum_buffers
