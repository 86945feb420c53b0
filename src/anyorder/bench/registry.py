"""Registries of bench tasks and optimizers.

Adding an optimizer to ``anyorder bench`` is one call::

    register_optimizer("lion", Lion, requires={"gradients"}, defaults={"lr": 1e-4})

``requires`` names what the optimizer needs from a task (``"gradients"`` for backprop rules,
``"values"`` for zeroth-order and particle methods); the runner applies an optimizer to every task
whose ``provides`` contains it. ``task_defaults`` tunes hyperparameters per task where one setting
cannot serve all (e.g. a smaller learning rate on Rosenbrock's valley).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from anyorder.bench.tasks.base import Task

__all__ = [
    "OptimizerSpec",
    "OPTIMIZERS",
    "TASKS",
    "register_optimizer",
    "register_task",
    "get_task",
    "get_optimizer",
    "UnknownNameError",
]


class UnknownNameError(KeyError):
    """An unknown task or optimizer name; ``str()`` is the one-line message for users."""

    def __str__(self) -> str:
        return str(self.args[0])


@dataclass(frozen=True)
class OptimizerSpec:
    """How the bench builds one optimizer: factory, what it needs, default hyperparameters."""

    name: str
    factory: Callable[..., torch.optim.Optimizer]
    requires: frozenset[str]
    defaults: Mapping[str, Any] = field(default_factory=dict)
    task_defaults: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    description: str = ""
    #: What the optimizer trains, from the model (default: ``model.parameters()``); may prepare
    #: the model in place first (inject LoRA adapters) or return param groups (hybrid ZO).
    params: Callable[[Any], Any] | None = None

    def applies_to(self, task: type[Task] | Task) -> bool:
        """Whether the task provides everything this optimizer requires."""
        return self.requires <= task.provides

    def hyperparameters(
        self, task_name: str, overrides: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        """Defaults, then this task's defaults, then ``overrides`` (from a config file)."""
        return {**self.defaults, **self.task_defaults.get(task_name, {}), **(overrides or {})}

    def params_of(self, model: Any) -> Any:
        """The parameters (or param groups) this optimizer trains on ``model``."""
        return model.parameters() if self.params is None else self.params(model)

    def build(
        self, params: Iterable[torch.Tensor], hyperparameters: Mapping[str, Any]
    ) -> torch.optim.Optimizer:
        """Instantiate the optimizer; bad hyperparameters raise ``ValueError`` naming them."""
        try:
            return self.factory(params, **hyperparameters)
        except TypeError as err:
            raise ValueError(f"optimizer {self.name!r}: bad hyperparameters: {err}") from err
        except ValueError as err:
            raise ValueError(f"optimizer {self.name!r}: {err}") from err


OPTIMIZERS: dict[str, OptimizerSpec] = {}
TASKS: dict[str, type[Task]] = {}


def register_optimizer(
    name: str,
    factory: Callable[..., torch.optim.Optimizer],
    *,
    requires: Iterable[str] = ("gradients",),
    defaults: Mapping[str, Any] | None = None,
    task_defaults: Mapping[str, Mapping[str, Any]] | None = None,
    description: str = "",
    params: Callable[[Any], Any] | None = None,
) -> OptimizerSpec:
    """Register an optimizer under ``name`` for ``anyorder bench``."""
    if name in OPTIMIZERS:
        raise ValueError(f"optimizer {name!r} is already registered")
    spec = OptimizerSpec(
        name=name,
        factory=factory,
        requires=frozenset(requires),
        defaults=dict(defaults or {}),
        task_defaults={k: dict(v) for k, v in (task_defaults or {}).items()},
        description=description or (factory.__doc__ or "").strip().split("\n")[0],
        params=params,
    )
    OPTIMIZERS[name] = spec
    return spec


def register_task(cls: type[Task]) -> type[Task]:
    """Class decorator registering a task under ``cls.name``."""
    if cls.name in TASKS:
        raise ValueError(f"task {cls.name!r} is already registered")
    TASKS[cls.name] = cls
    return cls


def _load_builtins() -> None:
    # Importing these modules registers the built-in tasks and optimizers.
    import anyorder.bench.optimizers  # noqa: F401
    import anyorder.bench.tasks  # noqa: F401


def get_task(name: str) -> type[Task]:
    """The task class registered as ``name``; unknown names list the valid ones."""
    _load_builtins()
    if name not in TASKS:
        raise UnknownNameError(f"unknown task {name!r}; valid tasks: {', '.join(sorted(TASKS))}")
    return TASKS[name]


def get_optimizer(name: str) -> OptimizerSpec:
    """The optimizer spec registered as ``name``; unknown names list the valid ones."""
    _load_builtins()
    if name not in OPTIMIZERS:
        raise UnknownNameError(
            f"unknown optimizer {name!r}; valid optimizers: {', '.join(sorted(OPTIMIZERS))}"
        )
    return OPTIMIZERS[name]


def all_tasks() -> dict[str, type[Task]]:
    """Every registered task, built-ins included."""
    _load_builtins()
    return dict(TASKS)


def all_optimizers() -> dict[str, OptimizerSpec]:
    """Every registered optimizer, built-ins included."""
    _load_builtins()
    return dict(OPTIMIZERS)
