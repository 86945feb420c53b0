"""The one direction sampler: keyed, reproducible, with the right moments."""

import math

import pytest
import torch

from anyorder.core.rng import (
    CHUNK,
    DISTRIBUTIONS,
    derive_seed,
    direction,
    direction_chunks,
    flat_view,
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
