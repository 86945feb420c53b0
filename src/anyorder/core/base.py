"""The optimizer base class every anyorder optimizer derives from (DESIGN.md, principle 1).

:class:`AnyOrderOptimizer` is a ``torch.optim.Optimizer``: hyperparameters live in
``param_groups`` (so LR schedulers work) and per-parameter state in ``state``. It adds

* ``global_state``: optimizer-wide state (step counter, seed stream, estimator RNG, telemetry)
  saved by ``state_dict()`` under the key ``"anyorder"`` and restored by ``load_state_dict()``,
  never hung on a parameter or keyed by ``id()``;
* :meth:`evaluate`: calls a closure under the closure contract, checks that the loss is a finite
  scalar and counts evaluations;
* the non-finite policy: ``on_nonfinite="skip"`` leaves the parameters untouched and records the
  skipped step, ``"raise"`` raises :class:`NonFiniteLossError`.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch

from anyorder.core.closure import call_closure

__all__ = ["AnyOrderOptimizer", "NonFiniteLossError", "NONFINITE_POLICIES"]

NONFINITE_POLICIES = ("skip", "raise")
_GLOBAL_KEY = "anyorder"


class NonFiniteLossError(FloatingPointError):
    """Raised when a closure returns NaN or inf and the policy is ``"raise"``."""


class AnyOrderOptimizer(torch.optim.Optimizer):
    """Base class: ``torch.optim.Optimizer`` plus global state, the closure contract and a
    non-finite-loss guard. Subclasses implement :meth:`step`."""

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
        if lr is not None and (not isinstance(lr, (int, float, torch.Tensor)) or lr < 0):
            raise ValueError(f"invalid learning rate lr={lr!r}: it must be a number >= 0")
        super().__init__(params, defaults)
        self.on_nonfinite = on_nonfinite
        self.global_state: dict[str, Any] = {"step": 0, "skipped_steps": 0, "evaluations": 0}

    # -- closure contract -------------------------------------------------------------------
    def evaluate(self, closure: Callable[..., Any] | None, backward: bool) -> torch.Tensor:
        """Evaluate ``closure`` (``backward`` as in the contract) and return the scalar loss.

        With ``backward=False`` the closure runs under ``torch.no_grad()``.
        """
        if backward:
            loss = call_closure(closure, backward=True)
        else:
            with torch.no_grad():
                loss = call_closure(closure, backward=False)
        self.global_state["evaluations"] += 1
        if not isinstance(loss, torch.Tensor):
            if isinstance(loss, (int, float)):
                loss = torch.tensor(float(loss))
            else:
                raise TypeError(
                    f"closure must return a scalar loss tensor or float, got {type(loss).__name__}"
                )
        if loss.numel() != 1:
            raise ValueError(
                f"closure must return a scalar loss, got a tensor of shape {tuple(loss.shape)}"
            )
        return loss

    def loss_is_finite(self, *losses: float) -> bool:
        """Apply the non-finite policy to ``losses``; ``False`` means: skip this step."""
        if all(math.isfinite(v) for v in losses):
            return True
        if self.on_nonfinite == "raise":
            raise NonFiniteLossError(
                f"non-finite loss {losses} at step {self.global_state['step']}; "
                "parameters were left unchanged"
            )
        self.global_state["skipped_steps"] += 1
        return False

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
