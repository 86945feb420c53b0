"""The CBO dynamics against their definitions and a plain per-particle reference of the update."""

from __future__ import annotations

import math

import pytest
import torch

from anyorder.cbo.dynamics import (
    batch_consensus,
    cbo_update_,
    consensus,
    particle_variance,
    random_batch_step,
    sanitize_energies,
)
from anyorder.cbo.functions import FUNCTIONS


def _definition(x: torch.Tensor, energies: torch.Tensor, alpha: float) -> torch.Tensor:
    """x̄ = Σ x_i exp(-α f_i) / Σ exp(-α f_i), literally (safe only for small α f)."""
    w = torch.exp(-alpha * energies)
    return (w[:, None] * x).sum(0) / w.sum()


def test_consensus_equals_its_definition() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(50, 7, generator=gen, dtype=torch.float64)
    energies = torch.rand(50, generator=gen, dtype=torch.float64) * 3
    for alpha in (0.0, 0.5, 4.0):
        centre, weights = consensus(x, energies, alpha)
        torch.testing.assert_close(centre, _definition(x, energies, alpha), rtol=1e-13, atol=1e-13)
        assert float(weights.sum()) == pytest.approx(1.0, abs=1e-14)
    # alpha = 0 is the plain mean
    torch.testing.assert_close(consensus(x, energies, 0.0)[0], x.mean(0), rtol=1e-13, atol=1e-13)


def test_consensus_survives_energies_that_overflow_a_naive_exp() -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(40, 5, generator=gen, dtype=torch.float64)
    energies = 1e4 + torch.rand(40, generator=gen, dtype=torch.float64)
    alpha = 50.0  # alpha * f = 5e5: exp underflows to 0 for every particle, 0 / 0 = nan
    assert torch.isnan(_definition(x, energies, alpha)).all()
    centre, _ = consensus(x, energies, alpha)
    # the definition is invariant to shifting f; with the shift it is safe to evaluate literally
    # (alpha * f rounds at 5e5 * 1.1e-16 ~ 6e-11 relative: that is the tolerance's scale)
    expected = _definition(x, energies - energies.min(), alpha)
    torch.testing.assert_close(centre, expected, rtol=1e-9, atol=1e-9)
    # negative energies large enough to overflow exp(+) too
    centre_neg, _ = consensus(x, -energies, alpha)
    torch.testing.assert_close(
        centre_neg, _definition(x, -energies + energies.max(), alpha), rtol=1e-9, atol=1e-9
    )


def test_alpha_to_infinity_picks_the_best_particle() -> None:
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(30, 4, generator=gen, dtype=torch.float64)
    energies = torch.rand(30, generator=gen, dtype=torch.float64)
    best = x[int(energies.argmin())]
    torch.testing.assert_close(consensus(x, energies, math.inf)[0], best)
    torch.testing.assert_close(consensus(x, energies, 1e9)[0], best)
    # and a weaker alpha does not
    assert not torch.allclose(consensus(x, energies, 1.0)[0], best)


def test_non_finite_energies_get_zero_weight() -> None:
    x = torch.tensor([[0.0, 0.0], [1.0, 1.0], [5.0, 5.0], [7.0, 7.0]], dtype=torch.float64)
    energies = sanitize_energies(
        torch.tensor([1.0, 1.0, float("nan"), float("-inf")], dtype=torch.float64)
    )
    centre, weights = consensus(x, energies, 3.0)
    torch.testing.assert_close(centre, torch.tensor([0.5, 0.5], dtype=torch.float64))
    assert weights[2:].tolist() == [0.0, 0.0]


def _reference_step(
    x: torch.Tensor,
    centres: torch.Tensor,
    lam: float,
    sigma: float,
    dt: float,
    noise: str,
    xi: torch.Tensor,
) -> torch.Tensor:
    """Pinnau et al. (isotropic) / Carrillo et al. 2021 (anisotropic), one particle at a time."""
    out = torch.empty_like(x)
    for i in range(x.shape[0]):
        diff = x[i] - centres[i]
        if noise == "isotropic":
            kick = torch.sqrt((diff**2).sum()) * xi[i]
        else:
            kick = diff * xi[i]
        out[i] = x[i] - lam * dt * diff + sigma * math.sqrt(dt) * kick
    return out


