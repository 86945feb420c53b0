"""Machinery shared by the optimizers that estimate a Hessian diagonal (Sophia, AdaHessian)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from anyorder.core.base import AnyOrderOptimizer
from anyorder.curvature.hutchinson import CurvatureEstimate
from anyorder.curvature.hvp import require_contract_closure
from anyorder.optim._common import indexed_params

__all__ = ["CurvatureOptimizer", "total_norm"]


def total_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Euclidean norm over a list of tensors, as a 0-dim float64 tensor (no host sync)."""
    if not tensors:
        return torch.zeros((), dtype=torch.float64)
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(tensors)), dtype=torch.float64)


class CurvatureOptimizer(AnyOrderOptimizer):
    """Base of the diagonal-curvature optimizers: refresh schedule, estimator calls, telemetry.

    A refresh is due on the first step of every period of ``update_every`` steps (steps 0, k,
    2k, ... counting from 0); ``global_state["refreshed_period"]`` remembers the last period that
    got one, so a refresh supplied from outside (``Sophia.update_hessian``) counts too.
    """

    def __init__(
        self,
        params: Iterable[Any],
        defaults: dict[str, Any],
        *,
        estimator: Any,
        update_every: int,
        seed: int,
        on_nonfinite: str,
    ) -> None:
        super().__init__(params, defaults, on_nonfinite=on_nonfinite)
        self.estimator = estimator
        self.update_every = update_every
        self.global_state.update(
            {"seed": seed, "updates": 0, "hessian_refreshes": 0, "refreshed_period": -1}
        )
        self._telemetry: dict[str, Any] = {}

    @property
    def uncounted_evaluations(self) -> dict[str, int]:
        """Backward passes that do not go through the closure's loss: Hessian-vector products
        by double backward, and Sophia-G's backward from sampled labels (see the base class)."""
        engine = getattr(self.estimator, "engine", None)
        backward = engine.products if engine is not None else getattr(self.estimator, "calls", 0)
        return {"forward": 0, "backward": int(backward)}

    # -- schedule --------------------------------------------------------------------------------
    @property
    def hessian_due(self) -> bool:
        """Whether the next step refreshes the Hessian estimate."""
        period = int(self.global_state["step"]) // self.update_every
        return int(self.global_state["refreshed_period"]) < period

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        if hasattr(self.estimator, "seed"):
            self.estimator.seed = int(self.global_state["seed"])

    # -- gradients -------------------------------------------------------------------------------
    def _items(self) -> list[tuple[int, torch.Tensor, dict[str, Any]]]:
        return indexed_params(self.param_groups)

    #: Whether the closure returns ``(loss, logits)`` (Sophia-G) instead of the loss.
    returns_logits = False

    def _estimate(
        self,
        closure: Callable[..., Any],
        items: list[tuple[int, torch.Tensor, dict[str, Any]]],
        step: int,
    ) -> CurvatureEstimate:
        require_contract_closure(closure, type(self).__name__)
        params = [p for _, p, _ in items]
        checked = self.checked_closure(closure, with_logits=self.returns_logits)
        return self.estimator.estimate(checked, params, step, [i for i, _, _ in items])

    def _evaluate(
        self,
        closure: Callable[..., Any],
        items: list[tuple[int, torch.Tensor, dict[str, Any]]],
        step: int,
        refresh: bool,
    ) -> tuple[torch.Tensor, list[torch.Tensor | None], list[torch.Tensor] | None]:
        """``(loss, grads, diagonal)`` of this step: the estimator's (it differentiates the
        closure itself) when ``refresh``, else ``closure(backward=True)`` and ``.grad`` with no
        diagonal."""
        if refresh:
            with self.restoring():  # the counters, if a later evaluation of the estimate raises
                est = self._estimate(closure, items, step)
            self._telemetry["hvp_method"] = est.method
            return est.loss, list(est.grads), est.diagonal
        loss = self.evaluate(closure, backward=True, with_logits=self.returns_logits)
        if self.returns_logits:
            loss = loss[0]
        return loss.detach(), [p.grad for _, p, _ in items], None

    def _mark_refreshed(self, step: int) -> None:
        """Record a refresh of the curvature estimate on ``step``."""
        self.global_state["refreshed_period"] = step // self.update_every
        self.global_state["hessian_refreshes"] += 1
        self._telemetry["refreshed"] = True

    def _finite(
        self,
        loss: torch.Tensor | None,
        grads: list[torch.Tensor | None],
        diagonal: list[torch.Tensor] | None,
    ) -> bool:
        """Apply the non-finite policy to the loss, the gradients and (if given) the new
        diagonal estimate, with one host sync; ``False``: skip the step (nothing changes)."""
        losses = () if loss is None else (loss,)
        # An estimator returns no diagonal when the loss was not finite: the loss says so.
        return self.all_finite(losses, gradient=grads, **{"Hessian estimate": diagonal or None})

    def _state(self, p: torch.Tensor, names: tuple[str, ...]) -> list[torch.Tensor]:
        """The state tensors ``names`` of ``p``, created as zeros on first use."""
        state = self.state[p]
        out = []
        for name in names:
            t = state.get(name)
            if t is None:
                t = state[name] = torch.zeros_like(p, memory_format=torch.preserve_format)
            out.append(t)
        return out

    def _grouped(
        self,
        items: list[tuple[int, torch.Tensor, dict[str, Any]]],
        grads: list[torch.Tensor | None],
        names: tuple[str, ...],
        extra: list[torch.Tensor] | None = None,
    ) -> list[tuple[dict[str, Any], list[list[torch.Tensor]]]]:
        """The parameters with a gradient sorted into their groups, in one pass:
        ``(group, [params, grads, *state tensors per name, extra])`` per group (``extra``,
        one tensor per item, is split the same way when given)."""
        chosen: dict[int, tuple[dict[str, Any], list[list[torch.Tensor]]]] = {}
        width = 2 + len(names) + (extra is not None)
        for k, ((_, p, group), g) in enumerate(zip(items, grads)):
            if g is None:
                continue
            entry = chosen.get(id(group))
            if entry is None:
                entry = chosen[id(group)] = (group, [[] for _ in range(width)])
            columns = entry[1]
            columns[0].append(p)
            columns[1].append(g)
            for j, t in enumerate(self._state(p, names)):
                columns[2 + j].append(t)
            if extra is not None:
                columns[-1].append(extra[k])
        return list(chosen.values())

    @staticmethod
    def _set_grads(items: list[tuple[int, torch.Tensor, dict[str, Any]]], grads) -> None:
        for (_, p, _), g in zip(items, grads):
            p.grad = g

    def _materialize(self, key: str) -> None:
        """Compute the lazy telemetry figure ``key`` now (before its inputs change in place)."""
        value = self._telemetry.get(key)
        if callable(value):
            self._telemetry[key] = value()

    @property
    def telemetry(self) -> dict[str, Any]:
        """Figures of the last step as Python values (see the subclass for the keys).

        Figures that cost reductions over every parameter are stored as zero-argument
        callables over the optimizer's state and computed here, on first read: a training loop
        that never reads them never pays for them."""
        out = {}
        for key in list(self._telemetry):
            self._materialize(key)
            value = self._telemetry[key]
            out[key] = float(value) if isinstance(value, torch.Tensor) else value
        return out
