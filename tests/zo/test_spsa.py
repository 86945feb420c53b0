"""SPSA estimator statistics and the one-direction property."""

import math

import pytest
import torch

from anyorder.core.rng import DISTRIBUTIONS, direction
from anyorder.estimators import SPSA


def _quadratic(d=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(d, d, generator=g, dtype=torch.float64)
    h = m @ m.T / d + torch.eye(d, dtype=torch.float64)
    b = torch.randn(d, generator=g, dtype=torch.float64)
    w = torch.nn.Parameter(torch.randn(d, generator=g, dtype=torch.float64))

    def f(backward=True):
        return 0.5 * w @ h @ w + b @ w

    return w, f, h @ w.detach() + b


@pytest.mark.parametrize("one_sided", [False, True])
@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
def test_estimate_mean_is_the_gradient_within_five_standard_errors(distribution, one_sided):
    # On a quadratic the central difference is exactly z^T grad, and the one-sided bias
    # (mu/2) E[z z^T H z] vanishes for symmetric z: both estimates are unbiased for the gradient.
    w, f, grad = _quadratic()
    est = SPSA(mu=1e-3, distribution=distribution, one_sided=one_sided, seed=3)
    samples = []
    for step in range(3000):
        est.estimate_([w], f, step)
        samples.append(w.grad.clone())
    s = torch.stack(samples)
    mean, se = s.mean(0), s.std(0) / math.sqrt(len(s))
    assert torch.all((mean - grad).abs() < 5 * se), (mean - grad) / se
    # ... and it is not trivially zero or the wrong scale (sigma^2-times-gradient bugs fail here).
    assert torch.allclose(mean, grad, rtol=0.25, atol=0.25 * float(grad.abs().mean()))


def test_variance_falls_as_one_over_the_number_of_queries():
    w, f, _ = _quadratic()
    variances = {}
    for q in (1, 4):
        est = SPSA(mu=1e-3, n_queries=q, seed=1)
        s = []
        for step in range(1500):
            est.estimate_([w], f, step)
            s.append(w.grad.clone())
        variances[q] = float(torch.stack(s).var(0).sum())
    assert 3.0 < variances[1] / variances[4] < 5.3


@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
def test_exact_on_a_linear_function_with_a_tensor_of_over_a_million_elements(distribution):
    g = torch.Generator().manual_seed(0)
    big = torch.nn.Parameter(torch.zeros(1100, 1000))
    small = torch.nn.Parameter(torch.zeros(7))
    a_big = torch.randn(1100, 1000, generator=g)
    a_small = torch.randn(7, generator=g)
    seen = {}

    def f(backward=True):
        if "plus" not in seen:  # the first evaluation is at w + mu z
            seen["plus"] = (big.detach().clone(), small.detach().clone())
        return (a_big.double() * big.double()).sum() + (a_small.double() * small.double()).sum()

    est = SPSA(mu=1e-2, distribution=distribution, seed=9)
    sample = est.estimate_([big, small], f, step=4)
    z_big = direction(big.shape, 9, 4, 0, 0, distribution=distribution)
    z_small = direction(small.shape, 9, 4, 0, 1, distribution=distribution)
    expected = float(
        (a_big.double() * z_big.double()).sum() + (a_small.double() * z_small.double()).sum()
    )
    assert sample.projected[0] == pytest.approx(expected, rel=1e-4)
    # The perturbation, the estimate direction and the regenerated z are the same direction.
    for perturbed, grad, z in (
        (seen["plus"][0], big.grad, z_big),
        (seen["plus"][1], small.grad, z_small),
    ):
        assert torch.allclose(perturbed, 1e-2 * z, atol=1e-7)
        cos = float(
            torch.nn.functional.cosine_similarity(
                grad.double().reshape(-1), z.double().reshape(-1), dim=0
            )
        )
        assert abs(cos) == pytest.approx(1.0, abs=1e-5)
    # Restored exactly enough: w was 0, so w + mu z - 2 mu z + mu z is within rounding of 0.
    assert float(big.detach().abs().max()) < 1e-8


def test_evaluation_counts():
    w, f, _ = _quadratic()
    calls = []

    def counted(backward=True):
        calls.append(1)
        return f()

    SPSA(n_queries=3).estimate_([w], counted, 0)
    assert len(calls) == 6
    calls.clear()
    SPSA(n_queries=3, one_sided=True).estimate_([w], counted, 0)
    assert len(calls) == 4


def test_bad_input():
    with pytest.raises(ValueError, match="mu must be a finite number > 0, got 0"):
        SPSA(mu=0)
    with pytest.raises(ValueError, match="mu must be a finite number > 0, got -0.1"):
        SPSA(mu=-0.1)
    with pytest.raises(
        ValueError, match="unknown distribution 'cauchy'; choose one of auto, gaussian"
    ):
        SPSA(distribution="cauchy")
    with pytest.raises(ValueError, match="n_queries must be an integer >= 1, got 0"):
        SPSA(n_queries=0)


def test_nonfinite_loss_restores_the_weights_and_clears_the_gradients():
    w, f, _ = _quadratic()
    before = w.detach().clone()
    w.grad = torch.ones_like(w)  # a stale gradient from an earlier step
    calls = []

    def flaky(backward=True):
        calls.append(1)
        return f() * (float("nan") if len(calls) == 2 else 1.0)

    sample = SPSA(seed=0).estimate_([w], flaky, step=0)
    assert not sample.finite
    assert w.grad is None  # torch.optim skips it instead of reusing the stale one
    assert torch.allclose(w.detach(), before, atol=1e-15)


def test_auto_distribution_is_rademacher_on_the_cpu_and_gaussian_on_accelerators():
    auto = SPSA()
    assert auto.resolve_distribution(torch.device("cpu")) == "rademacher"
    assert auto.resolve_distribution(torch.device("cuda")) == "gaussian"
    # Portable directions are drawn on the CPU for every device, so they stay Rademacher.
    assert SPSA(portable=True).resolve_distribution(torch.device("cuda")) == "rademacher"
    assert SPSA(distribution="sphere").resolve_distribution(torch.device("cuda")) == "sphere"
    w, f, _ = _quadratic()
    SPSA(seed=5).estimate_([w], f, step=2)
    auto_grad = w.grad.clone()
    SPSA(seed=5, distribution="rademacher").estimate_([w], f, step=2)
    assert torch.allclose(auto_grad, w.grad, rtol=1e-9)  # same signs; w moved by rounding only
