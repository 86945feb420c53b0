"""The one direction sampler: keyed, reproducible, with the right moments."""

import math

import pytest
import torch

from anyorder.core import native
from anyorder.core.rng import (
    CHUNK,
    DISTRIBUTIONS,
    _prefix,
    _rademacher_chunks,
    add_direction_,
    add_directions_,
    derive_seed,
    direction,
    direction_chunks,
    flat_view,
    rademacher_words,
)


def test_same_key_same_direction_and_no_global_rng_use():
    before = torch.get_rng_state()
    a = direction((5, 7), seed=3, step=11, query=2, index=4)
    b = direction((5, 7), seed=3, step=11, query=2, index=4)
    assert torch.equal(a, b)
    assert torch.equal(before, torch.get_rng_state())


@pytest.mark.parametrize("field", ["seed", "step", "query", "index"])
def test_neighbouring_keys_give_unrelated_directions(field):
    key = dict(seed=1, step=1, query=1, index=1)
    other = dict(key, **{field: 2})
    a = direction((10_000,), **key)
    b = direction((10_000,), **other)
    # Independent N(0,1) vectors: correlation ~ N(0, 1/n), so |corr| < 5/sqrt(n) w.h.p.
    corr = float(torch.dot(a, b) / (a.norm() * b.norm()))
    assert abs(corr) < 5 / math.sqrt(10_000)


def test_derive_seed_is_deterministic_and_fits_a_generator():
    s = derive_seed(2**40, 7, 3, 9)
    assert s == derive_seed(2**40, 7, 3, 9)
    assert 0 <= s < 2**63
    assert len({derive_seed(0, step) for step in range(1000)}) == 1000


@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
def test_moments_on_a_tensor_of_over_a_million_elements(distribution):
    n = 1_200_000
    z = direction((1000, 1200), seed=0, step=0, distribution=distribution).double().reshape(-1)
    assert z.numel() == n
    # E z = 0 and E z^2 = 1 for every distribution; bounds are 5 standard errors.
    assert abs(float(z.mean())) < 5 / math.sqrt(n)
    assert abs(float((z**2).mean()) - 1.0) < 5 * math.sqrt(2.0 / n)
    if distribution == "rademacher":
        assert set(z.unique().tolist()) == {-1.0, 1.0}
    if distribution == "sphere":
        assert float(z.norm()) == pytest.approx(math.sqrt(n), rel=1e-6)


def test_dtype_and_device_do_not_change_the_numbers():
    z32 = direction((64,), seed=5, step=1)
    z64 = direction((64,), seed=5, step=1, dtype=torch.float64)
    zbf = direction((64,), seed=5, step=1, dtype=torch.bfloat16)
    assert torch.allclose(z32.double(), z64, atol=1e-6)
    assert torch.equal(zbf, z32.to(torch.bfloat16))


def test_bad_input():
    with pytest.raises(ValueError, match="unknown distribution 'uniform'.*gaussian"):
        direction((3,), 0, 0, distribution="uniform")
    with pytest.raises(ValueError, match="step must be >= 0"):
        derive_seed(0, -1)
    with pytest.raises(TypeError, match="seed must be an int"):
        derive_seed(1.5, 0)


@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
def test_chunks_assemble_the_direction_and_can_be_replayed_one_by_one(distribution):
    n = 3 * CHUNK + 5
    whole = direction((n,), seed=2, step=3, query=1, index=4, distribution=distribution)
    parts = list(direction_chunks(n, 2, 3, 1, 4, distribution=distribution))
    assert [(s, e) for s, e, _ in parts] == [
        (0, CHUNK),
        (CHUNK, 2 * CHUNK),
        (2 * CHUNK, 3 * CHUNK),
        (3 * CHUNK, n),
    ]
    assert torch.equal(torch.cat([z for _, _, z in parts]), whole)
    if distribution == "gaussian":  # chunk k is the stream keyed by derive_seed(..., chunk=k)
        gen = torch.Generator().manual_seed(derive_seed(2, 3, 1, 4, chunk=1))
        assert torch.equal(torch.randn(CHUNK, generator=gen), parts[1][2])
    # Chunks are independent streams, not one stream cut up: chunk 1 differs from chunk 0.
    assert not torch.equal(parts[0][2][:5], parts[1][2][:5])


def test_flat_view_follows_memory_order():
    w = torch.randn(4, 3, 2, 2).to(memory_format=torch.channels_last)
    flat = flat_view(w)
    assert flat.data_ptr() == w.data_ptr()
    assert torch.equal(flat, w.permute(0, 2, 3, 1).reshape(-1))
    with pytest.raises(ValueError, match="is not dense"):
        flat_view(torch.randn(4, 4)[:, ::2])


# --- Rademacher: counter-based words, and the compiled kernel against the torch path -------------

_M64 = (1 << 64) - 1


