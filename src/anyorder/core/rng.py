"""The one way anyorder draws a random direction (DESIGN.md, principle 3).

A direction for one tensor is a pure function of ``(seed, step, query, tensor_index)``: the four
integers are mixed into a 64-bit key with SplitMix64, the key seeds a fresh ``torch.Generator`` and
the generator fills a tensor of the requested shape. The same call therefore replays the same
direction in place (MeZO keeps no copy of z), on another process, or after a resume, and no global
RNG state is read or written.

Directions are drawn in float32 (then cast to ``dtype``) on the CPU by default, so every rank and device type sees the same numbers;
``device`` moves the result. Drawing on an accelerator with ``draw_on_device=True`` is faster but
its numbers differ from the CPU's.
"""

from __future__ import annotations

import torch

DISTRIBUTIONS = ("gaussian", "rademacher", "sphere")

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def derive_seed(seed: int, step: int, query: int = 0, index: int = 0) -> int:
    """Mix ``(seed, step, query, index)`` into one 63-bit generator seed.

    Each field goes through SplitMix64 in turn, so neighbouring keys (step 3 vs 4, tensor 0 vs 1)
    give unrelated streams. The result fits ``torch.Generator.manual_seed``.
    """
    for name, value in (("seed", seed), ("step", step), ("query", query), ("index", index)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}: {value!r}")
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    key = 0
    for value in (seed, step, query, index):
        key = _splitmix64(key ^ (value & _MASK64))
    return key >> 1


def generator_for(
    seed: int, step: int, query: int = 0, index: int = 0, device: str | torch.device = "cpu"
) -> torch.Generator:
    """A fresh generator keyed by ``(seed, step, query, index)``."""
    gen = torch.Generator(device=device)
    gen.manual_seed(derive_seed(seed, step, query, index))
    return gen


def direction(
    shape: torch.Size | tuple[int, ...],
    seed: int,
    step: int,
    query: int = 0,
    index: int = 0,
    *,
    distribution: str = "gaussian",
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    draw_on_device: bool = False,
) -> torch.Tensor:
    """Draw the random direction of one tensor for ``(seed, step, query, index)``.

    ``gaussian``: i.i.d. N(0, 1) entries. ``rademacher``: i.i.d. +-1 entries (signs of the Gaussian draw). ``sphere``: uniform on
    the sphere of radius sqrt(numel), so that E[z z^T] = I as for the other two (the scaling keeps
    the smoothed-gradient estimator unbiased with the same formula for all three).
    """
    if distribution not in DISTRIBUTIONS:
        raise ValueError(
            f"unknown distribution {distribution!r}; choose one of {', '.join(DISTRIBUTIONS)}"
        )
    draw_device = torch.device(device) if draw_on_device else torch.device("cpu")
    gen = generator_for(seed, step, query, index, device=draw_device)
    # Always drawn in float32 and then cast, so every dtype sees the same direction.
    work_dtype = torch.float32
    z = torch.randn(tuple(shape), generator=gen, device=draw_device, dtype=work_dtype)
    if distribution == "rademacher":
        # The sign of a Gaussian is a fair +-1 coin, and costs less than randint + conversion.
        z.sign_()
    elif distribution == "sphere":
        numel = max(z.numel(), 1)
        norm = float(torch.linalg.vector_norm(z, dtype=torch.float64))
        z.mul_(numel**0.5 / max(norm, torch.finfo(work_dtype).tiny))
    return z.to(device=device, dtype=dtype)
