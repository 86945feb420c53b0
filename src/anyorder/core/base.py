"""The optimizer base class every anyorder optimizer derives from (DESIGN.md, principles 1 and 6).

:class:`AnyOrderOptimizer` is a ``torch.optim.Optimizer``: hyperparameters live in
``param_groups`` (so LR schedulers work) and per-parameter state in ``state``. It adds

* ``global_state``: optimizer-wide state (step counter, seed stream, estimator RNG, telemetry)
  saved by ``state_dict()`` under the key ``"anyorder"`` and restored by ``load_state_dict()``,
  never hung on a parameter or keyed by ``id()``;
* :meth:`evaluate`: **the** evaluation path. It calls a closure under the closure contract (a
  backward branch, a values-only branch, and a values-with-graph branch for optimizers that
  differentiate the loss themselves), checks what the closure returned once
  (:func:`anyorder.core.closure.check_closure_output`) and counts evaluations;
* :meth:`check_hyperparameters`: every float hyperparameter of every param group is checked for
  finiteness and range in one place, when a group is added and at the start of each step (a
  scheduler or the user may have changed it): ``ValueError`` naming the hyperparameter, the group
  and the value, before anything changes;
* the non-finite policy (:meth:`all_finite`): ``on_nonfinite="skip"`` leaves the parameters and
  the optimizer state untouched and records the skipped step, ``"raise"`` raises
  :class:`NonFiniteLossError`. It covers the loss, the gradients and the curvature estimates
  (whatever feeds the state), not only the loss;
* :meth:`restoring`: the transaction every step runs in: on any exception (``KeyboardInterrupt``
  included) the counters in ``global_state`` and whatever the step moved are put back before the
  exception propagates.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from anyorder.core.closure import call_closure, check_closure_output

__all__ = ["AnyOrderOptimizer", "NonFiniteLossError", "NONFINITE_POLICIES", "HYPERPARAMETER_RANGES"]

NONFINITE_POLICIES = ("skip", "raise")
_GLOBAL_KEY = "anyorder"

#: Allowed range of the named hyperparameters: ``(low, low_inclusive, high, high_inclusive)``.
#: Every other float in a param group is only checked for finiteness. A subclass narrows a range
#: in its own ``hyperparameter_ranges``.
HYPERPARAMETER_RANGES: dict[str, tuple[float, bool, float, bool]] = {
    "lr": (0.0, True, math.inf, False),
    "weight_decay": (0.0, True, math.inf, False),
    "eps": (0.0, True, math.inf, False),
    "betas": (0.0, True, 1.0, False),
    "momentum": (0.0, True, 1.0, False),
    "rho": (0.0, True, math.inf, False),
    "eta": (0.0, True, math.inf, False),
    "lam": (0.0, True, math.inf, False),
    "sigma": (0.0, True, math.inf, False),
    "hessian_power": (0.0, False, 1.0, True),
}


def _range_text(bounds: tuple[float, bool, float, bool]) -> str:
    low, low_in, high, high_in = bounds
    if high == math.inf:
        return f"{'>=' if low_in else '>'} {low:g}"
    return f"in {'[' if low_in else '('}{low:g}, {high:g}{']' if high_in else ')'}"


def _in_range(value: float, bounds: tuple[float, bool, float, bool]) -> bool:
    low, low_in, high, high_in = bounds
    above = value >= low if low_in else value > low
    below = value <= high if high_in else value < high
    return above and below


def _scalar(value: Any) -> float | None:
    """``value`` as a float when it is a real number (or a one-element CPU tensor), else None.
    Tensors on an accelerator are not read (that would be a host sync on every step)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, torch.Tensor) and value.numel() == 1 and value.device.type == "cpu":
        if not value.is_complex():
            return float(value)
    return None


class NonFiniteLossError(FloatingPointError):
    """Raised under ``on_nonfinite="raise"`` when a step meets a NaN or inf: the closure's loss,
    a gradient or a curvature estimate. Nothing was changed."""