def _splitmix_word(key: int, j: int) -> int:
    """Word j of the SplitMix64 stream from ``key``, in plain Python integers."""
    z = (key + (j + 1) * 0x9E3779B97F4A7C15) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def test_rademacher_words_are_splitmix64_in_plain_integers():
    key = _prefix(7, 3, 1, 5)
    words = rademacher_words(key, 1000, 50, torch.device("cpu"))
    assert [w & _M64 for w in words.tolist()] == [_splitmix_word(key, j) for j in range(1000, 1050)]


def test_rademacher_element_e_is_bit_e_mod_64_of_word_e_div_64():
    key = _prefix(1, 2, 0, 3)
    z = direction((300,), 1, 2, 0, 3, distribution="rademacher")
    expected = [-1.0 if (_splitmix_word(key, e // 64) >> (e % 64)) & 1 else 1.0 for e in range(300)]
    assert z.tolist() == expected


def test_rademacher_directions_do_not_depend_on_the_chunk_size():
    # Chunks of 64 and 128 elements cross word blocks (16 chunks) inside this tensor.
    key = _prefix(4, 4, 4, 4)
    n = 40 * 64 + 7
    expected = direction((n,), 4, 4, 4, 4, distribution="rademacher")
    for size in (64, 128, CHUNK):
        parts = list(_rademacher_chunks(key, n, size, torch.device("cpu")))
        assert parts[0][:2] == (0, min(size, n)) and parts[-1][1] == n
        assert torch.equal(torch.cat([z for _, _, z in parts]), expected), size


@pytest.mark.parametrize("n", [1, 31, 63, 64, 65, 1000, CHUNK + 7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("decay", [1.0, 0.97])
def test_fused_pass_equals_the_torch_pass_to_the_bit(n, dtype, decay, monkeypatch):
    if not native.available():
        pytest.skip(f"native kernel unavailable: {native.status()}")
    w = torch.randn(n, dtype=dtype, generator=torch.Generator().manual_seed(n))
    fused, reference = w.clone(), w.clone()
    add_direction_(fused, -0.37, 9, 2, 1, 4, distribution="rademacher", decay=decay)
    monkeypatch.setattr(native, "_load", lambda: None)  # force the chunked torch path
    add_direction_(reference, -0.37, 9, 2, 1, 4, distribution="rademacher", decay=decay)
    assert not torch.equal(fused, w)
    assert torch.equal(fused, reference)
    # ... which is decay * w + alpha * z with z = direction(...).
    z = direction((n,), 9, 2, 1, 4, distribution="rademacher", dtype=dtype)
    expected = w.clone()
    if decay != 1.0:
        expected.mul_(decay)
    assert torch.equal(fused, expected.add_(z, alpha=-0.37))


def test_fused_pass_declines_what_it_cannot_do():
    half = torch.zeros(100, dtype=torch.bfloat16)
    assert native.rademacher_axpy_(half, 1, 1.0) is False
    strided = torch.zeros(200)[::2]
    assert native.rademacher_axpy_(strided, 1, 1.0) is False
    assert torch.equal(strided, torch.zeros(100))
    # bfloat16 still gets the direction, through the torch path.
    add_direction_(half, 1.0, 0, 0, distribution="rademacher")
    assert torch.equal(
        half, direction((100,), 0, 0, distribution="rademacher", dtype=torch.bfloat16)
    )


@pytest.mark.parametrize("compiled", [True, False])
def test_a_pass_over_many_tensors_equals_one_pass_per_tensor(compiled, monkeypatch):
    if not compiled:
        monkeypatch.setattr(native, "_load", lambda: None)  # the batched torch path
    elif not native.available():
        pytest.skip(native.status())
    gen = torch.Generator().manual_seed(0)
    shapes = [
        (5, torch.float32),
        (70, torch.float64),
        (129, torch.bfloat16),
        (3, torch.float32),
        (CHUNK + 9, torch.float32),
        (64, torch.float64),
    ]
    tensors = [torch.randn(n, generator=gen).to(dtype) for n, dtype in shapes]
    tensors.append(torch.randn(40, generator=gen)[::2])  # strided: one by one
    indices = [0, 3, 4, 7, 8, 11, 9]
    alphas = [0.5, -1.0, 2.0, 1e-3, 0.3, -0.1, 0.25]
    decays = [1.0, 0.9, 1.0, 0.5, 0.99, 1.0, 0.8]
    together = [t.clone() for t in tensors]
    add_directions_(
        together, alphas, 6, 5, 2, indices, distributions=["rademacher"] * 7, decays=decays
    )
    for t, index, alpha, decay, result in zip(tensors, indices, alphas, decays, together):
        z = direction(t.shape, 6, 5, 2, index, distribution="rademacher", dtype=t.dtype)
        expected = t.clone()
        if decay != 1.0:
            expected.mul_(decay)
        expected.add_(z, alpha=alpha)
        assert torch.equal(result, expected), (index, t.dtype)
        assert not torch.equal(result, t)
