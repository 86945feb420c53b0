"""``rosenbrock`` and ``rastrigin``: classic test functions in a configurable dimension (option
``dim``, default 10), for methods that only need values."""

from __future__ import annotations

from typing import ClassVar

import torch

from anyorder.bench.registry import register_task
from anyorder.bench.tasks.base import FunctionTask
from anyorder.cbo.functions import FUNCTIONS
from anyorder.core.rng import generator_for


@register_task
class Rosenbrock(FunctionTask):
    """Rosenbrock's valley from the classic start (-1.2, 1, -1.2, 1, ...)."""

    name = "rosenbrock"
    description = "Rosenbrock function, start (-1.2, 1, ...); metric: distance to (1, ..., 1)"
    default_steps: ClassVar[dict[str, int]] = {"quick": 500, "full": 5000}

    def batched(self, points: torch.Tensor) -> torch.Tensor:
        return FUNCTIONS["rosenbrock"](points)

    def initial_point(self, seed: int) -> torch.Tensor:
        x0 = torch.ones(self.dim)
        x0[0::2] = -1.2
        return x0

    def minimiser(self) -> torch.Tensor:
        return FUNCTIONS["rosenbrock"].minimiser(self.dim)


@register_task
class Rastrigin(FunctionTask):
    """Rastrigin's function from a start drawn uniformly in [-5.12, 5.12]^d by the seed."""

    name = "rastrigin"
    description = (
        "Rastrigin function, seeded uniform start in [-5.12, 5.12]^d; metric: distance to 0"
    )
    default_steps: ClassVar[dict[str, int]] = {"quick": 500, "full": 5000}

    def batched(self, points: torch.Tensor) -> torch.Tensor:
        return FUNCTIONS["rastrigin"](points)

    def initial_point(self, seed: int) -> torch.Tensor:
        low, high = FUNCTIONS["rastrigin"].domain
        u = torch.rand(self.dim, generator=generator_for(seed, 0))
        return low + (high - low) * u

    def minimiser(self) -> torch.Tensor:
        return FUNCTIONS["rastrigin"].minimiser(self.dim)
