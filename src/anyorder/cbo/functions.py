"""Standard test functions for global, derivative-free optimization, vectorised over points.

Every function maps a tensor of shape ``(..., d)`` to shape ``(...)``, so one call evaluates a whole
population of particles. Each :class:`TestFunction` records its global minimiser and minimum;
:func:`shifted` moves the minimiser away from the origin and rotates the axes (as COCO/BBOB does).
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
    "ShiftedFunction",
    "random_rotation",
    "shifted",
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


def random_rotation(
    dim: int, generator: torch.Generator, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """A uniformly random (Haar) orthogonal ``dim x dim`` matrix: the QR factor of a Gaussian matrix
    with the signs of ``R``'s diagonal folded in (Mezzadri 2007), drawn from ``generator``."""
    q, r = torch.linalg.qr(torch.randn((dim, dim), generator=generator, dtype=dtype))
    return q * torch.sign(torch.diagonal(r))


@dataclass(frozen=True)
class ShiftedFunction:
    """``base(R (x − shift) + m)``: the test function ``base`` with its minimiser ``m`` moved to
    ``shift`` and its axes turned by the orthogonal ``rotation`` ``R`` (``None``: not rotated), as
    in the COCO/BBOB suite, so that a method cannot profit from a minimiser at the centre of the
    start box or from separable coordinates. Its minimiser is ``shift``; its minimum is
    ``base.minimum``."""

    base: TestFunction
    shift: torch.Tensor
    rotation: torch.Tensor | None = None

    __test__ = False  # not a pytest test class

    @property
    def minimum(self) -> float:
        return self.base.minimum

    def minimiser(self) -> torch.Tensor:
        """The global minimiser, ``shift``."""
        return self.shift.clone()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        z = x - self.shift.to(x)
        if self.rotation is not None:
            z = z @ self.rotation.to(x).T
        return self.base.fn(z + self.base.minimiser(x.shape[-1], x.dtype).to(x.device))


def shifted(
    name: str,
    dim: int,
    *,
    low: float = -2.0,
    high: float = 2.0,
    rotate: bool = True,
    seed: int = 0,
) -> ShiftedFunction:
    """``FUNCTIONS[name]`` in ``dim`` dimensions with its minimiser drawn uniformly in
    ``[low, high]^dim`` and (``rotate=True``) a random rotation, both from a generator seeded by
    ``seed``: the same seed gives the same function."""
    if name not in FUNCTIONS:
        raise ValueError(f"unknown test function {name!r}; choose one of {', '.join(FUNCTIONS)}")
    if not low < high:
        raise ValueError(f"need low < high, got low={low!r}, high={high!r}")
    gen = torch.Generator().manual_seed(seed)
    shift = low + (high - low) * torch.rand(dim, generator=gen, dtype=torch.float64)
    rotation = random_rotation(dim, gen) if rotate else None
    return ShiftedFunction(FUNCTIONS[name], shift, rotation)
