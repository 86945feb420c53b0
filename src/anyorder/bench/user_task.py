"""Your own task for ``anyorder bench --task-file my_task.py``.

A task file is a Python file that defines ``task`` (one task) or ``tasks`` (a list), each made by
one of the two builders here (or any subclass of ``anyorder.bench.tasks.base.Task``):

* :func:`model_task`: a model factory and your tensors ``(x, y)``; the bench draws minibatches
  (a permutation per epoch from the run's seed, so every optimizer sees the same batches for a
  given seed), trains with ``loss(model(x), y)`` and reports ``metric(model(x_test), y_test)``;
* :func:`vector_task`: a function of one vector, evaluated on points of shape ``(..., d)``,
  and a starting point.

Every applicable registered optimizer then runs on it with the same seeds, budget and data
order as on the built-in tasks. ``target_loss`` (optional) fixes the time-to-target threshold
(otherwise it is a quantile of what the optimizers reached; see ``anyorder.bench.targets``).

The model factory is called with torch's global generator seeded by the run's seed inside
``torch.random.fork_rng`` (as for the built-in tasks), so ``nn.Linear``'s default initialisation
is the same for every optimizer of a seed, and the caller's global RNG is left as it was.
"""

from __future__ import annotations

import importlib.util
import itertools
import math
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from anyorder.bench.registry import TASKS
from anyorder.bench.tasks.base import FunctionTask, ModelTask, Task

__all__ = ["model_task", "vector_task", "load_task_file", "TaskFileError"]

_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")


class TaskFileError(ValueError):
    """A task file that cannot be loaded or defines no usable task; the message says why."""


def _check_name(name: Any) -> str:
    if not isinstance(name, str) or not name or not set(name) <= _NAME_CHARS:
        raise ValueError(
            f"task name must be a non-empty string of letters, digits, '-', '_' or '.', "
            f"got {name!r}"
        )
    return name


def _check_steps(steps: Any) -> int:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    return steps


def _check_target(target: Any) -> float | None:
    if target is None:
        return None
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not math.isfinite(
        target
    ):
        raise ValueError(f"target_loss must be a finite number or None, got {target!r}")
    return float(target)


