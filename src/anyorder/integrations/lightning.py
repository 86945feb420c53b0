"""Lightning: step closure optimizers from manual optimization, and refuse automatic optimization
for the optimizers it cannot drive.

Why a helper. Lightning steps an optimizer through its precision plugin, which wraps the closure
as ``partial(_wrap_closure, model, optimizer, closure)``: a callable without the ``backward``
argument of the closure contract (DESIGN.md). A zeroth-order optimizer then calls it as
``closure()``, so every ZO evaluation runs ``training_step`` *and* a backward pass (the
inference-memory property is silently lost), and Sophia / AdaHessian, which must call
``closure(backward=False)`` to differentiate the loss themselves, reject it.
:func:`closure_step` builds a contract closure from the user's loss function and steps the
optimizer with it directly, keeping Lightning's step accounting (``trainer.global_step``,
``max_steps``, the profiler's ``optimizer_step``) as ``LightningOptimizer.step`` does::

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = ...
            self.automatic_optimization = False       # closure optimizers: manual optimization

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = closure_step(self, self.optimizers(), lambda: F.cross_entropy(self.model(x), y))
            self.log("train_loss", loss)

        def configure_optimizers(self):
            return ZOSGD(self.parameters(), lr=1e-6)   # or Sophia, AdaHessian, SAM, CBO, ZOAdam

    L.Trainer(..., callbacks=[ClosureOptimizationCheck()])

``closure(backward=False)`` evaluates ``loss_fn()``; ``closure(backward=True)`` zeroes the
optimizer's gradients, evaluates it and calls ``module.manual_backward(loss)`` (so Lightning's
``on_before_backward`` / ``on_after_backward`` hooks and precision plugin run). Evaluations go
through :func:`anyorder.core.make_closure`: the same dropout masks on every evaluation of one step,
batch-norm statistics updated once. Lightning's ``on_before_optimizer_step`` hook is not called
(Lightning calls it from inside its closure wrapper, once per evaluation; an optimizer that
evaluates several times per step has no single "after backward" moment).

Refused, with a ``ValueError`` naming the setting: ``closure_step`` under automatic optimization;
``precision="16-mixed"`` (its ``GradScaler`` cannot drive a closure optimizer; ``bf16-mixed``
works: ``training_step`` already runs under autocast); more than one process (use
:class:`anyorder.distributed.ZOTrainer` for zeroth-order training across processes).
:class:`ClosureOptimizationCheck` refuses, when fitting starts, automatic optimization with an
optimizer that needs a contract closure (ZOSGD, ZOAdam, CBO, Sophia, AdaHessian); SAM and
``torch.optim`` optimizers work under automatic optimization and pass.

Requires ``lightning`` (``pip install 'anyorder[lightning]'``); tested with Lightning 2.6.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from anyorder.core.closure import make_closure
from anyorder.integrations._closure_kinds import (
    closure_kind,
    needs_contract_closure,
    unwrap_optimizer,
)

try:
    import lightning.pytorch as pl
except ImportError as exc:  # pragma: no cover - exercised without the extra
    raise ImportError(
        "anyorder.integrations.lightning needs Lightning: pip install 'anyorder[lightning]'"
    ) from exc

__all__ = ["ClosureOptimizationCheck", "closure_step", "check_optimization_mode"]

_SCALED_PRECISIONS = ("16-mixed", "16", 16)


def _attached_trainer(module: Any) -> Any:
    try:
        return module.trainer
    except RuntimeError:  # not attached to a Trainer
        return None


def _automatic_refusal(name: str, kind: str) -> str:
    why = (
        "it evaluates the loss without gradients, and Lightning's automatic optimization would run "
        "training_step and a backward pass inside every evaluation (wasted work, and the "
        "inference-memory property lost)"
        if kind == "gradient_free"
        else "it differentiates the loss itself and needs closure(backward=False), which "
        "Lightning's wrapped closure does not accept"
    )
    return (
        f"{name} cannot be driven by Lightning's automatic optimization: {why}. Set "
        "self.automatic_optimization = False in your LightningModule's __init__ and, in "
        "training_step, call anyorder.integrations.lightning.closure_step(self, "
        "self.optimizers(), lambda: <loss on this batch>)"
    )


def check_optimization_mode(module: Any, optimizers: Any = None) -> None:
    """Raise ``ValueError`` if ``module`` uses automatic optimization with an optimizer that needs
    a contract closure (ZOSGD, ZOAdam, CBO, Sophia, AdaHessian); the message says what to do
    instead. ``optimizers``: default, the attached trainer's."""
    if not getattr(module, "automatic_optimization", True):
        return
    if optimizers is None:
        trainer = _attached_trainer(module)
        optimizers = [] if trainer is None else trainer.optimizers
    if not isinstance(optimizers, (list, tuple)):
        optimizers = [optimizers]
    for opt in optimizers:
        if needs_contract_closure(opt):
            inner = unwrap_optimizer(opt)
            raise ValueError(_automatic_refusal(type(inner).__name__, closure_kind(inner)))