class AnyOrderOptimizer(torch.optim.Optimizer):
    """Base class: ``torch.optim.Optimizer`` plus global state, the closure contract, one
    hyperparameter check and the non-finite policy. Subclasses implement :meth:`step`."""

    #: Ranges narrowed or added by a subclass (see :data:`HYPERPARAMETER_RANGES`).
    hyperparameter_ranges: dict[str, tuple[float, bool, float, bool]] = {}

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        defaults: dict[str, Any],
        *,
        on_nonfinite: str = "skip",
    ) -> None:
        if on_nonfinite not in NONFINITE_POLICIES:
            raise ValueError(
                f"on_nonfinite must be one of {', '.join(NONFINITE_POLICIES)}, got {on_nonfinite!r}"
            )
        lr = defaults.get("lr")
        if lr is not None and (
            isinstance(lr, bool) or not isinstance(lr, (int, float, torch.Tensor))
        ):
            raise ValueError(f"invalid learning rate lr={lr!r}: it must be a number >= 0")
        self._check_group(defaults, "defaults")
        super().__init__(params, defaults)
        self.on_nonfinite = on_nonfinite
        self.global_state: dict[str, Any] = {"step": 0, "skipped_steps": 0, "evaluations": 0}

    # -- hyperparameters --------------------------------------------------------------------------
    def _check_group(self, group: dict[str, Any], where: str) -> None:
        ranges = {**HYPERPARAMETER_RANGES, **type(self).hyperparameter_ranges}
        who = type(self).__name__
        for name, value in group.items():
            if name == "params":
                continue
            values = list(value) if isinstance(value, (tuple, list)) else [value]
            for k, item in enumerate(values):
                x = _scalar(item)
                if x is None:
                    continue
                bounds = ranges.get(name)
                if math.isfinite(x) and (bounds is None or _in_range(x, bounds)):
                    continue
                label = "learning rate lr" if name == "lr" else name
                shown = f"{label}[{k}]" if isinstance(value, (tuple, list)) else label
                rule = "a finite number" + (f" {_range_text(bounds)}" if bounds else "")
                raise ValueError(f"{who}: invalid {shown}={item!r} in {where}: it must be {rule}")

    def check_hyperparameters(self) -> None:
        """Check every param group's hyperparameters (finite, in range); ``ValueError`` naming
        the hyperparameter, the group and the value. Called at the start of every step, before
        anything changes: a scheduler or the user may have changed a group since the last one."""
        for i, group in enumerate(self.param_groups):
            self._check_group(group, f"param group {i}")

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """``torch.optim.Optimizer.add_param_group`` after checking the group's hyperparameters
        (with the defaults filled in)."""
        if isinstance(param_group, dict):
            merged = {**getattr(self, "defaults", {}), **param_group}
            self._check_group(merged, f"param group {len(getattr(self, 'param_groups', []))}")
        super().add_param_group(param_group)

    # -- closure contract -------------------------------------------------------------------
    def evaluate(
        self,
        closure: Callable[..., Any] | None,
        backward: bool,
        *,
        graph: bool = False,
        with_logits: bool = False,
    ) -> Any:
        """Evaluate ``closure`` and return its checked loss (``(loss, logits)`` with
        ``with_logits``). The one evaluation path of every anyorder optimizer.

        * ``backward=True``: ``closure(backward=True)`` with grad enabled (it fills ``.grad``);
        * ``backward=False``: ``closure(backward=False)`` under ``torch.no_grad()`` (values only),
          or with grad enabled when ``graph`` (the optimizer differentiates the loss itself; the
          loss must then require grad).

        What the closure returned is checked once, by
        :func:`anyorder.core.closure.check_closure_output`: ``TypeError``/``ValueError`` naming
        the value. The evaluation is counted in ``global_state["evaluations"]`` once it returned.
        """
        if backward or graph:
            with torch.enable_grad():
                out = call_closure(closure, backward=backward)
        else:
            with torch.no_grad():
                out = call_closure(closure, backward=False)
        loss, logits = check_closure_output(
            out, with_logits=with_logits, requires_grad=graph and not backward
        )
        self.global_state["evaluations"] += 1
        return (loss, logits) if with_logits else loss

    def checked_closure(
        self, closure: Callable[..., Any], *, with_logits: bool = False
    ) -> Callable[..., Any]:
        """``closure`` routed through :meth:`evaluate` (values with their graph when called with
        ``backward=False``), for estimators that call the closure themselves."""

        def checked(backward: bool = True) -> Any:
            return self.evaluate(closure, backward, graph=True, with_logits=with_logits)

        return checked

    @property
    def uncounted_evaluations(self) -> dict[str, int]:
        """Evaluations this optimizer made that a counter wrapped around the closure's loss
        function does not see one by one, as ``{"forward": n, "backward": n}``: particles
        evaluated in one vectorised call (CBO), backward passes the optimizer takes itself
        (double-backward Hessian-vector products, Sophia-G's backward from sampled labels). A
        benchmark adds them to what its counter saw (``anyorder bench`` does). Counted since
        construction; not part of the state."""
        return {"forward": 0, "backward": 0}

    # -- non-finite policy ------------------------------------------------------------------------
    def _nonfinite(self, what: str) -> bool:
        if self.on_nonfinite == "raise":
            raise NonFiniteLossError(
                f"{type(self).__name__}: non-finite {what} at step {self.global_state['step']}; "
                "parameters and optimizer state were left unchanged"
            )
        self.global_state["skipped_steps"] += 1
        return False

    def loss_is_finite(self, *losses: float) -> bool:
        """Apply the non-finite policy to ``losses``; ``False`` means: skip this step."""
        if all(math.isfinite(v) for v in losses):
            return True
        return self._nonfinite(f"loss {losses}")

    def all_finite(
        self,
        losses: Sequence[float | torch.Tensor] = (),
        **tensors: Sequence[torch.Tensor] | None,
    ) -> bool:
        """Apply the non-finite policy to the losses and to named lists of tensors (gradients,
        curvature estimates...). ``False`` means: skip this step (it was recorded); under
        ``"raise"`` a :class:`NonFiniteLossError` names what was not finite.

        One host synchronisation for everything: the 2-norm of each list (one fused kernel per
        list; a NaN or inf anywhere makes it non-finite) is stacked with the losses and read
        once. Only when a norm is not finite is the list looked at again, by its largest
        magnitude (which cannot overflow as a sum of squares of huge finite values can; about
        40x slower than the 2-norm on the CPU, hence not the first test).
        """
        names, values, lists = [], [], []
        device = None
        for i, loss in enumerate(losses):
            names.append("loss" if len(losses) == 1 else f"loss {i}")
            values.append(loss)
            if device is None and isinstance(loss, torch.Tensor):
                device = loss.device
        for name, ts in tensors.items():
            ts = [t for t in (ts or ()) if t is not None]
            if not ts:
                continue
            device = device or ts[0].device
            norms = torch._foreach_norm(ts)
            names.append(name)
            values.append(
                torch.stack([n.to(device=device, dtype=torch.float64) for n in norms]).max()
            )
            lists.append((len(values) - 1, ts))
        if not values:
            return True
        if device is None:
            flags = [math.isfinite(float(v)) for v in values]
        else:
            stacked = torch.stack(
                [
                    v.detach().to(device=device, dtype=torch.float64).reshape(())
                    if isinstance(v, torch.Tensor)
                    else torch.tensor(float(v), dtype=torch.float64, device=device)
                    for v in values
                ]
            )
            finite = torch.isfinite(stacked)
            if bool(finite.all()):  # the one host sync
                return True
            flags = finite.tolist()
            for k, ts in lists:  # an overflowing 2-norm of finite values is not a NaN/inf
                if not flags[k]:
                    peaks = torch._foreach_norm(ts, math.inf)
                    flags[k] = bool(
                        torch.isfinite(torch.stack([q.double().cpu() for q in peaks])).all()
                    )
        if all(flags):
            return True
        bad = [n for n, ok in zip(names, flags) if not ok]
        return self._nonfinite(" and ".join(bad))

    # -- transactions -----------------------------------------------------------------------------
    @contextmanager
    def restoring(self, undo: Callable[[], None] | None = None) -> Iterator[None]:
        """Run a step's body; on any exception (``KeyboardInterrupt`` included) call ``undo``
        (which puts back whatever the step moved, e.g. perturbed weights), restore the counters
        of ``global_state`` as they were on entry, and re-raise."""
        saved = dict(self.global_state)
        try:
            yield
        except BaseException:
            try:
                if undo is not None:
                    undo()
            finally:
                self.global_state.clear()
                self.global_state.update(saved)
            raise

    # -- state dict -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state[_GLOBAL_KEY] = copy.deepcopy(self.global_state)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        global_state = state_dict.pop(_GLOBAL_KEY, None)
        super().load_state_dict(state_dict)
        if global_state is not None:
            self.global_state = copy.deepcopy(global_state)

    def step(self, closure: Callable[..., Any] | None = None) -> Any:  # pragma: no cover
        raise NotImplementedError
