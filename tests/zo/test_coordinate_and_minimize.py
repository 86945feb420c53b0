"""DeepZero's coordinate-wise estimate, the pruning mask and the black-box minimize API."""

import math

import numpy as np
import pytest
import torch

from anyorder.estimators import SPSA, CoordinateWise, zo_pruning_mask
from anyorder.zo import minimize


def _linear(d=30, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, generator=g, dtype=torch.float64)
    w = torch.nn.Parameter(torch.randn(d, generator=g, dtype=torch.float64))
    return w, a, lambda backward=True: a @ w + 3.0


@pytest.mark.parametrize("central", [False, True])
def test_coordinate_estimate_is_exact_for_linear_functions_and_restores_bit_for_bit(central):
    w, a, f = _linear()
    before = w.detach().clone()
    est = CoordinateWise(mu=1e-3, central=central)
    est.estimate_([w], f)
    assert torch.allclose(w.grad, a, rtol=0, atol=1e-9)
    assert torch.equal(w.detach(), before)
    assert est.evaluations([w]) == (60 if central else 31)


def test_mask_restricts_the_estimate_and_its_cost():
    w, a, f = _linear()
    mask = torch.zeros(30, dtype=torch.bool)
    mask[[2, 5, 11]] = True
    calls = []

    def counted(backward=True):
        calls.append(1)
        return f()

    est = CoordinateWise(mask=[mask])
    est.estimate_([w], counted)
    assert len(calls) == 4 == est.evaluations([w])
    assert torch.allclose(w.grad[mask], a[mask], atol=1e-9)
    assert torch.all(w.grad[~mask] == 0)


def test_coordinate_estimate_on_a_quadratic_matches_the_gradient_to_order_mu():
    g = torch.Generator().manual_seed(1)
    h = torch.randn(8, 8, generator=g, dtype=torch.float64)
    h = h @ h.T
    w = torch.nn.Parameter(torch.randn(8, generator=g, dtype=torch.float64))
    f = lambda backward=True: 0.5 * w @ h @ w  # noqa: E731
    CoordinateWise(mu=1e-4, central=False).estimate_([w], f)
    forward = w.grad.clone()
    CoordinateWise(mu=1e-4, central=True).estimate_([w], f)
    exact = h @ w.detach()
    assert torch.allclose(forward, exact + 0.5e-4 * torch.diag(h), atol=1e-7)  # bias mu/2 H_jj
    assert torch.allclose(w.grad, exact, atol=1e-7)


def test_pruning_mask_keeps_the_most_sensitive_coordinates():
    w, a, f = _linear(d=200)
    truth = (w.detach() * a).abs()
    exact = zo_pruning_mask([w], f, density=0.1, estimator=CoordinateWise(), n_estimates=1)[0]
    assert int(exact.sum()) == 20
    assert set(torch.nonzero(exact).reshape(-1).tolist()) == set(
        torch.topk(truth, 20).indices.tolist()
    )
    noisy = zo_pruning_mask(
        [w], f, density=0.1, estimator=SPSA(n_queries=50, seed=2), n_estimates=10
    )[0]
    overlap = int((noisy & exact).sum())
    assert overlap >= 12  # a random mask would share about 2 of 20
    assert w.grad is None  # the caller's gradients are left as they were
    with pytest.raises(ValueError, match="density must be in \\(0, 1\\], got 0"):
        zo_pruning_mask([w], f, density=0)


@pytest.mark.parametrize(
    "method,options",
    [
        ("zo-sgd", dict(lr=0.05, seed=1)),
        ("zo-adam", dict(lr=0.05, seed=1)),
        ("coordinate", dict(lr=0.2, central=True)),
    ],
)
def test_minimize_numpy_and_tensor_inputs(method, options):
    target = np.linspace(-1, 1, 6)
    seen_types = set()

    def f(x):
        seen_types.add(type(x))
        return float(((np.asarray(x) - target) ** 2).sum())

    res = minimize(f, np.zeros(6), method=method, maxfev=1500, options=options)
    assert isinstance(res.x, np.ndarray) and seen_types == {np.ndarray}
    assert res.fun < 1e-6 and np.allclose(res.x, target, atol=1e-3)
    assert res.nfev <= 1500 and res.success
    assert res.nit == len(res.history) and res.history[-1]["nfev"] < res.nfev
    tres = minimize(
        lambda t: float(((t - torch.from_numpy(target)) ** 2).sum()),
        torch.zeros(6),
        method=method,
        maxfev=1500,
        options=options,
    )
    assert isinstance(tres.x, torch.Tensor)
    assert np.allclose(tres.x.numpy(), res.x)  # same maths either way


def test_minimize_counts_every_evaluation_and_stops_on_nonfinite_values():
    calls = []

    def f(x):
        calls.append(1)
        return float(np.sum(x**2))

    res = minimize(f, np.ones(3), maxfev=101, options=dict(lr=0.01))
    assert res.nfev == len(calls) == 101 and res.nit == 50

    def blows_up(x):
        return float("inf") if x[0] < 0.5 else float(np.sum(x**2))

    res = minimize(blows_up, np.ones(3), maxfev=500, options=dict(lr=0.5, seed=0))
    assert not res.success and "non-finite" in res.message
    assert all(math.isfinite(v) for v in res.x)


def test_minimize_bad_input():
    f = lambda x: float(np.sum(x**2))  # noqa: E731
    with pytest.raises(ValueError, match="unknown method 'nelder-mead'; choose one of zo-sgd"):
        minimize(f, np.ones(2), method="nelder-mead")
    with pytest.raises(ValueError, match="maxfev=3 is too small"):
        minimize(f, np.ones(2), method="coordinate", maxfev=3)
    with pytest.raises(ValueError, match="bad options for method 'zo-sgd'.*betas"):
        minimize(f, np.ones(2), options=dict(betas=(0.9, 0.9)))
    with pytest.raises(TypeError, match="fun must return a number, got str"):
        minimize(lambda x: "low", np.ones(2))
