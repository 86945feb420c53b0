"""What a bench task is: a model (or a point), a deterministic stream of batches, a loss and a
held-out metric.

A task declares what it *provides* so the runner knows which optimizers apply:

* ``"values"``: the loss can be evaluated (every task);
* ``"gradients"``: the loss is differentiable by autograd (every task here);
* ``"model"``: a neural network trained on batches of real data;
* ``"vector"``: a function of one flat vector, also evaluable on a batch of points ``(n, d)`` by
  :meth:`FunctionTask.batched`;
* ``"population"``: small enough that evaluating a swarm of tens of parameter vectors per step is
  affordable (for particle methods such as consensus-based optimization);
* ``"logits"``: a classifier whose loss is the mean cross-entropy of its logits;
  :meth:`Task.loss_and_logits` returns both (for Sophia-G's Gauss-Newton-Bartlett estimator).

Function tasks wrap their point in :class:`PointModule`, so the runner and every optimizer see an
``nn.Module`` either way.
"""

from __future__ import annotations

import importlib.util
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

__all__ = ["Task", "ModelTask", "FunctionTask", "PointModule", "MissingDataError", "package_dir"]


class MissingDataError(RuntimeError):
    """A task's data package is not installed; the message says how to install it."""


def package_dir(package: str, install_hint: str) -> Path:
    """Folder of an installed data package, found without importing it (some data packages'
    imports need heavy dependencies we do not install)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise MissingDataError(
            f"this task needs the data package {package!r}, which is not installed; "
            f"install it with: {install_hint}"
        )
    return Path(next(iter(spec.submodule_search_locations)))


class Task(ABC):
    """A bench task. Subclasses set the class attributes and implement the abstract methods.

    ``options`` are task-specific keyword arguments (e.g. ``dim`` for function tasks), settable from
    a config file's ``[tasks.NAME]`` table.
    """

    name: ClassVar[str]
    description: ClassVar[str]
    provides: ClassVar[frozenset[str]]
    metric_name: ClassVar[str]
    higher_is_better: ClassVar[bool]
    default_steps: ClassVar[dict[str, int]]  # suite name -> number of steps

    def __init__(self, device: str | torch.device = "cpu", **options: Any) -> None:
        self.device = torch.device(device)
        unknown = set(options) - set(self.option_defaults())
        if unknown:
            raise ValueError(
                f"unknown option(s) {sorted(unknown)} for task {self.name!r}; "
                f"allowed: {sorted(self.option_defaults()) or 'none'}"
            )
        self.options = {**self.option_defaults(), **options}

    @classmethod
    def option_defaults(cls) -> dict[str, Any]:
        """Task options and their defaults."""
        return {}

    def init_model(self, seed: int) -> nn.Module:
        """The initial model for ``seed``: the same weights for every optimizer."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = self._build_model(seed)
        return model.to(self.device)

    @abstractmethod
    def _build_model(self, seed: int) -> nn.Module:
        """Build the model; global RNG is seeded and forked by :meth:`init_model`."""

    @abstractmethod
    def batches(self, generator: torch.Generator) -> Iterator[Any]:
        """An endless stream of batches whose order depends only on ``generator``."""

    @abstractmethod
    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """The training loss of ``model`` on ``batch`` (a scalar tensor)."""

    @abstractmethod
    def evaluate(self, model: nn.Module) -> tuple[float, float]:
        """``(objective, metric)`` after training: the deterministic training objective (the
        runner's ``final_loss``) and the held-out metric named ``metric_name``."""

    def loss_and_logits(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """``(loss, logits)`` on ``batch``, for tasks that provide ``"logits"``: logits of shape
        ``(..., classes)`` whose mean cross-entropy over the positions is the loss's data term."""
        raise NotImplementedError(f"task {self.name!r} does not provide logits")


class ModelTask(Task):
    """A neural network trained on batches of real data."""

    provides: ClassVar[frozenset[str]] = frozenset({"values", "gradients", "model"})


class PointModule(nn.Module):
    """A single flat parameter ``x``: lets function tasks be trained like models."""

    def __init__(self, x0: torch.Tensor) -> None:
        super().__init__()
        self.x = nn.Parameter(x0.clone())

    def forward(self) -> torch.Tensor:
        return self.x


class FunctionTask(Task):
    """Minimise a function of one vector; the metric is the distance to its known minimiser."""

    provides: ClassVar[frozenset[str]] = frozenset({"values", "gradients", "vector", "population"})
    metric_name: ClassVar[str] = "distance_to_minimiser"
    higher_is_better: ClassVar[bool] = False

    @classmethod
    def option_defaults(cls) -> dict[str, Any]:
        return {"dim": 10}

    @property
    def dim(self) -> int:
        dim = self.options["dim"]
        if not isinstance(dim, int) or dim < 2:
            raise ValueError(f"task {self.name!r}: dim must be an integer >= 2, got {dim!r}")
        return dim

    @abstractmethod
    def batched(self, points: torch.Tensor) -> torch.Tensor:
        """Function values of points of shape ``(..., dim)``."""

    @abstractmethod
    def initial_point(self, seed: int) -> torch.Tensor:
        """The starting point for ``seed`` (float32, shape ``(dim,)``)."""

    @abstractmethod
    def minimiser(self) -> torch.Tensor:
        """The global minimiser."""

    def _build_model(self, seed: int) -> nn.Module:
        return PointModule(self.initial_point(seed))

    def batches(self, generator: torch.Generator) -> Iterator[Any]:
        while True:
            yield None

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        return self.batched(model())

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> tuple[float, float]:
        x = model().detach().double()
        value = float(self.batched(x))
        distance = float(torch.linalg.vector_norm(x - self.minimiser().to(x)))
        return value, distance
