"""The one way anyorder draws a random direction (DESIGN.md, principle 3).

A direction is a pure function of ``(seed, step, query, tensor index)``. The tensor is read as a
flat vector in memory order and cut into chunks of :data:`CHUNK` elements; chunk ``k`` is drawn by
a generator seeded with SplitMix64-mixed ``(seed, step, query, index, k)``. So

* the same key replays the same direction in place, on another process or after a resume (MeZO
  keeps no copy of z), with no global RNG state read or written;
* any chunk can be regenerated on its own, so a tensor is perturbed, restored and updated one
  chunk at a time: a direction never needs memory of the tensor's size (an embedding matrix's
  direction would otherwise be bigger than a forward pass's activations), and every pass sees
  the same numbers by construction, for every tensor size.

Distributions (all with E[z z^T] = I): ``gaussian``; ``rademacher`` (+-1 from 64 random bits per
64-bit draw, several times cheaper than a Gaussian on a CPU); ``sphere`` (uniform on the sphere of
radius sqrt(numel) per tensor; needs one extra pass to find the norm).

Directions are drawn in float32 and cast to ``dtype``. By default they are drawn on the CPU and
moved to ``device``, so every rank and device type sees the same numbers; with
``draw_on_device=True`` they are drawn on ``device`` (much faster on a GPU; CPU and CUDA streams
differ).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

__all__ = [
    "DISTRIBUTIONS",
    "CHUNK",
    "derive_seed",
    "generator_for",
    "direction",
    "direction_chunks",
    "flat_view",
]

DISTRIBUTIONS = ("gaussian", "rademacher", "sphere")
#: Elements per independently seeded chunk (256 KiB of float32: stays in cache while in use).
CHUNK = 1 << 16

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def derive_seed(seed: int, step: int, query: int = 0, index: int = 0, chunk: int = 0) -> int:
    """Mix ``(seed, step, query, index, chunk)`` into one 63-bit generator seed.

    Each field goes through SplitMix64 in turn, so neighbouring keys (step 3 vs 4, tensor 0 vs 1)
    give unrelated streams. The result fits ``torch.Generator.manual_seed``.
    """
    fields = (("seed", seed), ("step", step), ("query", query), ("index", index), ("chunk", chunk))
    for name, value in fields:
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}: {value!r}")
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    key = 0
    for _, value in fields:
        key = _splitmix64(key ^ (value & _MASK64))
    return key >> 1


def generator_for(
    seed: int, step: int, query: int = 0, index: int = 0, device: str | torch.device = "cpu"
) -> torch.Generator:
    """A fresh generator keyed by ``(seed, step, query, index)`` (chunk 0)."""
    gen = torch.Generator(device=device)
    gen.manual_seed(derive_seed(seed, step, query, index))
    return gen


_BIT_SHIFTS: dict[torch.device, torch.Tensor] = {}


def _draw(n: int, distribution: str, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    if distribution == "rademacher":
        words = torch.randint(
            -(2**63), 2**63 - 1, ((n + 63) // 64,), generator=gen, device=device, dtype=torch.int64
        )
        shifts = _BIT_SHIFTS.get(device)
        if shifts is None:
            shifts = _BIT_SHIFTS[device] = torch.arange(8, dtype=torch.uint8, device=device)
        bits = torch.bitwise_and(words.view(torch.uint8)[:, None] >> shifts, 1).reshape(-1)[:n]
        return bits.to(torch.float32).mul_(-2.0).add_(1.0)
    return torch.randn(n, generator=gen, device=device, dtype=torch.float32)


def direction_chunks(
    numel: int,
    seed: int,
    step: int,
    query: int = 0,
    index: int = 0,
    *,
    distribution: str = "gaussian",
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    draw_on_device: bool = False,
) -> Iterator[tuple[int, int, torch.Tensor]]:
    """Yield ``(start, end, z[start:end])`` of the flat direction, one chunk at a time."""
    if distribution not in DISTRIBUTIONS:
        raise ValueError(
            f"unknown distribution {distribution!r}; choose one of {', '.join(DISTRIBUTIONS)}"
        )
    derive_seed(seed, step, query, index)  # validates the key
    device = torch.device(device)
    draw_device = device if draw_on_device else torch.device("cpu")
    gen = torch.Generator(device=draw_device)
    kind = "gaussian" if distribution == "sphere" else distribution

    def chunks() -> Iterator[tuple[int, int, torch.Tensor]]:
        for k, start in enumerate(range(0, numel, CHUNK)):
            end = min(start + CHUNK, numel)
            gen.manual_seed(derive_seed(seed, step, query, index, k))
            yield start, end, _draw(end - start, kind, gen, draw_device)

    scale = None
    if distribution == "sphere":
        sq = sum(
            float(torch.linalg.vector_norm(z, dtype=torch.float64)) ** 2 for _, _, z in chunks()
        )
        scale = max(numel, 1) ** 0.5 / max(sq**0.5, torch.finfo(torch.float32).tiny)
    for start, end, z in chunks():
        if scale is not None:
            z.mul_(scale)
        yield start, end, z.to(device=device, dtype=dtype)


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
    """The whole direction of one tensor (its chunks assembled, in row-major order)."""
    shape = tuple(shape)
    numel = 1
    for s in shape:
        numel *= s
    out = torch.empty(numel, dtype=dtype, device=device)
    for start, end, z in direction_chunks(
        numel,
        seed,
        step,
        query,
        index,
        distribution=distribution,
        dtype=dtype,
        device=device,
        draw_on_device=draw_on_device,
    ):
        out[start:end] = z
    return out.reshape(shape)


def flat_view(t: torch.Tensor) -> torch.Tensor:
    """A 1-D view of ``t``'s elements in memory order (contiguous or permuted-dense tensors, such
    as channels-last weights); directions are laid out in this order."""
    if t.is_contiguous():
        return t.view(-1)
    order = sorted(range(t.dim()), key=lambda d: (-t.stride(d), -t.shape[d]))
    permuted = t.permute(order)
    if not permuted.is_contiguous():
        raise ValueError(
            f"tensor of shape {tuple(t.shape)} and strides {t.stride()} is not dense; "
            "call .contiguous() on it before optimizing it"
        )
    return permuted.view(-1)
