"""Standard test functions for global, derivative-free optimization, vectorised over points.

Every function maps a tensor of shape ``(..., d)`` to shape ``(...)``, so one call evaluates a whole
population of particles. Each :class:`TestFunction` records its global minimiser and minimum.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = [
    "TestFunction",
    "sphere",
    "rosenbrock",
    "rastrigin",
    "ackley",
    "griewank",
    "schwefel",
    "levy",
    "FUNCTIONS",
]


def sphere(x: torch.Tensor) -> torch.Tensor:
    """The sphere sum_i x_i^2; minimum 0 at the origin (a convex sanity check)."""
    return (x**2).sum(-1)


def rosenbrock(x: torch.Tensor) -> torch.Tensor:
    """Rosenbrock's valley: sum_i 100 (x_{i+1} - x_i^2)^2 + (1 - x_i)^2; minimum 0 at (1, ..., 1)."""
    head, tail = x[..., :-1], x[..., 1:]
    return (100.0 * (tail - head**2) ** 2 + (1.0 - head) ** 2).sum(-1)


def rastrigin(x: torch.Tensor) -> torch.Tensor:
    """Rastrigin: 10 d + sum_i x_i^2 - 10 cos(2 pi x_i); minimum 0 at the origin."""
    d = x.shape[-1]
    return (x * x).sub_(torch.cos(x * (2.0 * math.pi)).mul_(10.0)).sum(-1).add_(10.0 * d)


def ackley(x: torch.Tensor) -> torch.Tensor:
    """Ackley: -20 exp(-0.2 sqrt(mean x^2)) - exp(mean cos 2 pi x) + 20 + e; minimum 0 at 0."""
    mean_sq = (x**2).mean(-1)
    mean_cos = torch.cos(2.0 * math.pi * x).mean(-1)
    return -20.0 * torch.exp(-0.2 * torch.sqrt(mean_sq)) - torch.exp(mean_cos) + 20.0 + math.e


def griewank(x: torch.Tensor) -> torch.Tensor:
    """Griewank: 1 + sum_i x_i^2 / 4000 - prod_i cos(x_i / sqrt(i)); minimum 0 at the origin."""
    i = torch.arange(1, x.shape[-1] + 1, dtype=x.dtype, device=x.device)
    return 1.0 + (x**2).sum(-1) / 4000.0 - torch.cos(x / i.sqrt()).prod(-1)


#: Schwefel's minimiser coordinate; the 418.98... below is its value of x sin(sqrt|x|).
SCHWEFEL_MINIMISER = 420.968746
_SCHWEFEL_OFFSET = 418.9828872724339


def schwefel(x: torch.Tensor) -> torch.Tensor:
    """Schwefel 2.26: 418.9829 d - sum_i x_i sin(sqrt|x_i|); minimum ~0 at (420.9687, ...), far
    from the next best local minima (deceptive)."""
    d = x.shape[-1]
    return _SCHWEFEL_OFFSET * d - (x * torch.sin(torch.sqrt(x.abs()))).sum(-1)


def levy(x: torch.Tensor) -> torch.Tensor:
    """Levy: sin^2(pi w_1) + sum_i (w_i - 1)^2 (1 + 10 sin^2(pi w_i + 1)) + (w_d - 1)^2
    (1 + sin^2(2 pi w_d)), w = 1 + (x - 1) / 4; minimum 0 at (1, ..., 1)."""
    w = 1.0 + (x - 1.0) / 4.0
    head, last = w[..., :-1], w[..., -1]
    return (
        torch.sin(math.pi * w[..., 0]) ** 2
        + ((head - 1.0) ** 2 * (1.0 + 10.0 * torch.sin(math.pi * head + 1.0) ** 2)).sum(-1)
        + (last - 1.0) ** 2 * (1.0 + torch.sin(2.0 * math.pi * last) ** 2)
    )


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
    "sphere": TestFunction("sphere", sphere, 0.0, 0.0, (-5.12, 5.12)),
    "rosenbrock": TestFunction("rosenbrock", rosenbrock, 1.0, 0.0, (-2.048, 2.048)),
    "rastrigin": TestFunction("rastrigin", rastrigin, 0.0, 0.0, (-5.12, 5.12)),
    "ackley": TestFunction("ackley", ackley, 0.0, 0.0, (-32.768, 32.768)),
    "griewank": TestFunction("griewank", griewank, 0.0, 0.0, (-600.0, 600.0)),
    "schwefel": TestFunction("schwefel", schwefel, SCHWEFEL_MINIMISER, 0.0, (-500.0, 500.0)),
    "levy": TestFunction("levy", levy, 1.0, 0.0, (-10.0, 10.0)),
}