def _pair(value: Any, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    if (
        not isinstance(value, (tuple, list))
        or len(value) != 2
        or not all(isinstance(t, torch.Tensor) for t in value)
    ):
        raise TypeError(f"{what} must be a pair of tensors (x, y), got {type(value).__name__}")
    x, y = value
    if x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise ValueError(
            f"{what}: x and y must hold the same number (> 0) of examples, got "
            f"{x.shape[0]} and {y.shape[0]}"
        )
    return x, y


def model_task(
    name: str,
    *,
    model: Callable[[], nn.Module],
    train: tuple[torch.Tensor, torch.Tensor],
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor] | None = None,
    metric: Callable[[torch.Tensor, torch.Tensor], float | torch.Tensor] | None = None,
    metric_name: str = "test_loss",
    higher_is_better: bool = False,
    batch_size: int = 64,
    steps: int = 200,
    target_loss: float | None = None,
    logits: bool = False,
    population: bool = False,
    description: str = "",
) -> type[Task]:
    """A task class training ``model()`` on your tensors ``train = (x, y)``.

    ``loss(outputs, y)`` is the training loss of a minibatch; ``final_loss`` is it on the whole
    training set after training. ``metric(outputs, y)`` on ``test`` (default: ``train``) is the
    reported metric, named ``metric_name`` (default: the loss on the test set, lower is better).
    ``logits=True`` declares that ``loss`` is the mean cross-entropy of the outputs (lets
    Sophia-G run). ``population=True`` declares the model small enough for particle methods
    (CBO evaluates tens of weight vectors per step). ``steps``: the default number of steps (``--steps`` overrides it).
    """
    name = _check_name(name)
    if not callable(model) or not callable(loss):
        raise TypeError("model and loss must be callables: model() -> nn.Module, loss(out, y)")
    if metric is not None and not callable(metric):
        raise TypeError(f"metric must be callable or None, got {type(metric).__name__}")
    x_train, y_train = _pair(train, "train")
    x_test, y_test = _pair(test, "test") if test is not None else (x_train, y_train)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    n_steps, target = _check_steps(steps), _check_target(target_loss)
    metric_fn = metric or loss
    provides = (
        {"values", "gradients", "model"}
        | ({"logits"} if logits else set())
        | ({"population"} if population else set())
    )

    def _data(self: Task) -> tuple[torch.Tensor, ...]:
        return tuple(t.to(self.device) for t in (x_train, y_train, x_test, y_test))

    def _build_model(self: Task, seed: int) -> nn.Module:
        built = model()
        if not isinstance(built, nn.Module):
            raise TypeError(f"task {name!r}: model() must return an nn.Module, got "
                            f"{type(built).__name__}")
        return built

    def batches(self: Task, generator: torch.Generator) -> Iterator[Any]:
        x, y, _, _ = _data(self)
        n = x.shape[0]
        size = min(batch_size, n)  # full batches only; the rest of an epoch is dropped
        for _epoch in itertools.count():
            order = torch.randperm(n, generator=generator).to(x.device)
            for start in range(0, n - size + 1, size):
                idx = order[start : start + size]
                yield x[idx], y[idx]

    def task_loss(self: Task, net: nn.Module, batch: Any) -> torch.Tensor:
        x, y = batch
        return loss(net(x), y)

    def loss_and_logits(self: Task, net: nn.Module, batch: Any):
        x, y = batch
        out = net(x)
        return loss(out, y), out

    @torch.no_grad()
    def evaluate(self: Task, net: nn.Module) -> tuple[float, float]:
        x, y, xt, yt = _data(self)
        objective = float(loss(net(x), y))
        value = metric_fn(net(xt), yt)
        return objective, float(value)

    attrs: dict[str, Any] = {
        "name": name,
        "description": description or f"user task (model and tensors, {x_train.shape[0]} "
        f"training examples)",
        "provides": frozenset(provides),
        "metric_name": metric_name if metric is not None else "test_loss",
        "higher_is_better": bool(higher_is_better) if metric is not None else False,
        "default_steps": {"quick": n_steps, "full": n_steps},
        "target_loss": target,
        "_build_model": _build_model,
        "batches": batches,
        "loss": task_loss,
        "evaluate": evaluate,
    }
    if logits:
        attrs["loss_and_logits"] = loss_and_logits
    attrs["__doc__"] = attrs["description"]
    return type(f"UserModelTask_{name}", (ModelTask,), attrs)


