"""CBXpy's settings given to ``anyorder.cbo.minimize`` give CBXpy's algorithm: fixed ``alpha``, one
consensus for all particles (``batch_size=None``), anisotropic noise; the same iterates as CBXpy's
own ``cbx.dynamics.CBO`` fed the same normal draws, and as the rule written out here."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from anyorder.cbo import minimize
from anyorder.cbo.functions import ackley

CBXPY = dict(alpha=1e5, sigma=8.0, dt=0.01, lam=1.0, noise="anisotropic", n_particles=100)
STEPS = 40


def _draws(seed: int, shape: tuple[int, int]) -> list[torch.Tensor]:
    """The normal draws minimize makes with ``batch_size=None``: one float32 ``(n, d)`` tensor per
    iteration from a generator seeded with ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen).double() for _ in range(STEPS)]


def _start(d: int = 20) -> torch.Tensor:
    return torch.as_tensor(np.random.default_rng(3).uniform(-3, 3, (CBXPY["n_particles"], d)))


def _anyorder_centres(x0: torch.Tensor) -> torch.Tensor:
    settings = {k: v for k, v in CBXPY.items() if k != "n_particles"}
    result = minimize(ackley, x0, batch_size=None, max_iters=STEPS, record_every=1, tol=0.0,
                      seed=5, **settings)  # fmt: skip
    assert set(result.history["alpha"]) == {1e5}  # an explicit alpha is not annealed
    return result.history["consensus"]


def test_cbxpy_settings_follow_the_rule_written_out() -> None:
    x = _start()
    centres = []
    lam, sigma, dt, alpha = CBXPY["lam"], CBXPY["sigma"], CBXPY["dt"], CBXPY["alpha"]
    for xi in _draws(5, tuple(x.shape)):
        energy = ackley(x)
        w = torch.exp(-alpha * (energy - energy.min()))
        centre = (w[:, None] * x).sum(0) / w.sum()
        drift = x - centre
        x = x - lam * dt * drift + sigma * math.sqrt(dt) * drift * xi
        centres.append(centre)
    torch.testing.assert_close(_anyorder_centres(_start()), torch.stack(centres), rtol=1e-9,
                               atol=1e-9)  # fmt: skip


def test_cbxpy_settings_give_cbxpys_iterates() -> None:
    cbx_dynamics = pytest.importorskip("cbx.dynamics")
    x0 = _start()
    draws = [xi.numpy()[None] for xi in _draws(5, tuple(x0.shape))]
    calls = iter(draws)

    def sampler(size: tuple[int, ...]) -> np.ndarray:
        assert tuple(size) == draws[0].shape
        return next(calls)

    def f(x: np.ndarray) -> np.ndarray:  # CBXpy's (M, N, d) -> (M, N)
        return ackley(torch.as_tensor(x.reshape(-1, x.shape[-1]))).numpy().reshape(x.shape[:2])

    dyn = cbx_dynamics.CBO(f, f_dim="3D", x=x0.numpy()[None].copy(), alpha=CBXPY["alpha"],
                           sigma=CBXPY["sigma"], dt=CBXPY["dt"], lamda=CBXPY["lam"],
                           noise="anisotropic", sampler=sampler, max_it=STEPS, verbosity=0,
                           check_f_dims=False)  # fmt: skip
    centres = []
    for _ in range(STEPS):
        dyn.step()  # no scheduler: alpha stays fixed, as CBXpy's optimize(sched=None)
        centres.append(torch.as_tensor(np.array(dyn.consensus)).reshape(-1))
    torch.testing.assert_close(_anyorder_centres(x0), torch.stack(centres), rtol=1e-9, atol=1e-9)
