"""Clients' local training: K steps of SGD, or of SAM (anyorder.optim.SAM) around SGD, on the
client's minibatches, with an optional gradient correction (FedSpeed's prox-correction,
MoFedSAM's momentum) applied where the reference code applies it."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from anyorder.core.closure import call_closure
from anyorder.federated.algorithm import ClientContext, assign_, flatten
from anyorder.optim.sam import SAM

__all__ = ["local_train", "GradCorrection"]

#: ``correct(params, grads)`` changes the gradients in place just before the SGD step (the
#: parameters are at the unperturbed point x: after SAM's restore).
GradCorrection = Callable[[list[torch.Tensor], list[torch.Tensor]], None]


def _closure(ctx: ClientContext, params: list[torch.Tensor], inputs, targets):
    model, loss_fn = ctx.model, ctx.loss_fn

    def closure(backward: bool = True) -> torch.Tensor:
        loss = loss_fn(model(inputs), targets)
        if backward:
            for p in params:
                p.grad = None
            loss.backward()
        return loss

    return closure


def local_train(
    ctx: ClientContext,
    x: torch.Tensor,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    rho: float = 0.0,
    weight_decay: float = 0.0,
    correct: GradCorrection | None = None,
) -> torch.Tensor:
    """``steps`` local steps from the flat model ``x`` on ``ctx``'s batches; returns the final
    flat model (a new tensor; ``x`` is not modified).

    ``rho == 0``: SGD, ``w ← w − lr (g + weight_decay·w)`` after ``correct``.
    ``rho > 0``: SAM (Foret et al. 2021) through :class:`anyorder.optim.SAM`: gradient g at w,
    ascent to w + rho g/‖g‖ (``SAM.first_step``), gradient g̃ there, exact restore
    (``SAM.restore``), ``correct``, then the SGD step with g̃ (+ weight_decay·w at the restored w).
    A step whose loss is not finite is skipped (weights unchanged) and counted in
    ``ctx.metrics["skipped_steps"]``; ``ctx.metrics["loss"]`` is the mean loss at the unperturbed
    points of the steps taken.
    """
    model = ctx.model
    params = [p for p in model.parameters()]
    assign_(params, x)
    model.train()
    if rho > 0:
        opt: torch.optim.Optimizer = SAM(
            params, "SGD", rho=rho, lr=lr, weight_decay=weight_decay, foreach=True
        )
        base = opt.base_optimizer
    else:
        opt = base = torch.optim.SGD(params, lr=lr, weight_decay=weight_decay, foreach=True)
    losses = 0.0
    taken = skipped = 0
    for inputs, targets in ctx.batches(steps, batch_size):
        closure = _closure(ctx, params, inputs, targets)
        with torch.enable_grad():
            loss = float(call_closure(closure, backward=True).detach())
        if not math.isfinite(loss):
            skipped += 1
            continue
        if rho > 0:
            opt.first_step(zero_grad=True)
            try:
                with torch.enable_grad():
                    second = float(call_closure(closure, backward=True).detach())
            finally:
                opt.restore()
            if not math.isfinite(second):
                skipped += 1
                continue
        if correct is not None:
            correct(params, [p.grad for p in params])
        base.step()
        losses += loss
        taken += 1
    for p in params:
        p.grad = None
    ctx.metrics["loss"] = losses / taken if taken else float("nan")
    ctx.metrics["skipped_steps"] = float(skipped)
    return flatten(params)
