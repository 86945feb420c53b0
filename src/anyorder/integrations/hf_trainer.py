"""``ClosureTrainer``: the Hugging Face ``Trainer`` for optimizers that step with a closure.

``transformers.Trainer`` runs ``loss.backward()`` itself and then calls ``optimizer.step()``
without a closure, so the optimizers of this library that need one (ZOSGD / ZOAdam, MeZO's
zeroth-order SGD and Adam; CBO; SAM; Sophia; AdaHessian) cannot be passed as
``Trainer(optimizers=(opt, None))``: the step raises ``ValueError`` after a forward and a wasted
backward pass. :class:`ClosureTrainer` overrides the two documented hooks, ``create_optimizer``
and ``training_step``, and nothing else of the Trainer: data loading, LR schedulers, logging,
evaluation, callbacks and checkpointing are the Trainer's own.

How a step runs. ``training_step`` keeps the (prepared) micro-batches of one accumulation
window; on the window's last micro-batch (``accelerator.sync_gradients``) it builds one contract
closure over the window and calls ``optimizer.step(closure)``. The Trainer's own
``optimizer.step()`` that follows is then a no-op (the optimizer the Trainer holds is a thin
adapter that shares ``param_groups`` and ``state`` with yours, so schedulers and checkpoints see
your optimizer; :attr:`ClosureTrainer.closure_optimizer` is yours). Callbacks'
``on_pre_optimizer_step`` therefore see the weights after the update.

The closure (``closure(backward: bool = True)``, DESIGN.md's contract) evaluates
``compute_loss`` on every micro-batch of the window, each through
:func:`anyorder.core.make_closure` (the same dropout masks on every evaluation of a step,
batch-norm statistics updated once). **Gradient accumulation** means:

* ``backward=False`` (ZOSGD, ZOAdam, CBO, under ``torch.no_grad()``): the loss is the window's
  loss, the micro-batch losses added with the Trainer's own normalisation (divided by the number
  of micro-batches unless the loss is already normalised by ``num_items_in_batch``). ZO
  perturbs the weights once and evaluates the whole window under that perturbation, so its
  projected gradient is the one of the window's loss: the mean of the micro-batches' projected
  gradients under one seed, one random direction per optimizer step.
* ``backward=True`` (SAM, ``torch.optim`` optimizers, Sophia/AdaHessian between refreshes):
  gradients are zeroed, then each micro-batch's normalised loss is back-propagated in turn (one
  micro-batch graph alive at a time), exactly the Trainer's accumulation; the optimizer receives
  the window's gradient.
* ``backward=False`` with grad enabled (Sophia / AdaHessian refresh steps, which differentiate
  the loss themselves): the window's loss with its graph; every micro-batch graph of the window
  is alive at once on those steps.

Settings that cannot carry over are refused when the trainer is built or the optimizer created,
with a ``ValueError`` naming the setting:

* ``max_grad_norm``: for first-order closure optimizers (SAM, ``torch.optim``) the gradient is
  clipped inside the closure after every backward pass (SAM clips both of its gradients), which is
  where the update reads it. Gradient-free optimizers (ZO, CBO) have no gradient to clip, and
  Sophia/AdaHessian differentiate the loss themselves on refresh steps, so for them the default
  ``max_grad_norm=1.0`` is ignored (documented here; an explicit 1.0 cannot be told from the
  default) and any other value except 0 raises. The ``grad_norm`` the Trainer logs is the norm of
  whatever ``.grad`` holds after the step (0 for ZO: there is none).
* ``fp16=True``: refused. The Trainer's ``GradScaler`` cannot drive a closure optimizer (ZO has
  no gradient to scale and the scaler asserts on that; SAM/Sophia evaluate several times per
  step). ``bf16=True`` works: accelerate runs the model's forward under autocast, inside the
  closure; ZO's loss difference is then that of bf16 forwards.
* more than one process or device (DDP, DataParallel, DeepSpeed, FSDP): refused; for
  zeroth-order training across processes use :class:`anyorder.distributed.ZOTrainer`, which
  exchanges seeds and scalars.
* Sophia with ``estimator="gnb"`` gets ``(loss, logits)`` from the closure; it needs
  ``gradient_accumulation_steps=1`` (the Gauss-Newton-Bartlett estimate samples labels from one
  batch's logits).

Checkpoints: the optimizer's ``state_dict()`` (with its step counter and direction seed) goes
into ``optimizer.pt`` as usual and is loaded on ``train(resume_from_checkpoint=...)``; with the
Trainer's data skipping and RNG restore, a resumed run is bit-identical to an uninterrupted one
(tested).

Requires ``transformers`` and ``accelerate`` (``pip install 'anyorder[hf]'``); tested with
transformers 5.24 and accelerate 1.15. Loss scaling follows the Trainer's attributes
``loss_is_scaled_for_ga``, ``model_accepts_loss_kwargs`` and ``compute_loss_func`` where the
installed version has them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from anyorder.core.closure import make_closure
from anyorder.integrations._closure_kinds import closure_kind, unwrap_optimizer

try:
    from transformers import Trainer
except ImportError as exc:  # pragma: no cover - exercised without the extra
    raise ImportError(
        "anyorder.integrations.hf_trainer needs transformers and accelerate: "
        "pip install 'anyorder[hf]'"
    ) from exc

__all__ = ["ClosureTrainer"]

_DEFAULT_MAX_GRAD_NORM = 1.0


class _StepTakenAdapter(torch.optim.Optimizer):
    """What the Trainer (and accelerate) hold in place of the user's optimizer: it shares the
    user's ``param_groups``, ``state`` and ``defaults`` (schedulers and checkpoints act on the
    user's optimizer) and its ``step()`` without a closure is a no-op once
    :meth:`ClosureTrainer.training_step` has taken the step."""

    _anyorder_adapter = True

    def __init__(self, inner: torch.optim.Optimizer) -> None:  # no super().__init__: shared state
        self.inner = inner
        self.taken = False

    @property
    def state(self):  # type: ignore[override]
        return self.inner.state

    @state.setter
    def state(self, value) -> None:
        self.inner.state = value

    @property
    def param_groups(self):  # type: ignore[override]
        return self.inner.param_groups

    @param_groups.setter
    def param_groups(self, value) -> None:
        self.inner.param_groups = value

    @property
    def defaults(self):  # type: ignore[override]
        return self.inner.defaults

    @defaults.setter
    def defaults(self, value) -> None:
        self.inner.defaults = value

    def step(self, closure: Callable[..., Any] | None = None) -> Any:  # type: ignore[override]
        if closure is not None:
            return self.inner.step(closure)
        if self.taken:
            self.taken = False
            return None
        raise RuntimeError(
            f"{type(self.inner).__name__} is stepped by ClosureTrainer.training_step with a "
            "closure; step() without one was called outside that flow (call "
            "trainer.closure_optimizer.step(closure) to step it yourself)"
        )

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.inner.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.inner.load_state_dict(state_dict)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.inner.add_param_group(param_group)

    def __getattr__(self, name: str) -> Any:
        if name in ("inner", "taken"):
            raise AttributeError(name)
        return getattr(self.inner, name)

    def __repr__(self) -> str:
        return f"ClosureTrainer adapter of {self.inner!r}"


class _Window:
    """The micro-batches of one accumulation window (one optimizer step)."""

    def __init__(self, global_step: int) -> None:
        self.global_step = global_step
        self.batches: list[Any] = []
        self.num_items: Any = None


class ClosureTrainer(Trainer):
    """``transformers.Trainer`` for optimizers that step with a closure (ZOSGD, ZOAdam, SAM,
    Sophia, AdaHessian, CBO; any ``torch.optim`` optimizer works too). See the module docstring
    for how a step runs, what gradient accumulation means, and which settings are refused.

    Use it as the Trainer::

        opt = ZOSGD(model.parameters(), lr=1e-6, mu=1e-3)          # MeZO (Malladi et al. 2023)
        trainer = ClosureTrainer(model=model, args=args, train_dataset=ds,
                                 optimizers=(opt, None))           # the Trainer builds the schedule
        trainer.train()

    or let the Trainer build the optimizer from
    ``optimizer_cls_and_kwargs=(ZOSGD, {"lr": 1e-6})``. Departure from MeZO's reference trainer
    (a Trainer fork with ZO inside ``_inner_training_loop``): nothing private is overridden, the
    step is the library's optimizer, and accumulation is defined over the window (MeZO's code has
    none).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._window: _Window | None = None
        self._adapter: _StepTakenAdapter | None = None
        super().__init__(*args, **kwargs)
        self._check_training_args()
        if self.optimizer is not None:
            self._check_optimizer(unwrap_optimizer(self.optimizer))

    # -- checks ----------------------------------------------------------------------------------
    def _check_training_args(self) -> None:
        args = self.args
        if getattr(args, "fp16", False) or getattr(args, "fp16_full_eval", False):
            raise ValueError(
                "ClosureTrainer: fp16=True is not supported: the Trainer's GradScaler cannot drive "
                "a closure optimizer (zeroth-order steps have no gradient to scale; SAM and "
                "Sophia evaluate the closure several times per step). Use bf16=True (autocast, "
                "no scaler) or full precision"
            )
        world = int(getattr(args, "world_size", 1) or 1)
        n_gpu = int(getattr(args, "n_gpu", 1) or 1)
        if world > 1 or n_gpu > 1:
            raise ValueError(
                f"ClosureTrainer runs on one process and one device (got world_size={world}, "
                f"n_gpu={n_gpu}): zeroth-order losses measured on different shards would move "
                "each replica differently. For zeroth-order training across processes use "
                "anyorder.distributed.ZOTrainer (it exchanges seeds and scalars)"
            )
        for flag in ("is_deepspeed_enabled", "is_fsdp_enabled"):
            if getattr(self, flag, False):
                name = flag.removeprefix("is_").removesuffix("_enabled")
                raise ValueError(f"ClosureTrainer does not support {name} (one process only)")
        norm = args.max_grad_norm
        if norm is None or not isinstance(norm, (int, float)) or not math.isfinite(norm) or norm < 0:
            raise ValueError(
                f"ClosureTrainer: max_grad_norm={norm!r}: it must be a finite number >= 0 (0: off)"
            )

    def _check_optimizer(self, optimizer: Any) -> None:
        kind = closure_kind(optimizer)
        norm = float(self.args.max_grad_norm)
        name = type(optimizer).__name__
        if kind != "first_order" and norm not in (0.0, _DEFAULT_MAX_GRAD_NORM):
            why = (
                "forms no gradient"
                if kind == "gradient_free"
                else "differentiates the loss itself on Hessian-refresh steps"
            )
            raise ValueError(
                f"ClosureTrainer: max_grad_norm={norm:g} cannot be applied to {name}: it {why}, "
                "so there is no gradient for the Trainer to clip. Set max_grad_norm=0 (the "
                f"default {_DEFAULT_MAX_GRAD_NORM:g} is ignored for {name})"
            )
        if getattr(optimizer, "returns_logits", False) and self.args.gradient_accumulation_steps > 1:
            raise ValueError(
                f"ClosureTrainer: {name} with the Gauss-Newton-Bartlett estimator needs "
                "gradient_accumulation_steps=1 (it samples labels from one batch's logits), got "
                f"gradient_accumulation_steps={self.args.gradient_accumulation_steps}"
            )

    # -- documented hooks --------------------------------------------------------------------------
    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """The Trainer's optimizer (yours from ``optimizers=``, or the one it builds from its
        arguments), checked and wrapped so that the Trainer's ``optimizer.step()`` after
        :meth:`training_step` does nothing more."""
        built = super().create_optimizer() if model is None else super().create_optimizer(model)
        inner = unwrap_optimizer(built)
        self._check_optimizer(inner)
        self.optimizer = self._adapter = _StepTakenAdapter(inner)
        return self.optimizer

    @property
    def closure_optimizer(self) -> torch.optim.Optimizer | None:
        """Your optimizer (the one whose ``step(closure)`` runs), without the Trainer's wrappers."""
        return None if self.optimizer is None else unwrap_optimizer(self.optimizer)

    def training_step(
        self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None
    ) -> torch.Tensor:
        """Keep this micro-batch; on the last one of the accumulation window, step the optimizer
        with a closure over the window. Returns what the Trainer logs: 0 for the first
        micro-batches of a window, the step's loss (as returned by the optimizer) on the last,
        so that the Trainer's sum over the window is the step's loss."""
        model.train()
        train = getattr(self.optimizer, "train", None)
        if callable(train):
            train()
        inputs = self._prepare_inputs(inputs)
        window = self._window
        if window is None or window.global_step != self.state.global_step:
            window = self._window = _Window(self.state.global_step)
        window.batches.append(inputs)
        window.num_items = num_items_in_batch
        device = self.args.device
        if not self.accelerator.sync_gradients:
            return torch.zeros((), device=device)
        self._window = None
        optimizer = self.closure_optimizer
        closure = self._window_closure(model, window.batches, window.num_items, optimizer)
        result = optimizer.step(closure)
        if self._adapter is not None and self._adapter.inner is optimizer:
            self._adapter.taken = True  # the Trainer's optimizer.step() that follows: a no-op
        loss = result[0] if isinstance(result, tuple) else result
        if loss is None:  # an optimizer that returns nothing: nothing to log
            loss = float("nan")
        return torch.as_tensor(float(loss), dtype=torch.float32).to(device)

    # -- the closure ------------------------------------------------------------------------------
    def _loss_is_normalised(self, num_items: Any) -> bool:
        """Whether ``compute_loss`` already normalised the loss over the window (the Trainer's
        own rule in ``training_step``)."""
        scaled = getattr(self, "loss_is_scaled_for_ga", None)
        if scaled is not None:
            return bool(scaled)
        accepts = getattr(self, "model_accepts_loss_kwargs", False)
        return bool((accepts and num_items is not None) or getattr(self, "compute_loss_func", None))

    def _window_closure(
        self, model: nn.Module, batches: list[Any], num_items: Any, optimizer: Any
    ) -> Callable[..., Any]:
        """The contract closure over one window."""
        count = len(batches)
        divide = count > 1 and not self._loss_is_normalised(num_items)
        with_logits = bool(getattr(optimizer, "returns_logits", False))
        clip = (
            float(self.args.max_grad_norm) if closure_kind(optimizer) == "first_order" else 0.0
        )

        def forward(m: nn.Module, inputs: Any) -> Any:
            with self.compute_loss_context_manager():
                if with_logits:
                    loss, outputs = self.compute_loss(
                        m, inputs, return_outputs=True, num_items_in_batch=num_items
                    )
                    logits = outputs["logits"] if isinstance(outputs, dict) else outputs.logits
                    return loss, logits
                loss = self.compute_loss(m, inputs, num_items_in_batch=num_items)
            return loss / count if divide else loss

        parts: list[Callable[..., Any] | None] = [None] * count

        def part(i: int) -> Callable[..., Any]:
            # Built on first use: each captures the RNG state that its micro-batch's forward
            # pass sees in the Trainer's own loop (the previous micro-batch's forward ran first).
            if parts[i] is None:
                parts[i] = make_closure(model, lambda out, _batch: out, batches[i], forward=forward)
            return parts[i]

        def closure(backward: bool = True) -> Any:
            if with_logits:  # one micro-batch (checked when the optimizer was created)
                if backward:
                    model.zero_grad(set_to_none=True)
                    with torch.enable_grad():
                        out = part(0)(backward=False)
                    out[0].backward()
                else:
                    out = part(0)(backward=False)
                return out
            if not backward:
                total = part(0)(backward=False)
                for i in range(1, count):
                    total = total + part(i)(backward=False)
            else:
                model.zero_grad(set_to_none=True)
                total = None
                for i in range(count):
                    with torch.enable_grad():
                        loss = part(i)(backward=False)
                    loss.backward()
                    loss = loss.detach()
                    total = loss if total is None else total + loss
                if clip > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            return total

        closure.model = model  # type: ignore[attr-defined]  # CBO evaluates its swarm through it
        return closure