class ClosureOptimizationCheck(pl.Callback):
    """Refuses, when fitting starts (before any batch), automatic optimization with an optimizer
    that needs a contract closure; see :func:`check_optimization_mode`."""

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        check_optimization_mode(pl_module, trainer.optimizers)


def closure_step(
    module: pl.LightningModule,
    optimizer: Any,
    loss_fn: Callable[[], torch.Tensor],
) -> Any:
    """Step ``optimizer`` (what ``module.optimizers()`` returned, or a plain optimizer) with a
    contract closure over ``loss_fn`` (no arguments; the loss on the current batch). Returns
    what the optimizer's ``step`` returns (the loss, for ``self.log``). See the module docstring
    for the closure, the hooks and what is refused."""
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be a callable returning the loss, got {type(loss_fn).__name__}")
    raw = unwrap_optimizer(optimizer)
    if not isinstance(raw, torch.optim.Optimizer):
        raise TypeError(
            f"optimizer must be a torch.optim.Optimizer or what module.optimizers() returns, "
            f"got {type(optimizer).__name__}"
        )
    if getattr(module, "automatic_optimization", False):
        raise ValueError(
            "closure_step is for manual optimization: set self.automatic_optimization = False in "
            "your LightningModule's __init__ (under automatic optimization Lightning steps the "
            "optimizer itself)"
        )
    trainer = _attached_trainer(module)
    if trainer is not None:
        precision = getattr(trainer, "precision", None)
        if precision in _SCALED_PRECISIONS:
            raise ValueError(
                f"closure_step: precision={precision!r} uses a GradScaler, which cannot drive a "
                "closure optimizer (zeroth-order steps have no gradient to scale; SAM and Sophia "
                "evaluate several times per step); use precision='bf16-mixed' or '32-true'"
            )
        world = int(getattr(trainer, "world_size", 1) or 1)
        if world > 1:
            raise ValueError(
                f"closure_step runs on one process (world_size={world}): losses measured on "
                "different shards would move each replica differently; for zeroth-order training "
                "across processes use anyorder.distributed.ZOTrainer"
            )
    backward_of = module.manual_backward if trainer is not None else torch.Tensor.backward
    values = make_closure(module, lambda out, _batch: out, None, forward=lambda _m, _b: loss_fn())

    def closure(backward: bool = True) -> torch.Tensor:
        if not backward:
            return values(backward=False)
        raw.zero_grad(set_to_none=True)
        with torch.enable_grad():
            loss = values(backward=False)
        backward_of(loss)
        return loss.detach()

    closure.model = module  # type: ignore[attr-defined]  # CBO evaluates its swarm through it
    # LightningOptimizer.step's accounting around the strategy's step (trainer.global_step,
    # max_steps and the profiler count optimizer steps through these two calls).
    before = getattr(optimizer, "_on_before_step", None)
    after = getattr(optimizer, "_on_after_step", None)
    if callable(before):
        before()
    result = raw.step(closure)
    if callable(after):
        after()
    return result
