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

Distributions (all with E[z z^T] = I): ``gaussian`` (chunk ``k`` drawn by torch's generator
seeded as above); ``rademacher`` (+-1, counter-based: element ``e`` of a tensor with key ``K`` is
-1 when bit ``e mod 64`` of the SplitMix64 word ``mix64(K + (e div 64 + 1) * GAMMA)`` is set, so
any range of it is computed directly, and the numbers are the same on every device type and
chunking; on the CPU :mod:`anyorder.core.native` applies it fused with the update, several times
cheaper than a Gaussian draw; on a GPU Gaussians are the cheaper); ``sphere`` (uniform on the
sphere of radius sqrt(numel) per tensor; needs one extra pass to find the norm).

Directions are drawn in float32 and cast to ``dtype``. By default they are drawn on the CPU and
moved to ``device``, so every rank and device type sees the same numbers; with
``draw_on_device=True`` they are drawn on ``device`` (much faster on a GPU; CPU and CUDA Gaussian
streams differ, Rademacher ones do not).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from functools import lru_cache

import torch

__all__ = [
    "DISTRIBUTIONS",
    "CHUNK",
    "derive_seed",
    "generator_for",
    "direction",
    "direction_chunks",
    "add_direction_",
    "add_directions_",
    "rademacher_words",
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


_GAMMA = 0x9E3779B97F4A7C15
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB
_BYTE_SHIFTS: dict[torch.device, torch.Tensor] = {}


def _int64(x: int) -> int:
    """The int64 with the same 64 bits as ``0 <= x < 2**64``."""
    return x - (1 << 64) if x >= 1 << 63 else x


def _shift_right(z: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 bit patterns (torch's ``>>`` is arithmetic)."""
    return (z >> s) & ((1 << (64 - s)) - 1)


def rademacher_words(key: int, first: int, count: int, device: torch.device) -> torch.Tensor:
    """Words ``first .. first + count - 1`` of the Rademacher stream keyed by ``key``: the
    SplitMix64 outputs ``mix64(key + (j + 1) * GAMMA)`` as int64 bit patterns (integer ops wrap
    modulo 2**64 in torch as in C, so this equals :mod:`anyorder.core.native`'s kernel)."""
    z = torch.arange(first + 1, first + count + 1, dtype=torch.int64, device=device)
    return _mix_(z.mul_(_int64(_GAMMA)).add_(_int64(key)))


def _mix_(z: torch.Tensor) -> torch.Tensor:
    """SplitMix64's output function, in place on int64 bit patterns."""
    z.bitwise_xor_(_shift_right(z, 30)).mul_(_int64(_MIX1))
    z.bitwise_xor_(_shift_right(z, 27)).mul_(_int64(_MIX2))
    return z.bitwise_xor_(_shift_right(z, 31))


#: Chunks whose words are computed together on the torch path (integer ops on a few thousand
#: words are bound by per-op overhead; 16 chunks of words are 128 KiB).
_WORD_BLOCK = 16


def _rademacher_chunks(
    key: int, numel: int, size: int, device: torch.device
) -> Iterator[tuple[int, int, torch.Tensor]]:
    """``(start, end, z[start:end])`` of the Rademacher direction keyed by ``key``, in chunks of
    ``size`` (a multiple of 64) elements; the words of :data:`_WORD_BLOCK` chunks at a time."""
    block = size * _WORD_BLOCK
    for block_start in range(0, numel, block):
        block_end = min(block_start + block, numel)
        first = block_start // 64
        words = rademacher_words(key, first, (block_end + 63) // 64 - first, device)
        for start in range(block_start, block_end, size):
            end = min(start + size, block_end)
            signs = _signs(words[start // 64 - first : (end + 63) // 64 - first])
            yield start, end, signs[: end - start]


def _signs(words: torch.Tensor) -> torch.Tensor:
    """The 64 signs of each word, in order (float32, 64 per word)."""
    device = words.device
    # Byte b of word j holds the signs of elements 64 j + 8 b .. 64 j + 8 b + 7 (bit i -> + i);
    # each byte picks its 8 signs from a 256 x 8 table.
    if sys.byteorder == "little":
        bytes_ = words.view(torch.uint8).long()
    else:
        shifts = _BYTE_SHIFTS.get(device)
        if shifts is None:
            shifts = torch.arange(0, 64, 8, dtype=torch.int64, device=device)
            _BYTE_SHIFTS[device] = shifts
        bytes_ = ((words.unsqueeze(-1) >> shifts) & 255).view(-1)
    return torch.embedding(_sign_table(device), bytes_).view(-1)


def _add_small_rademacher_(
    flats: list[torch.Tensor], alphas: list[float], decays: list[float], keys: list[int]
) -> None:
    """The torch path of a pass over many small float32/float64 tensors of one dtype and device:
    the words of all of them in one computation (one key per word), then one foreach update.
    Same numbers as one :func:`add_direction_` per tensor (``alpha * z`` is exact for z = +-1)."""
    device, dtype = flats[0].device, flats[0].dtype
    sizes = [(f.numel() + 63) // 64 for f in flats]
    counts = torch.tensor(sizes, dtype=torch.int64, device=device)
    starts = torch.cumsum(counts, 0) - counts
    total = sum(sizes)
    counters = torch.arange(1, total + 1, dtype=torch.int64, device=device)
    counters.sub_(torch.repeat_interleave(starts, counts, output_size=total))
    key_per_word = torch.tensor([_int64(k) for k in keys], dtype=torch.int64, device=device)
    z = counters.mul_(_int64(_GAMMA)).add_(
        torch.repeat_interleave(key_per_word, counts, output_size=total)
    )
    signs = _signs(_mix_(z)).to(dtype)
    pieces, offset = [], 0
    for f, size in zip(flats, sizes):
        pieces.append(signs[64 * offset : 64 * offset + f.numel()])
        offset += size
    if any(d != 1.0 for d in decays):
        torch._foreach_mul_(flats, decays)
    torch._foreach_add_(flats, torch._foreach_mul(pieces, alphas))


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
    cast = dtype != torch.float32 or draw_device != device
    size = CHUNK if draw_device.type == "cpu" else DEVICE_CHUNK

    def chunks() -> Iterator[tuple[int, int, torch.Tensor]]:
        if distribution == "rademacher":
            yield from _rademacher_chunks(prefix, numel, size, draw_device)
            return
        gen = torch.Generator(device=draw_device)  # Gaussian chunks, also for "sphere"
        for k, start in enumerate(range(0, numel, size)):
            end = min(start + size, numel)
            gen.manual_seed(_splitmix64(prefix ^ k) >> 1)
            yield (
                start,
                end,
                torch.randn(end - start, generator=gen, device=draw_device, dtype=torch.float32),
            )

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


def add_direction_(
    flat: torch.Tensor,
    alpha: float,
    seed: int,
    step: int,
    query: int = 0,
    index: int = 0,
    *,
    distribution: str = "gaussian",
    decay: float = 1.0,
    draw_on_device: bool = False,
) -> None:
    """``flat <- decay * flat + alpha * z`` in place, ``z`` the direction keyed by
    ``(seed, step, query, index)`` laid out over the 1-D ``flat`` (a :func:`flat_view`).

    This is the pass a zeroth-order step makes over each weight tensor (perturb, restore, update).
    Rademacher directions of float32/float64 CPU tensors go through the fused compiled kernel
    (:mod:`anyorder.core.native`) where it is available; everything else, chunk by chunk through
    :func:`direction_chunks`. Both give the same result to the bit.
    """
    if distribution == "rademacher" and flat.device.type == "cpu":
        from anyorder.core import native

        _check_key(seed, step, query, index)
        if native.rademacher_axpy_(flat, _prefix(seed, step, query, index), alpha, decay):
            return
    n = flat.numel()
    for start, end, z in direction_chunks(
        n,
        seed,
        step,
        query,
        index,
        distribution=distribution,
        dtype=flat.dtype,
        device=flat.device,
        draw_on_device=draw_on_device,
    ):
        chunk = flat if end - start == n else flat[start:end]
        if decay != 1.0:
            chunk.mul_(decay)
        chunk.add_(z, alpha=alpha)


def add_directions_(
    flats: Sequence[torch.Tensor],
    alphas: Sequence[float],
    seed: int,
    step: int,
    query: int,
    indices: Sequence[int],
    *,
    distributions: Sequence[str],
    decays: Sequence[float] | None = None,
    draw_on_device: bool = False,
) -> None:
    """:func:`add_direction_` over many tensors (tensor ``t`` with index ``indices[t]``): the
    Rademacher CPU ones in one call of the compiled kernel; without it, the small float32/float64
    ones in one batched torch computation; the rest one by one. A model's pass costs one call
    instead of one per tensor, which matters for models of many small tensors."""
    decays = [1.0] * len(flats) if decays is None else decays
    rest = range(len(flats))
    if flats and all(d == "rademacher" for d in distributions):
        from anyorder.core import native

        for index in indices:
            _check_key(seed, step, query, index)
        rest = native.rademacher_axpy_many_(
            list(flats),
            _stream_prefix(seed, step, query),
            list(indices),
            list(alphas),
            list(decays),
        )
        # Without the kernel: small float32/float64 tensors together, per dtype and device.
        batches: dict[tuple[torch.device, torch.dtype], list[int]] = {}
        for t in rest:
            flat = flats[t]
            if flat.dtype in (torch.float32, torch.float64) and flat.numel() <= CHUNK:
                batches.setdefault((flat.device, flat.dtype), []).append(t)
        for members in batches.values():
            _add_small_rademacher_(
                [flats[t] for t in members],
                [alphas[t] for t in members],
                [decays[t] for t in members],
                [_prefix(seed, step, query, indices[t]) for t in members],
            )
        done = {t for members in batches.values() for t in members}
        rest = [t for t in rest if t not in done]
    for t in rest:
        add_direction_(
            flats[t],
            alphas[t],
            seed,
            step,
            query,
            indices[t],
            distribution=distributions[t],
            decay=decays[t],
            draw_on_device=draw_on_device,
        )


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
