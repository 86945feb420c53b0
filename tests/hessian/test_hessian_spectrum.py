"""Eigenvalues, trace and density against the exact spectrum of a small model's dense Hessian."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import make_data, make_mlp

from anyorder.hessian import (
    Hessian,
    MatrixOperator,
    Spectrum,
    TraceEstimate,
    density,
    eigenvalues,
    lanczos,
    trace,
)


def test_top5_eigenvalues_to_1e4_relative(mlp_problem):
    model, batch, exact, evals = mlp_problem
    op = Hessian(model, F.cross_entropy, batch)
    spec = eigenvalues(op, k=5, tol=1e-5, return_eigenvectors=True)
    want = evals.flip(0)[:5]
    got = torch.tensor(spec.eigenvalues, dtype=torch.float64)
    assert spec.converged and spec.which == "largest"
    assert ((got - want).abs() / want.abs()).max() < 1e-4
    assert spec.matvecs == spec.iterations < 200  # Lanczos: one product per step
    # eigenvectors: unit norm, Rayleigh quotient equals the eigenvalue, small residual
    vecs = spec.eigenvectors
    assert vecs.shape == (5, op.size)
    assert torch.allclose(vecs.norm(dim=1), torch.ones(5, dtype=vecs.dtype), atol=1e-8)
    resid = (vecs @ exact - got[:, None] * vecs).norm(dim=1)
    assert (resid <= 1e-4 * got.abs() + 1e-10).all()


def test_gap_rule_meets_tol_in_fewer_steps_than_the_residual_rule(mlp_problem):
    model, batch, _, evals = mlp_problem
    op = Hessian(model, F.cross_entropy, batch)
    want = evals.flip(0)[:3]
    for tol in (1e-3, 1e-6):
        fast = eigenvalues(op, k=3, tol=tol)
        strict = eigenvalues(op, k=3, tol=tol, return_eigenvectors=True)  # residual <= tol
        got = torch.tensor(fast.eigenvalues, dtype=torch.float64)
        assert fast.converged and ((got - want).abs() / want.abs()).max() <= tol
        assert fast.iterations < strict.iterations
        assert max(r / abs(e) for r, e in zip(strict.residuals, strict.eigenvalues)) <= tol


def test_smallest_eigenvalue_to_1e4_relative(mlp_problem):
    model, batch, _, evals = mlp_problem
    assert evals[0] < 0  # the test is only meaningful with negative curvature
    op = Hessian(model, F.cross_entropy, batch)
    spec = eigenvalues(op, k=2, which="smallest", tol=1e-5)
    got = torch.tensor(spec.eigenvalues, dtype=torch.float64)
    assert ((got - evals[:2]).abs() / evals[:2].abs()).max() < 1e-4
    mag = eigenvalues(op, k=1, which="magnitude", tol=1e-6).eigenvalues[0]
    assert math.isclose(mag, float(evals[evals.abs().argmax()]), rel_tol=1e-5)


def test_float32_model_and_invariant_subspace():
    model, batch = make_mlp(dtype=torch.float32), make_data(dtype=torch.float32)
    exact64 = torch.linalg.eigvalsh(Hessian(make_mlp(), F.cross_entropy, make_data()).to_dense())
    spec = eigenvalues(Hessian(model, F.cross_entropy, batch), k=3, tol=1e-4)
    got = torch.tensor(spec.eigenvalues, dtype=torch.float64)
    assert ((got - exact64.flip(0)[:3]).abs() / exact64.flip(0)[:3]).max() < 1e-3
    # A rank-3 matrix: Lanczos stops at the invariant subspace with exact values.
    g = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(50, 3, generator=g, dtype=torch.float64))
    a = (u * torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64)) @ u.T
    spec = eigenvalues(MatrixOperator(a), k=3)
    assert spec.converged and spec.iterations <= 4
    assert torch.allclose(torch.tensor(spec.eigenvalues), torch.tensor([3.0, 2.0, 1.0]), atol=1e-10)


def test_same_seed_same_numbers(mlp_problem):
    model, batch, _, _ = mlp_problem
    op = Hessian(model, F.cross_entropy, batch)
    a = trace(op, matvecs=12, seed=3)
    b = trace(op, matvecs=12, seed=3)
    c = trace(op, matvecs=12, seed=4)
    assert a == b and a.samples != c.samples
    assert eigenvalues(op, 2, seed=1, tol=1e-3) == eigenvalues(op, 2, seed=1, tol=1e-3)


@pytest.mark.parametrize("method", ["hutchinson", "hutch++", "blocks"])
def test_trace_within_three_standard_errors(mlp_problem, method):
    model, batch, exact, _ = mlp_problem
    op = Hessian(model, F.cross_entropy, batch)
    est = trace(op, method=method, matvecs=60, seed=0)
    truth = float(exact.trace())
    assert est.matvecs == 60 and est.method == method  # blocks: 3 layers, 20 samples
    assert abs(est.estimate - truth) <= 3 * est.stderr
    if method == "hutchinson":  # Var(z^T A z) = 2 (||A||_F^2 - sum a_ii^2) for Rademacher z
        theory = math.sqrt(2 * float((exact**2).sum() - (exact.diag() ** 2).sum()) / 60)
        assert 0.67 < est.stderr / theory < 1.5
    assert math.isclose(est.estimate, sum(est.samples) / len(est.samples), rel_tol=1e-12)


def test_hutchinson_stderr_is_honest_over_seeds():
    # Over many seeds the z-scores (estimate - truth) / stderr have spread about one.
    g = torch.Generator().manual_seed(5)
    a = torch.randn(80, 80, generator=g, dtype=torch.float64)
    op = MatrixOperator(a + a.T)
    truth = float((a + a.T).trace())
    z = torch.tensor(
        [
            (e.estimate - truth) / e.stderr
            for e in (trace(op, method="hutchinson", matvecs=40, seed=s) for s in range(300))
        ]
    )
    assert abs(float(z.mean())) < 0.25 and 0.8 < float(z.std()) < 1.25


def test_hutchpp_has_lower_variance_than_hutchinson_at_equal_matvecs():
    g = torch.Generator().manual_seed(1)
    n = 300
    u, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    lam = 1.0 / torch.arange(1, n + 1, dtype=torch.float64) ** 2  # decaying spectrum
    op = MatrixOperator((u * lam) @ u.T)
    truth = float(lam.sum())
    errs = {}
    for method in ("hutchinson", "hutch++"):
        est = torch.tensor(
            [trace(op, method=method, matvecs=30, seed=s).estimate for s in range(100)]
        )
        errs[method] = float(((est - truth) ** 2).mean())
        assert abs(float(est.mean()) - truth) < 4 * float(est.std()) / 10  # unbiased
    assert errs["hutch++"] < 0.05 * errs["hutchinson"]


def test_density_integrates_to_one_and_matches_the_exact_spectrum(mlp_problem):
    model, batch, _, evals = mlp_problem
    op = Hessian(model, F.cross_entropy, batch)
    sigma = 0.005 * float(evals.max() - evals.min())
    dens = density(op, n_vectors=8, steps=60, sigma=sigma, seed=0)
    grid, values = torch.tensor(dens.grid), torch.tensor(dens.values)
    assert math.isclose(float(torch.trapezoid(values, grid)), 1.0, abs_tol=1e-3)
    assert math.isclose(sum(dens.weights), 1.0, rel_tol=1e-9)
    assert dens.matvecs == 8 * 60
    # extremes: SLQ nodes reach the exact spectrum's ends
    assert math.isclose(max(dens.nodes), float(evals.max()), rel_tol=1e-6)
    # histogram: the density's mass per bin against the fraction of exact eigenvalues in it
    edges = torch.linspace(
        float(evals.min()) - 3 * sigma, float(evals.max()) + 3 * sigma, 11, dtype=torch.float64
    )
    exact_frac = torch.histogram(evals, bins=edges).hist / evals.numel()
    cdf = torch.cat([torch.zeros(1), torch.cumulative_trapezoid(values, grid)])
    mass = torch.diff(
        torch.from_numpy(__import__("numpy").interp(edges.numpy(), grid.numpy(), cdf.numpy()))
    )
    assert (mass - exact_frac).abs().max() < 0.02
    phi = lambda t: 0.5 * (1 + torch.erf(t / math.sqrt(2)))  # noqa: E731
    smoothed_frac = (
        phi((edges[1:, None] - evals) / sigma) - phi((edges[:-1, None] - evals) / sigma)
    ).mean(1)
    assert (mass - smoothed_frac).abs().max() < 0.01
    # and the smoothed exact spectrum, point by point (L1 distance of the two densities)
    smooth = torch.exp(-0.5 * ((grid[:, None] - evals[None, :]) / sigma) ** 2).sum(1)
    smooth /= evals.numel() * sigma * math.sqrt(2 * math.pi)
    assert float(torch.trapezoid((values - smooth).abs(), grid)) < 0.1


def test_lanczos_batched_runs_are_independent():
    g = torch.Generator().manual_seed(2)
    a = torch.randn(40, 40, generator=g, dtype=torch.float64)
    op = MatrixOperator(a + a.T)
    start = torch.randn(3, 40, generator=g, dtype=torch.float64)
    together = lanczos(op, start, 10)
    alone = lanczos(op, start[1:2], 10)
    assert torch.allclose(together.alpha[1], alone.alpha[0], atol=1e-12)
    assert torch.allclose(together.beta[1, :9], alone.beta[0, :9], atol=1e-12)


def test_results_serialise_to_json(mlp_problem):
    model, batch, _, _ = mlp_problem
    op = Hessian(model, F.cross_entropy, batch)
    spec = eigenvalues(op, 2, tol=1e-3, return_eigenvectors=True)
    est = trace(op, matvecs=6)
    d = json.loads(json.dumps({"s": spec.to_dict(), "t": est.to_dict()}, allow_nan=False))
    assert "eigenvectors" not in d["s"] and d["s"]["eigenvalues"] == list(spec.eigenvalues)
    assert TraceEstimate(**{**d["t"], "samples": tuple(d["t"]["samples"])}) == est
    assert (
        Spectrum(**{k: tuple(v) if isinstance(v, list) else v for k, v in d["s"].items()}) == spec
    )
    with pytest.raises(AttributeError):
        est.estimate = 1.0  # frozen


def test_bad_arguments_raise_with_the_value():
    op = MatrixOperator(torch.eye(4))
    with pytest.raises(ValueError, match=r"k must be an integer in \[1, 4\].*7"):
        eigenvalues(op, k=7)
    with pytest.raises(ValueError, match="which must be one of largest, smallest, magnitude"):
        eigenvalues(op, which="top")
    with pytest.raises(
        ValueError, match="method must be one of neyman, blocks, hutch\\+\\+, hutchinson"
    ):
        trace(op, method="exact")
    with pytest.raises(ValueError, match="matvecs must be an integer >= 5 for hutch\\+\\+, got 3"):
        trace(op, method="hutch++", matvecs=3)
    with pytest.raises(ValueError, match="matvecs must be an integer >= 2 for neyman, got 1"):
        trace(op, matvecs=1)
    with pytest.raises(ValueError, match=r"blocks must be a tensor of shape \(4,\)"):
        trace(op, blocks=torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="blocks applies to method=.blocks. or .neyman. only"):
        trace(op, method="hutchinson", blocks=torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="rtol must be a number > 0"):
        trace(op, rtol=0.0)
    with pytest.raises(ValueError, match="distribution"):
        trace(op, matvecs=6, distribution="uniform")
    with pytest.raises(TypeError, match="CurvatureOperator"):
        trace(torch.eye(3))
    with pytest.raises(ValueError, match="sigma"):
        density(op, sigma=-1.0)


def _two_block_matrix(n: int = 60, seed: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """A symmetric matrix whose Frobenius norm sits in the off-diagonal blocks, as a network
    Hessian's does between layers; and its block labels."""
    g = torch.Generator().manual_seed(seed)
    d1, d2 = (torch.randn(n, n, generator=g, dtype=torch.float64) for _ in range(2))
    c = 10 * torch.randn(n, n, generator=g, dtype=torch.float64)
    a = torch.cat([torch.cat([d1 + d1.T, c], 1), torch.cat([c.T, d2 + d2.T], 1)])
    return a, torch.arange(2 * n) // n


