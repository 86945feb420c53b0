"""Standard test functions for global, derivative-free optimization, vectorised over points.

Every function maps a tensor of shape ``(..., d)`` to shape ``(...)``, so one call evaluates a whole
population of particles. Each :class:`TestFunction` records its global minimiser and minimum.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = ["TestFunction", "rosenbrock", "rastrigin", "ackley", "FUNCTIONS"]


def rosenbrock(x: torch.Tensor) -> torch.Tensor:
    """Rosenbrock's valley: sum_i 100 (x_{i+1} - x_i^2)^2 + (1 - x_i)^2; minimum 0 at (1, ..., 1)."""
    head, tail = x[..., :-1], x[..., 1:]
    return (100.0 * (tail - head**2) ** 2 + (1.0 - head) ** 2).sum(-1)


def rastrigin(x: torch.Tensor) -> torch.Tensor:
    """Rastrigin: 10 d + sum_i x_i^2 - 10 cos(2 pi x_i); minimum 0 at the origin."""
    d = x.shape[-1]
    return 10.0 * d + (x**2 - 10.0 * torch.cos(2.0 * math.pi * x)).sum(-1)


def ackley(x: torch.Tensor) -> torch.Tensor:
    """Ackley: -20 exp(-0.2 sqrt(mean x^2)) - exp(mean cos 2 pi x) + 20 + e; minimum 0 at 0."""
    mean_sq = (x**2).mean(-1)
    mean_cos = torch.cos(2.0 * math.pi * x).mean(-1)
    return -20.0 * torch.exp(-0.2 * torch.sqrt(mean_sq)) - torch.exp(mean_cos) + 20.0 + math.e


@dataclass(frozen=True)
class TestFunction:
    """A test function with its global minimiser (as a function of the dimension) and minimum."""

    name: str
    fn: Callable[[torch.Tensor], torch.Tensor]
    minimiser_value: float
    minimum: float
    domain: tuple[float, float]

    __test__ = False  # not a pytest test class

    def minimiser(self, dim: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """The global minimiser in ``dim`` dimensions."""
        return torch.full((dim,), self.minimiser_value, dtype=dtype)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


FUNCTIONS: dict[str, TestFunction] = {
    "rosenbrock": TestFunction("rosenbrock", rosenbrock, 1.0, 0.0, (-2.048, 2.048)),
    "rastrigin": TestFunction("rastrigin", rastrigin, 0.0, 0.0, (-5.12, 5.12)),
    "ackley": TestFunction("ackley", ackley, 0.0, 0.0, (-32.768, 32.768)),
}
