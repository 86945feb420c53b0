"""The one way anyorder draws a random direction (DESIGN.md, principle 3).

A direction is a pure function of ``(seed, step, query, tensor index)``. The tensor is read as a
flat vector in memory order and cut into chunks of :data:`CHUNK` elements (:data:`DEVICE_CHUNK` when drawn on an
accelerator); chunk ``k`` is drawn by
a generator seeded with SplitMix64-mixed ``(seed, step, query, index, k)``. So

* the same key replays the same direction in place, on another process or after a resume (MeZO
  keeps no copy of z), with no global RNG state read or written;
* any chunk can be regenerated on its own, so a tensor is perturbed, restored and updated one
  chunk at a time: a direction never needs memory of the tensor's size (an embedding matrix's
  direction would otherwise be bigger than a forward pass's activations), and every pass sees
  the same numbers by construction, for every tensor size.

Distributions (all with E[z z^T] = I): ``gaussian``; ``rademacher`` (+-1, eight signs per random
byte, about three times cheaper than a Gaussian on a CPU, ten times dearer on a GPU); ``sphere`` (uniform on the sphere of
radius sqrt(numel) per tensor; needs one extra pass to find the norm).

Directions are drawn in float32 and cast to ``dtype``. By default they are drawn on the CPU and
moved to ``device``, so every rank and device type sees the same numbers; with
``draw_on_device=True`` they are drawn on ``device`` (much faster on a GPU; CPU and CUDA streams
differ).
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import lru_cache

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
#: Elements per independently seeded chunk when drawing on the CPU (256 KiB of float32: stays in
#: cache while in use).
CHUNK = 1 << 16
#: Elements per chunk when drawing on an accelerator, where each chunk costs kernel launches and
#: 16 MiB of transient memory is negligible.
DEVICE_CHUNK = 1 << 22

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


@lru_cache(maxsize=64)
def _stream_prefix(seed: int, step: int, query: int) -> int:
    key = 0
    for value in (seed, step, query):
        key = _splitmix64(key ^ (value & _MASK64))
    return key


def _prefix(seed: int, step: int, query: int, index: int) -> int:
    return _splitmix64(_stream_prefix(seed, step, query) ^ (index & _MASK64))


def derive_seed(seed: int, step: int, query: int = 0, index: int = 0, chunk: int = 0) -> int:
    """Mix ``(seed, step, query, index, chunk)`` into one 63-bit generator seed.

    Each field goes through SplitMix64 in turn, so neighbouring keys (step 3 vs 4, tensor 0 vs 1)
    give unrelated streams. The result fits ``torch.Generator.manual_seed``.
    """
    _check_key(seed, step, query, index, chunk)
    return _splitmix64(_prefix(seed, step, query, index) ^ chunk) >> 1


def _check_key(seed: int, step: int, query: int, index: int, chunk: int = 0) -> None:
    fields = (("seed", seed), ("step", step), ("query", query), ("index", index), ("chunk", chunk))
    for name, value in fields:
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}: {value!r}")
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")


def generator_for(
    seed: int, step: int, query: int = 0, index: int = 0, device: str | torch.device = "cpu"
) -> torch.Generator:
    """A fresh generator keyed by ``(seed, step, query, index)`` (chunk 0)."""
    gen = torch.Generator(device=device)
    gen.manual_seed(derive_seed(seed, step, query, index))
    return gen


_CPU = torch.device("cpu")
_SIGN_TABLES: dict[torch.device, torch.Tensor] = {}


def _sign_table(device: torch.device) -> torch.Tensor:
    """Row b holds the 8 signs 1 - 2 * bit_i(b), i = 0..7, for every byte value b."""
    table = _SIGN_TABLES.get(device)
    if table is None:
        bytes_ = torch.arange(256, dtype=torch.int64)[:, None]
        bits = (bytes_ >> torch.arange(8, dtype=torch.int64)) & 1
        table = _SIGN_TABLES[device] = (1.0 - 2.0 * bits).to(torch.float32).to(device)
    return table


def _draw(n: int, distribution: str, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    if distribution == "rademacher":
        # Each random byte picks its 8 fair signs from a 256 x 8 table: one draw and one gather
        # per 8 elements, several times faster than drawing Gaussians.
        index = torch.randint(
            0, 256, ((n + 7) // 8,), generator=gen, device=device, dtype=torch.int64
        )
        signs = torch.embedding(_sign_table(device), index).view(-1)
        return signs if signs.numel() == n else signs[:n]
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
    _check_key(seed, step, query, index)
    prefix = _prefix(seed, step, query, index)  # mixed once per tensor, then once per chunk
    device = torch.device(device)
    draw_device = device if draw_on_device else _CPU
    gen = torch.Generator(device=draw_device)
    cast = dtype != torch.float32 or draw_device != device
    size = CHUNK if draw_device.type == "cpu" else DEVICE_CHUNK
    kind = "gaussian" if distribution == "sphere" else distribution

    def chunks() -> Iterator[tuple[int, int, torch.Tensor]]:
        for k, start in enumerate(range(0, numel, size)):
            end = min(start + size, numel)
            gen.manual_seed(_splitmix64(prefix ^ k) >> 1)
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
        yield start, end, z.to(device=device, dtype=dtype) if cast else z


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
