"""trace(method="neyman"): stratified Hutchinson with a pilot per block and Neyman allocation."""

import math

import pytest
import torch
import torch.nn.functional as F

from anyorder.hessian import Hessian, trace
from anyorder.hessian.operators import MatrixOperator


def _lopsided(seed: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    """Three 30-wide blocks: block 0 holds nearly all the within-block spread (and a large
    diagonal, so a sample that forgot to remove the pilot direction would be biased by about
    ``q^T A_00 q ~ 20``); large blocks between the layers, as in a network Hessian."""
    g = torch.Generator().manual_seed(seed)
    n, k = 30, 3
    a = 2 * torch.randn(k * n, k * n, generator=g, dtype=torch.float64)
    a = a + a.T
    scale = torch.tensor([3.0, 0.3, 0.3], dtype=torch.float64)
    for b in range(k):
        s = slice(b * n, (b + 1) * n)
        d = torch.randn(n, n, generator=g, dtype=torch.float64)
        a[s, s] = scale[b] * (d + d.T)
    a[:n, :n] += 20 * torch.eye(n, dtype=torch.float64)
    return a, torch.arange(k * n) // n


def _runs(a: torch.Tensor, labels: torch.Tensor, method: str, matvecs: int, seeds: int = 300):
    op = MatrixOperator(a)
    return [trace(op, method=method, matvecs=matvecs, seed=s, blocks=labels) for s in range(seeds)]


def test_neyman_is_unbiased_with_an_honest_stderr_and_beats_equal_allocation():
    a, labels = _lopsided()
    truth = float(a.trace())
    ests = _runs(a, labels, "neyman", 24)
    x = torch.tensor([e.estimate for e in ests])
    assert all(e.matvecs == 24 and len(e.samples) == 21 for e in ests)  # 3 pilots + 21 samples
    assert abs(float(x.mean()) - truth) < 4 * float(x.std()) / math.sqrt(len(ests))
    z = torch.tensor([(e.estimate - truth) / e.stderr for e in ests])
    assert abs(float(z.mean())) < 0.3 and 0.75 < float(z.std()) < 1.35
    # Equal allocation (8 samples of 3 products) against Neyman (about 17, 2, 2 samples):
    # predicted variance ratio (sum_g sqrt v_g)^2 / 21 : 3 sum_g v_g / 24, about 0.55 here.
    blocks = torch.tensor([e.estimate for e in _runs(a, labels, "blocks", 24)])
    mse = {k: float(((v - truth) ** 2).mean()) for k, v in (("neyman", x), ("blocks", blocks))}
    assert mse["neyman"] < 0.75 * mse["blocks"]


def test_neyman_is_exact_on_one_wide_blocks_and_merges_blocks_for_small_budgets():
    g = torch.Generator().manual_seed(2)
    a = torch.randn(4, 4, generator=g, dtype=torch.float64)
    a = a + a.T
    est = trace(MatrixOperator(a), method="neyman", matvecs=8, blocks=torch.arange(4))
    assert est.matvecs == 4 and est.samples == () and est.stderr == 0.0
    assert math.isclose(est.estimate, float(a.trace()), rel_tol=1e-12, abs_tol=1e-12)
    b, labels = _lopsided()
    few = trace(MatrixOperator(b), method="neyman", matvecs=4, blocks=labels)  # 2 groups
    assert few.matvecs == 4 and len(few.samples) == 2


def test_neyman_on_a_model_hessian(mlp_problem):
    model, batch, exact, _ = mlp_problem
    op = Hessian(model, F.cross_entropy, batch)
    truth = float(exact.trace())
    ests = [trace(op, method="neyman", matvecs=30, seed=s) for s in range(40)]
    assert all(e.matvecs == 30 and e.method == "neyman" for e in ests)
    x = torch.tensor([e.estimate for e in ests])
    assert abs(float(x.mean()) - truth) < 4 * float(x.std()) / math.sqrt(len(ests))
    assert trace(op, method="neyman", matvecs=30, seed=3) == ests[3]  # same seed, same numbers


def test_neyman_rtol_stops_early_on_the_same_probes(mlp_problem):
    model, batch, exact, _ = mlp_problem
    op = Hessian(model, F.cross_entropy, batch)
    full = trace(op, method="neyman", matvecs=300, seed=1)
    est = trace(op, method="neyman", matvecs=300, seed=1, rtol=0.1)
    assert est.matvecs < full.matvecs
    assert est.stderr <= 0.1 * abs(est.estimate) and len(est.samples) >= 4
    assert est.samples == full.samples[: len(est.samples)]
    assert abs(est.estimate - float(exact.trace())) <= 4 * est.stderr
    batched = trace(op, method="neyman", matvecs=300, seed=1, block=4)
    assert batched.matvecs == 300
    assert torch.allclose(torch.tensor(batched.samples), torch.tensor(full.samples), rtol=1e-6)


def test_neyman_validation():
    op = MatrixOperator(torch.eye(4, dtype=torch.float64))
    with pytest.raises(ValueError, match="matvecs must be an integer >= 2 for neyman, got 1"):
        trace(op, method="neyman", matvecs=1)
    with pytest.raises(ValueError, match=r"blocks must be a tensor of shape \(4,\)"):
        trace(op, method="neyman", blocks=torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="blocks applies to method='blocks' or 'neyman' only"):
        trace(op, method="hutch++", blocks=torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="distribution must be 'rademacher' or 'gaussian'"):
        trace(op, method="neyman", distribution="uniform")