def test_block_trace_is_unbiased_with_the_variance_of_the_diagonal_blocks():
    a, labels = _two_block_matrix()
    op = MatrixOperator(a)
    truth = float(a.trace())
    ests = {
        method: [trace(op, method=method, matvecs=20, seed=s, blocks=b) for s in range(200)]
        for method, b in (("blocks", labels), ("hutchinson", None))
    }
    blocks = torch.tensor([e.estimate for e in ests["blocks"]])
    hutch = torch.tensor([e.estimate for e in ests["hutchinson"]])
    assert all(e.matvecs == 20 and len(e.samples) == 10 for e in ests["blocks"])
    assert abs(float(blocks.mean()) - truth) < 4 * float(blocks.std()) / math.sqrt(200)
    # Var of one sample: 2 sum_g (||A_gg||_F^2 - sum diag^2) for Rademacher probes
    off = sum(
        float((a[labels == g][:, labels == g] ** 2).sum() - (a.diag()[labels == g] ** 2).sum())
        for g in (0, 1)
    )
    theory = math.sqrt(2 * off / 10)
    assert 0.8 < float(blocks.std()) / theory < 1.2
    z = torch.tensor([(e.estimate - truth) / e.stderr for e in ests["blocks"]])
    assert abs(float(z.mean())) < 0.3 and 0.8 < float(z.std()) < 1.4
    assert float(((blocks - truth) ** 2).mean()) < 0.1 * float(((hutch - truth) ** 2).mean())


