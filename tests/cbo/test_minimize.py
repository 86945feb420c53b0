"""``anyorder.cbo.minimize``: trajectory against the reference dynamics, reproducibility, budgets,
input handling and errors."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from anyorder.cbo import minimize
from anyorder.cbo.dynamics import consensus
from anyorder.cbo.functions import ackley, rastrigin, sphere


def _reference_run(x0: torch.Tensor, f, iters: int, alpha: float, factor: float, seed: int):
    """CBO written out plainly (anisotropic noise, all particles interacting), replaying the
    generator the way minimize draws from it: one float32 (n, d) normal tensor per iteration."""
    lam, sigma, dt = 1.0, 0.8, 0.1
    gen = torch.Generator().manual_seed(seed)
    x = x0.clone()
    centres = []
    for _ in range(iters):
        w = torch.exp(-alpha * (f(x) - f(x).min()))
        centre = (w[:, None] * x).sum(0) / w.sum()
        xi = torch.randn(x.shape, generator=gen).double()
        x = x - lam * dt * (x - centre) + sigma * math.sqrt(dt) * (x - centre) * xi
        centres.append(centre)
        alpha *= factor
    return centres


def test_trajectory_equals_the_reference_dynamics() -> None:
    x0 = torch.as_tensor(np.random.default_rng(0).uniform(-3, 3, (40, 5)))
    result = minimize(
        rastrigin, x0, lam=1.0, sigma=0.8, dt=0.1, alpha=2.0, alpha_factor=1.1, max_iters=25,
        noise="anisotropic", tol=0.0, seed=11, batch_size=None, record_every=1,
    )  # fmt: skip
    expected = _reference_run(x0, rastrigin, 25, 2.0, 1.1, 11)
    assert result.nit == 25
    for got, want in zip(result.history["consensus"], expected):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    assert result.history["alpha"][:3] == pytest.approx([2.0, 2.2, 2.42])
    torch.testing.assert_close(result.x, expected[-1], rtol=1e-10, atol=1e-10)


def test_first_consensus_is_the_consensus_of_the_initial_particles() -> None:
    x0 = torch.as_tensor(np.random.default_rng(1).uniform(-2, 2, (30, 4)))
    result = minimize(sphere, x0, alpha=3.0, max_iters=1)
    torch.testing.assert_close(result.history["consensus"][0], consensus(x0, sphere(x0), 3.0)[0])


def test_seeded_runs_are_reproducible_and_seeds_differ() -> None:
    kwargs = dict(bounds=[(-3.0, 3.0)] * 6, n_particles=50, max_iters=60, batch_size=5)
    a = minimize(ackley, seed=3, **kwargs)
    b = minimize(ackley, seed=3, **kwargs)
    c = minimize(ackley, seed=4, **kwargs)
    assert torch.equal(a.x, b.x) and a.fun == b.fun
    assert torch.equal(a.history["consensus"], b.history["consensus"])
    assert a.history["energy"] == b.history["energy"]
    assert not torch.equal(a.x, c.x)


def test_vectorize_false_gives_the_same_run() -> None:
    x0 = torch.as_tensor(np.random.default_rng(2).uniform(-3, 3, (25, 3)))
    batched = minimize(rastrigin, x0, max_iters=30, seed=5, batch_size=4)
    single = minimize(lambda p: float(rastrigin(p)), x0, max_iters=30, seed=5, batch_size=4,
                      vectorize=False)  # fmt: skip
    torch.testing.assert_close(batched.x, single.x)
    assert batched.nfev == single.nfev == 30 * 25 + 1


@pytest.mark.parametrize("fn", [rastrigin, ackley], ids=["rastrigin", "ackley"])
def test_finds_the_global_minimiser_in_five_dimensions(fn) -> None:
    result = minimize(fn, bounds=[(-3.0, 3.0)] * 5, n_particles=100, batch_size=5, seed=0,
                      max_iters=400)  # fmt: skip
    assert float(result.x.abs().max()) < 0.05, result.x
    assert result.fun < 0.1 and result.success


def test_numpy_in_numpy_out_and_bounds() -> None:
    seen = []

    def f(points):
        seen.append(type(points))
        return (points**2).sum(axis=1)

    result = minimize(f, np.full(3, 0.5), bounds=[(-2.0, 3.0)] * 3, max_iters=300, init_std=2.0)
    assert isinstance(result.x, np.ndarray) and isinstance(result.best_x, np.ndarray)
    assert set(seen) == {np.ndarray}
    assert float(np.abs(result.x).max()) < 0.1
    json.dumps(result.to_dict())  # serialisable


def test_initial_particles_respect_bounds() -> None:
    x_first = []

    def f(points):
        if not x_first:
            x_first.append(points.clone())
        return points.sum(-1)

    minimize(f, bounds=[(-1.0, 0.0), (5.0, 6.0)], n_particles=200, max_iters=1)
    x = x_first[0]
    assert x.shape == (200, 2)
    assert bool((x[:, 0] >= -1).all() and (x[:, 0] <= 0).all())
    assert bool((x[:, 1] >= 5).all() and (x[:, 1] <= 6).all())


def test_stops_on_spread_and_on_maxfev() -> None:
    result = minimize(sphere, bounds=[(-1.0, 1.0)] * 2, n_particles=20, tol=1e-8, max_iters=5000)
    assert result.nit < 5000 and "spread" in result.message
    assert result.history["variance"][-1] < 1e-8
    budget = minimize(sphere, bounds=[(-1.0, 1.0)] * 2, n_particles=20, maxfev=205, tol=0.0)
    assert budget.nfev <= 205 and budget.nit == 10 and "maxfev" in budget.message


def test_stops_when_the_consensus_energy_stalls() -> None:
    result = minimize(sphere, bounds=[(-1.0, 1.0)] * 2, n_particles=20, batch_size=None,
                      tol=0.0, ftol=1e-9, patience=20, max_iters=5000, record_every=1)  # fmt: skip
    assert result.nit < 5000 and "consensus energy" in result.message
    energy = result.history["energy"]
    assert abs(energy[-1] - energy[-21]) <= 1e-9 * (1 + abs(energy[-1]))
    with pytest.raises(ValueError, match="patience must be a positive integer"):
        minimize(sphere, bounds=[(-1.0, 1.0)], patience=0)


def test_recording_less_often_does_not_change_the_run() -> None:
    kwargs = dict(bounds=[(-3.0, 3.0)] * 4, n_particles=40, max_iters=57, seed=2, tol=0.0)
    every = minimize(rastrigin, record_every=1, **kwargs)
    sparse = minimize(rastrigin, record_every=10, **kwargs)
    assert torch.equal(every.x, sparse.x) and every.fun == sparse.fun
    assert sparse.history["iteration"] == [0, 10, 20, 30, 40, 50, 56]
    rows = every.history["consensus"][[0, 10, 20, 30, 40, 50, 56]]
    torch.testing.assert_close(sparse.history["consensus"], rows, rtol=0, atol=0)
    assert sparse.nfev == every.nfev == 57 * 40 + 1


def test_callback_can_stop_the_run() -> None:
    calls = []

    def callback(centre: torch.Tensor) -> bool:
        calls.append(centre)
        return len(calls) == 3

    result = minimize(sphere, bounds=[(-1.0, 1.0)] * 2, callback=callback, max_iters=100,
                      record_every=1)  # fmt: skip
    assert result.nit == 3 and "callback" in result.message


def test_non_finite_values_never_win_and_all_non_finite_fails() -> None:
    def holes(points):
        values = (points**2).sum(-1)
        return torch.where(points[:, 0] > 0, torch.full_like(values, float("nan")), values)

    result = minimize(holes, bounds=[(-2.0, 2.0)] * 2, n_particles=60, max_iters=100)
    assert math.isfinite(result.best_fun)
    failed = minimize(lambda p: torch.full((p.shape[0],), float("inf")), bounds=[(0.0, 1.0)])
    assert not failed.success and "non-finite" in failed.message


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(noise="cauchy"), "noise must be one of"),
        (dict(n_particles=0), "n_particles must be a positive integer"),
        (dict(alpha=-1.0), "alpha must be a number > 0"),
        (dict(dt=0.0), "dt must be a finite number > 0"),
        (dict(sigma=float("nan")), "sigma must be a finite number >= 0"),
        (dict(batch_size=0), "batch_size must be a positive integer"),
        (dict(maxfev=0), "maxfev must be a positive integer"),
        (dict(bounds=[(1.0, 0.0)]), "low < high"),
        (dict(bounds=None), "give x0"),
    ],
)
def test_bad_input_is_a_clear_error(kwargs, match) -> None:
    kwargs = {"bounds": [(-1.0, 1.0)] * 2, **kwargs}
    with pytest.raises(ValueError, match=match):
        minimize(sphere, **kwargs)


def test_wrong_number_of_values_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="f returned 1 values for 200 points"):
        minimize(lambda p: p.sum(), bounds=[(-1.0, 1.0)] * 2)
    with pytest.raises(TypeError, match="f must be callable"):
        minimize(3, bounds=[(-1.0, 1.0)])