def vector_task(
    name: str,
    *,
    f: Callable[[torch.Tensor], torch.Tensor],
    x0: torch.Tensor | Callable[[int], torch.Tensor],
    steps: int = 500,
    minimiser: torch.Tensor | None = None,
    target_loss: float | None = None,
    description: str = "",
) -> type[Task]:
    """A task class minimising ``f`` over vectors of dimension ``d``.

    ``f`` maps points of shape ``(..., d)`` to values of shape ``(...)`` (so particle methods can
    evaluate a swarm in one call). ``x0`` is the start, or ``x0(seed)`` a start per seed. The
    metric is the distance to ``minimiser`` when given, else ``f`` at the final point.
    """
    name = _check_name(name)
    if not callable(f):
        raise TypeError(f"f must be callable, got {type(f).__name__}")
    start = x0(0) if callable(x0) else x0
    if not isinstance(start, torch.Tensor) or start.ndim != 1 or start.numel() < 1:
        raise TypeError("x0 must be a 1-D tensor (or a function of the seed returning one)")
    d = start.numel()
    probe = f(start.detach().float().unsqueeze(0))
    if not isinstance(probe, torch.Tensor) or tuple(probe.shape) != (1,):
        raise ValueError(
            f"f must map points of shape (..., {d}) to values of shape (...); for shape (1, {d}) "
            f"it returned {tuple(probe.shape) if isinstance(probe, torch.Tensor) else probe!r}"
        )
    if minimiser is not None and (
        not isinstance(minimiser, torch.Tensor) or minimiser.shape != start.shape
    ):
        raise ValueError(f"minimiser must be a tensor of shape ({d},)")
    n_steps, target = _check_steps(steps), _check_target(target_loss)

    def batched(self: Task, points: torch.Tensor) -> torch.Tensor:
        return f(points)

    def initial_point(self: Task, seed: int) -> torch.Tensor:
        point = x0(seed) if callable(x0) else x0
        return point.detach().to(torch.float32).clone()

    def get_minimiser(self: Task) -> torch.Tensor:
        return minimiser if minimiser is not None else initial_point(self, 0)

    @torch.no_grad()
    def evaluate(self: Task, model: nn.Module) -> tuple[float, float]:
        x = model().detach().double()
        value = float(f(x.unsqueeze(0)).squeeze(0))
        if minimiser is None:
            return value, value
        return value, float(torch.linalg.vector_norm(x - minimiser.to(x)))

    attrs: dict[str, Any] = {
        "name": name,
        "description": description or f"user task (function of a {d}-vector)",
        "metric_name": "distance_to_minimiser" if minimiser is not None else "final_value",
        "higher_is_better": False,
        "default_steps": {"quick": n_steps, "full": n_steps},
        "target_loss": target,
        "batched": batched,
        "initial_point": initial_point,
        "minimiser": get_minimiser,
        "evaluate": evaluate,
        "option_defaults": classmethod(lambda cls: {}),
        "dim": property(lambda self: d),
        "loss": lambda self, model, batch: f(model().unsqueeze(0)).squeeze(0),
    }
    return type(f"UserVectorTask_{name}", (FunctionTask,), attrs)


#: Task names registered from task files, and the file each came from.
_FROM_FILES: dict[str, str] = {}


def load_task_file(path: str | Path) -> list[str]:
    """Import the task file at ``path``, register its ``task``/``tasks`` and return their names.

    A name already taken by a built-in task is an error; a task loaded before from a task file is
    replaced (so a file can be loaded again after an edit). Raises :class:`TaskFileError`.
    """
    path = Path(path)
    if not path.is_file() or path.suffix != ".py":
        raise TaskFileError(f"task file {str(path)!r} does not exist or is not a .py file")
    module_name = f"anyorder_user_task_{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise TaskFileError(f"task file {str(path)!r} cannot be imported")
    module = importlib.util.module_from_spec(spec)
    try:
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
    except Exception as err:  # the user's code: report it in one line
        sys.modules.pop(module_name, None)
        first = str(err).splitlines()[0] if str(err) else ""
        raise TaskFileError(
            f"task file {str(path)!r} failed to load: {type(err).__name__}: {first}"
        ) from err
    found = getattr(module, "tasks", None)
    if found is None and hasattr(module, "task"):
        found = [module.task]
    if found is None:
        raise TaskFileError(
            f"task file {str(path)!r} must define `task` or `tasks` (made with "
            "anyorder.bench.user_task.model_task or vector_task)"
        )
    if not isinstance(found, (list, tuple)):
        found = [found]
    names: list[str] = []
    from anyorder.bench.registry import all_tasks

    builtins = all_tasks()
    for cls in found:
        if not (isinstance(cls, type) and issubclass(cls, Task)):
            raise TaskFileError(
                f"task file {str(path)!r}: {cls!r} is not a task (use model_task or vector_task)"
            )
        if cls.name in builtins and cls.name not in _FROM_FILES:
            raise TaskFileError(
                f"task file {str(path)!r}: task name {cls.name!r} is taken by a built-in task"
            )
        if cls.name in names:
            raise TaskFileError(f"task file {str(path)!r} defines {cls.name!r} twice")
        names.append(cls.name)
    for cls in found:
        TASKS[cls.name] = cls
        _FROM_FILES[cls.name] = str(path.resolve())
    return names