def test_block_labels_are_the_layers_and_small_budgets_merge_them(mlp_problem):
    model, batch, exact, _ = mlp_problem
    op = Hessian(model, F.cross_entropy, batch)
    sizes = [sum(p.numel() for p in m.parameters()) for m in model if len(list(m.parameters()))]
    expected = torch.repeat_interleave(torch.arange(3), torch.tensor(sizes))
    assert torch.equal(op.block_labels(), expected)
    assert torch.equal(MatrixOperator(torch.eye(5)).block_labels(), torch.zeros(5).long())
    # 3 layers cannot give 2 samples: merged into 2 groups
    few = trace(op, method="blocks", matvecs=4, seed=0)
    assert few.matvecs == 4 and len(few.samples) == 2
    odd = trace(op, method="blocks", matvecs=10, seed=0)  # 3 samples of 3 products
    assert odd.matvecs == 9 and len(odd.samples) == 3
    layer = Hessian(model, F.cross_entropy, batch, params=model[2])
    one = trace(layer, method="blocks", matvecs=8, seed=0)  # a single block is Hutchinson
    same = trace(layer, method="hutchinson", matvecs=8, seed=0)
    assert one.samples == same.samples


@pytest.mark.parametrize("method", ["hutchinson", "blocks", "neyman"])
def test_rtol_stops_when_the_standard_error_is_small_enough(mlp_problem, method):
    model, batch, exact, _ = mlp_problem
    op = Hessian(model, F.cross_entropy, batch)
    full = trace(op, method=method, matvecs=300, seed=1)
    est = trace(op, method=method, matvecs=300, seed=1, rtol=0.1)
    assert est.matvecs < full.matvecs
    assert est.stderr <= 0.1 * abs(est.estimate) and len(est.samples) >= 4
    assert est.samples == full.samples[: len(est.samples)]  # same probes, stopped early
    assert abs(est.estimate - float(exact.trace())) <= 4 * est.stderr


