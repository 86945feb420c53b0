"""Hybrid zeroth-/first-order training: exact gradients for a few parameters (a head), SPSA
estimates for the rest (the body), in one optimizer step.

ZO-Bench (Zhang et al. 2024, "Revisiting Zeroth-Order Optimization for Memory-Efficient LLM
Fine-Tuning: A Benchmark") lists this hybrid scheme: backpropagate through the small part whose
graph is cheap, estimate the gradient of the large part with forward passes only. Here the split
is a param-group key, ``order``: ``0`` (default) for zeroth-order, ``1`` for the exact gradient.

One step, at the current weights ``w = (body, head)``:

1. the head's exact gradient ``g_head = d loss / d head``, from one evaluation with the body's
   parameters' ``requires_grad`` switched off for its duration (restored after, also on an
   exception): autograd records only the head's part of the graph, so the memory is an inference
   pass plus the head's graph and its gradient (measured in BENCHMARKS.md);
2. the SPSA / MeZO estimate for the body only (:class:`~anyorder.optim.ZOSGD`'s step: the head is
   not perturbed), ``2 * n_queries`` evaluations;
3. both updates by the SGD rule of each group (its own ``lr``, ``momentum``, ``weight_decay``):
   ``head <- head - lr_head * g_head`` and the body's ZO-SGD update.

So a step costs ``1 + 2 n_queries`` evaluations (one with the head's graph). Departures: ZO-Bench
evaluates a fixed prefix/suffix split of layers in its own trainer; here any parameters may be
put in the ``order=1`` groups. A non-finite head gradient or ZO loss skips the whole step (no
weight changes; ``global_state["skipped_steps"]``) or raises, per ``on_nonfinite``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import contextmanager
from typing import Any

import torch

from anyorder.functional import sgd_
from anyorder.optim._common import indexed_params
from anyorder.optim.zo import ZOSGD

__all__ = ["HybridZO"]

ORDERS = (0, 1)


@contextmanager
def _frozen(params: list[torch.Tensor]):
    """``requires_grad`` off for ``params`` during the block, restored after."""
    try:
        for p in params:
            p.requires_grad_(False)
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


class HybridZO(ZOSGD):
    """Exact gradients for the ``order=1`` param groups, the SPSA estimate for the others.

    Args: as :class:`~anyorder.optim.ZOSGD`, plus ``order`` (the default for groups that do not
    set it) and ``exact_lr`` (the learning rate of ``order=1`` groups that do not set their own;
    default: ``lr``). Typical use, a task-aligned head trained by backprop on top of a ZO body::

        HybridZO([{"params": model.encoder.parameters()},
                  {"params": model.head.parameters(), "order": 1, "lr": 1e-3}],
                 lr=3e-5, mu=1e-3)

    ``step(closure)`` returns the mean of the zeroth-order losses (as ZOSGD), and records the
    loss at ``w`` of the exact-gradient evaluation in ``global_state["exact_loss"]``. Parameters
    flagged fresh (:mod:`anyorder.core.fresh`) in an ``order=1`` group do not warn: an exact
    gradient trains a fresh head.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float,
        mu: float = 1e-3,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        n_queries: int = 1,
        distribution: str = "auto",
        one_sided: bool = False,
        seed: int = 0,
        *,
        order: int = 0,
        exact_lr: float | None = None,
        probe_every: int = 0,
        on_nonfinite: str = "skip",
        portable_directions: bool = False,
        exact_restore: bool = False,
        restore: str = "compact",
    ) -> None:
        self._check_order(order, "order")
        self._default_order = order
        if exact_lr is not None and (
            isinstance(exact_lr, bool) or not isinstance(exact_lr, (int, float)) or not exact_lr >= 0
        ):
            raise ValueError(f"HybridZO: exact_lr must be a number >= 0 or None, got {exact_lr!r}")
        self._exact_lr = exact_lr
        super().__init__(
            params,
            lr,
            mu,
            momentum,
            weight_decay,
            n_queries,
            distribution,
            one_sided,
            seed,
            probe_every=probe_every,
            on_nonfinite=on_nonfinite,
            portable_directions=portable_directions,
            exact_restore=exact_restore,
            restore=restore,
        )
        self.global_state["exact_loss"] = None

    @staticmethod
    def _check_order(order: Any, where: str) -> None:
        if isinstance(order, bool) or order not in ORDERS:
            raise ValueError(
                f"HybridZO: {where} must be 0 (zeroth-order) or 1 (exact gradient), got {order!r}"
            )

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if isinstance(param_group, dict):
            param_group.setdefault("order", getattr(self, "_default_order", 0))
            self._check_order(param_group["order"], f"param group {len(self.param_groups)}: order")
            exact_lr = getattr(self, "_exact_lr", None)
            if param_group["order"] == 1 and exact_lr is not None:
                param_group.setdefault("lr", exact_lr)
        super().add_param_group(param_group)

    def check_hyperparameters(self) -> None:
        super().check_hyperparameters()
        for i, group in enumerate(self.param_groups):
            self._check_order(group.get("order"), f"param group {i}: order")

    # The zeroth-order machinery (perturbation, estimate, fused update, replay) sees the order-0
    # tensors only; indices stay positions over all groups.
    def _indexed(self) -> list[tuple[int, torch.Tensor, dict[str, Any]]]:
        return [(i, p, g) for i, p, g in indexed_params(self.param_groups) if g["order"] == 0]

    def _exact(self) -> list[tuple[int, torch.Tensor, dict[str, Any]]]:
        return [(i, p, g) for i, p, g in indexed_params(self.param_groups) if g["order"] == 1]

    def _exact_gradients(
        self, closure: Callable[..., Any], exact: list[tuple[int, torch.Tensor, dict[str, Any]]]
    ) -> tuple[float, list[torch.Tensor]]:
        body = [p for _, p, _ in self._indexed()]
        with _frozen(body):
            loss = self.evaluate(closure, backward=False, graph=True)
            params = [p for _, p, _ in exact]
            grads = torch.autograd.grad(loss, params, allow_unused=True)
        out = [torch.zeros_like(p) if g is None else g.detach() for p, g in zip(params, grads)]
        return float(loss.detach().double()), out

    def step(self, closure: Callable[..., Any] | None = None) -> float:  # type: ignore[override]
        """One hybrid step (see the module docstring); returns the mean zeroth-order loss."""
        if closure is None:
            raise ValueError(
                "HybridZO needs a closure: opt.step(closure), where closure(backward=False) "
                "returns the loss on the current batch"
            )
        self.check_hyperparameters()
        exact = self._exact()
        if not exact:
            return super().step(closure)
        exact_loss, grads = self._exact_gradients(closure, exact)
        if not self.all_finite([exact_loss], gradients=grads):
            self.global_state["step"] += 1  # a fresh direction next time, as a ZO skip does
            return exact_loss
        updates = self.global_state["updates"]
        if self._indexed():
            loss = super().step(closure)
            if self.global_state["updates"] == updates:  # the ZO part was skipped: so is the head
                return loss
        else:
            loss = exact_loss
            self.global_state["step"] += 1
            self.global_state["updates"] += 1
        self.global_state["exact_loss"] = exact_loss
        with torch.no_grad():
            for (_, p, group), g in zip(exact, grads):
                (buf,) = sgd_(
                    [p],
                    [g],
                    [self.state[p].get("momentum_buffer")],
                    lr=group["lr"],
                    momentum=group["momentum"],
                    weight_decay=group["weight_decay"],
                )
                if buf is not None:
                    self.state[p]["momentum_buffer"] = buf
        return loss