@pytest.mark.parametrize("noise", ["isotropic", "anisotropic"])
def test_one_step_equals_the_reference_update(noise: str) -> None:
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(20, 6, generator=gen, dtype=torch.float64) * 2
    energies = FUNCTIONS["rastrigin"](x)
    centre, _ = consensus(x, energies, 2.0)
    lam, sigma, dt = 1.3, 0.7, 0.05
    # the noise the update draws: one (n, d) standard normal tensor from the generator
    xi = torch.randn(x.shape, generator=torch.Generator().manual_seed(9)).double()
    expected = _reference_step(x, centre.expand_as(x), lam, sigma, dt, noise, xi)
    got = cbo_update_(
        x.clone(), centre, lam * dt, sigma * math.sqrt(dt), noise, torch.Generator().manual_seed(9)
    )
    torch.testing.assert_close(got, expected, rtol=1e-13, atol=1e-13)


def test_per_coordinate_coefficients_equal_scalar_ones_coordinatewise() -> None:
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(10, 6, generator=gen, dtype=torch.float64)
    centre = x.mean(0)
    drift = torch.tensor([0.1] * 3 + [0.2] * 3, dtype=torch.float64)
    noise = torch.tensor([0.3] * 3 + [0.05] * 3, dtype=torch.float64)
    for kind in ("anisotropic", "isotropic"):
        got = cbo_update_(x.clone(), centre, drift, noise, kind, torch.Generator().manual_seed(5))
        first = cbo_update_(x.clone(), centre, 0.1, 0.3, kind, torch.Generator().manual_seed(5))
        second = cbo_update_(x.clone(), centre, 0.2, 0.05, kind, torch.Generator().manual_seed(5))
        torch.testing.assert_close(got[:, :3], first[:, :3], rtol=1e-14, atol=1e-14)
        torch.testing.assert_close(got[:, 3:], second[:, 3:], rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("n,batch", [(12, 4), (13, 4), (10, 3), (7, 1)])
def test_random_batches_partition_the_particles(n: int, batch: int) -> None:
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(n, 3, generator=gen, dtype=torch.float64)
    energies = torch.rand(n, generator=gen, dtype=torch.float64)
    targets = batch_consensus(x, energies, 5.0, batch, torch.Generator().manual_seed(7))
    # the same permutation, rebuilt here: groups of `batch` consecutive entries
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(7))
    for start in range(0, n, batch):
        members = perm[start : start + batch]
        expected = _definition(x[members], energies[members], 5.0)
        for i in members.tolist():
            torch.testing.assert_close(targets[i], expected, rtol=1e-12, atol=1e-12)


def test_batch_of_one_is_no_drift() -> None:
    x = torch.randn(5, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    targets = batch_consensus(x, torch.rand(5, dtype=torch.float64), 1.0, 1, torch.Generator())
    torch.testing.assert_close(targets, x)


def test_particle_variance_is_the_mean_squared_distance() -> None:
    x = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 4.0]], dtype=torch.float64)
    centre = torch.tensor([0.0, 0.0], dtype=torch.float64)
    assert float(particle_variance(x, centre)) == pytest.approx((0 + 4 + 16) / 3)


def test_unknown_noise_is_a_clear_error() -> None:
    x = torch.zeros(3, 2)
    with pytest.raises(ValueError, match="noise must be one of isotropic, anisotropic"):
        cbo_update_(x, x.mean(0), 0.1, 0.1, "gaussian", torch.Generator())


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_test_functions_vanish_at_their_minimiser_and_nowhere_near(name: str) -> None:
    fn = FUNCTIONS[name]
    for dim in (2, 10, 30):
        x_star = fn.minimiser(dim)
        assert abs(float(fn(x_star)) - fn.minimum) < 1e-9
        gen = torch.Generator().manual_seed(dim)
        around = x_star + 0.05 * torch.randn(64, dim, generator=gen, dtype=torch.float64)
        assert bool((fn(around) > fn.minimum).all())
        assert fn(around).shape == (64,)


@pytest.mark.parametrize("noise", ["isotropic", "anisotropic"])
def test_random_batch_step_is_batch_consensus_then_cbo_update(noise: str) -> None:
    # The fast path (reorder, contiguous groups) against the plain definition: per-particle
    # consensus of each random group, then one Euler-Maruyama step; rows in permuted order.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(12, 5, generator=g, dtype=torch.float64)
    energies = torch.rand(12, generator=g, dtype=torch.float64)
    fast = random_batch_step(
        x.clone(), energies, 3.0, 4, 0.1, 0.7, noise, torch.Generator().manual_seed(5)
    )
    gen = torch.Generator().manual_seed(5)
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(5))
    targets = batch_consensus(x, energies, 3.0, 4, gen)  # draws the same permutation first
    want = cbo_update_(x[perm].clone(), targets[perm], 0.1, 0.7, noise, gen)
    torch.testing.assert_close(fast, want, rtol=1e-12, atol=1e-12)