@pytest.mark.parametrize("start", ["auto", "random"])
def test_stop_rule_error_is_within_tol_of_the_exact_top_eigenvalue(mlp_problem, start):
    # The stop rule is an estimate (geometric mean of the Kato-Temple estimate and the last
    # change of the Ritz value); the true error must still be below tol for every seed.
    model, batch, _, evals = mlp_problem
    top = float(evals[-1])
    for tol in (1e-2, 1e-3, 1e-4):
        for seed in range(4):
            spec = eigenvalues(
                Hessian(model, F.cross_entropy, batch), 1, tol=tol, seed=seed, start=start
            )
            assert spec.converged
            assert abs(spec.eigenvalues[0] - top) <= tol * top, (tol, seed, spec)


def test_gradient_start_is_the_loss_gradient_mixed_with_the_seeded_noise(mlp_problem):
    from anyorder.hessian.lanczos import START_NOISE, random_vectors, start_vector
    from anyorder.hessian.operators import GGN, flatten

    model, batch, _, _ = mlp_problem
    exact = flatten(
        torch.autograd.grad(F.cross_entropy(model(batch[0]), batch[1]), list(model.parameters()))
    )
    noise = random_vectors(1, exact.numel(), seed=3, distribution="gaussian", dtype=exact.dtype)[0]
    want = exact / exact.norm() + START_NOISE * noise / noise.norm()
    hess = Hessian(model, F.cross_entropy, batch)
    assert torch.allclose(hess.gradient(), exact, atol=1e-12)  # from the cached graph
    halves = [(batch[0][:25], batch[1][:25]), (batch[0][25:], batch[1][25:])]
    assert torch.allclose(GGN(model, F.cross_entropy, halves).gradient(), exact, atol=1e-12)
    assert torch.allclose(start_vector(hess, "gradient", seed=3), want, atol=1e-12)
    assert torch.allclose(start_vector(hess, "auto", seed=3), want, atol=1e-12)
    # smallest eigenvalues and plain matrices start at random
    assert torch.allclose(
        start_vector(hess, "auto", which="smallest", seed=3), noise / noise.norm()
    )
    with pytest.raises(ValueError, match="model operator"):
        start_vector(MatrixOperator(torch.eye(3)), "gradient")
    with pytest.raises(ValueError, match="shape"):
        start_vector(hess, torch.ones(3))
    with pytest.raises(ValueError, match="start must be one of"):
        eigenvalues(hess, 1, start="previous")


def test_warm_start_from_the_top_eigenvector_needs_few_products(mlp_problem):
    model, batch, exact, evals = mlp_problem
    top = torch.linalg.eigh(exact).eigenvectors[:, -1]
    cold = eigenvalues(Hessian(model, F.cross_entropy, batch), 1, tol=1e-6, start="random")
    warm = eigenvalues(Hessian(model, F.cross_entropy, batch), 1, tol=1e-6, start=top)
    assert math.isclose(warm.eigenvalues[0], float(evals[-1]), rel_tol=1e-6)
    assert warm.matvecs < cold.matvecs


def test_ritz_vectors_without_the_residual_rule(mlp_problem):
    model, batch, _, evals = mlp_problem
    op = Hessian(model, F.cross_entropy, batch)
    loose = eigenvalues(op, 1, tol=1e-3, return_eigenvectors=True, strict_vectors=False)
    strict = eigenvalues(op, 1, tol=1e-3, return_eigenvectors=True)
    assert loose.iterations < strict.iterations  # the eigenvalue rule stops first
    v = loose.eigenvectors[0]
    assert math.isclose(float(v.norm()), 1.0, rel_tol=1e-6)
    assert math.isclose(float(v @ op.matvec(v)), loose.eigenvalues[0], rel_tol=1e-9)
