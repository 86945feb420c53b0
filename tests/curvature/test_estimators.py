"""Curvature estimators against exact second derivatives (torch.func.hessian, closed forms)."""

import warnings

import pytest
import torch
import torch.nn.functional as F

from anyorder.core import make_closure
from anyorder.core.rng import generator_for
from anyorder.curvature import (
    CurvatureFallbackWarning,
    GaussNewtonBartlett,
    HutchinsonDiagonal,
    HVPEngine,
    split_loss_logits,
)


def _mlp_problem():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (32,), generator=g)
    w1 = torch.randn(6, 4, generator=g, dtype=torch.float64).requires_grad_()
    b1 = torch.randn(6, generator=g, dtype=torch.float64).requires_grad_()
    w2 = torch.randn(3, 6, generator=g, dtype=torch.float64).requires_grad_()
    params = [w1, b1, w2]

    def loss_of(ps):
        return F.cross_entropy(torch.tanh(x @ ps[0].T + ps[1]) @ ps[2].T, y)

    def closure(backward: bool = True):
        loss = loss_of(params)
        if backward:
            for p in params:
                p.grad = None
            loss.backward()
        return loss

    return params, loss_of, closure


def _exact_hessian(params, loss_of):
    sizes = [p.numel() for p in params]
    flat = torch.cat([p.detach().reshape(-1) for p in params])

    def f(v):
        return loss_of([c.view_as(p) for c, p in zip(v.split(sizes), params)])

    return torch.func.hessian(f)(flat)


def test_hvp_matches_dense_hessian_both_methods():
    params, loss_of, closure = _mlp_problem()
    h = _exact_hessian(params, loss_of)
    g = torch.Generator().manual_seed(1)
    v = [torch.randn(p.shape, generator=g, dtype=torch.float64) for p in params]
    exact = h @ torch.cat([t.reshape(-1) for t in v])
    for method, tol in (("autograd", 1e-12), ("finite_difference", 1e-5)):
        before = [p.detach().clone() for p in params]
        _, grads, (hv,) = HVPEngine(method).gradient_and_hvps(closure, params, [v])
        got = torch.cat([t.reshape(-1) for t in hv])
        assert torch.allclose(got, exact, rtol=0, atol=tol * exact.abs().max()), method
        for p, b in zip(params, before):
            assert torch.equal(p.detach(), b)  # finite differences restore exactly
        assert all(t.grad_fn is None for t in grads + hv)


def test_hutchinson_mean_within_three_standard_errors_of_exact_diagonal():
    params, loss_of, closure = _mlp_problem()
    exact = torch.diagonal(_exact_hessian(params, loss_of))
    est = HutchinsonDiagonal(n_samples=1, seed=3)
    n = 300
    samples = torch.stack(
        [
            torch.cat([d.reshape(-1) for d in est.estimate(closure, params).diagonal])
            for _ in range(n)
        ]
    )
    mean, se = samples.mean(0), samples.std(0) / n**0.5
    exact_rows = se == 0  # rows of H with no off-diagonal entries: the estimate is exact
    assert torch.allclose(mean[exact_rows], exact[exact_rows], atol=1e-12)
    z = (mean[~exact_rows] - exact[~exact_rows]) / se[~exact_rows]
    assert (z.abs() < 3).float().mean() >= 0.97  # each within 3 SE, up to ~0.3% by chance
    assert z.abs().max() < 4.5
    # the trace (sum of the diagonal) as well
    totals = samples.sum(1)
    assert abs(totals.mean() - exact.sum()) < 3 * totals.std() / n**0.5
    # n_samples averages the same probes as separate calls with queries 0..n-1
    avg = HutchinsonDiagonal(n_samples=4, seed=3).estimate(closure, params, step=7).diagonal
    probes = HutchinsonDiagonal(n_samples=4, seed=3).probes(params, 7)
    h = _exact_hessian(params, loss_of)
    ref = (
        sum(
            torch.cat([t.reshape(-1) for t in z]) * (h @ torch.cat([t.reshape(-1) for t in z]))
            for z in probes
        )
        / 4
    )
    assert torch.allclose(torch.cat([d.reshape(-1) for d in avg]), ref, atol=1e-12)


def test_hutchinson_on_a_tensor_over_a_million_elements():
    # Tridiagonal Hessian: diag a, off-diagonal b. Rademacher: z_i (Hz)_i = a_i + b z_i (z_{i-1}
    # + z_{i+1}); probes cross several 65,536-element chunks of the direction sampler.
    n, b = 1_200_003, 0.25
    a = torch.linspace(0.5, 2.0, n, dtype=torch.float64)
    x = torch.zeros(n, dtype=torch.float64, requires_grad=True)

    def closure(backward: bool = True):
        loss = 0.5 * (a * x * x).sum() + b * (x[1:] * x[:-1]).sum()
        if backward:
            x.grad = None
            loss.backward()
        return loss

    est = HutchinsonDiagonal(seed=11)
    (z,) = est.probes([x], 0)[0]
    assert set(z.unique().tolist()) == {-1.0, 1.0}
    assert abs(float(z.mean())) < 3 / n**0.5
    chunk = 1 << 16
    assert not torch.equal(z[:chunk], z[chunk : 2 * chunk])  # chunks are independent streams
    (d,) = est.estimate(closure, [x], step=0).diagonal
    resid = d - a
    expected = b * z * (torch.roll(z, 1) + torch.roll(z, -1))
    expected[0] = b * z[0] * z[1]
    expected[-1] = b * z[-1] * z[-2]
    assert torch.allclose(resid, expected, atol=1e-12)
    assert abs(float(resid.mean())) < 3 * float(resid.std()) / n**0.5


def _logreg_problem(n=40, d=5, c=4):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.randint(0, c, (n,), generator=g)
    w = (0.5 * torch.randn(c, d, generator=g, dtype=torch.float64)).requires_grad_()
    b = (0.5 * torch.randn(c, generator=g, dtype=torch.float64)).requires_grad_()

    def closure(backward: bool = True):
        logits = x @ w.T + b
        loss = F.cross_entropy(logits, y)
        if backward:
            w.grad = b.grad = None
            loss.backward()
        return loss, logits

    return x, y, [w, b], closure


def test_gnb_matches_its_definition_for_cross_entropy():
    x, y, params, closure = _logreg_problem()
    est = GaussNewtonBartlett(seed=5)
    out = est.estimate(closure, params, step=9)
    # Definition (Sophia, Algorithm 2): labels ~ softmax(logits) keyed by (seed, step), gradient
    # of the mean cross-entropy against them, times B, squared element-wise.
    w, b = (p.detach().clone().requires_grad_() for p in params)
    logits = x @ w.T + b
    probs = torch.softmax(logits.detach().float(), -1)
    labels = torch.multinomial(probs, 1, generator=generator_for(5, 9)).view(-1)
    gw, gb = torch.autograd.grad(F.cross_entropy(logits, labels), [w, b])
    assert torch.allclose(out.diagonal[0], len(y) * gw**2, atol=1e-14)
    assert torch.allclose(out.diagonal[1], len(y) * gb**2, atol=1e-14)
    loss, _ = closure(backward=False)
    assert torch.allclose(out.loss, loss.detach())
    assert all(t.grad_fn is None for t in out.grads + out.diagonal)


def test_gnb_is_unbiased_for_the_gauss_newton_diagonal():
    x, y, params, closure = _logreg_problem(n=8)
    w, b = params
    p = torch.softmax(x @ w.detach().T + b.detach(), -1)
    # diag of J^T (diag p - p p^T) J / B for logits = x W^T + b
    exact_w = ((p - p * p)[:, :, None] * (x * x)[:, None, :]).mean(0)
    exact_b = (p - p * p).mean(0)
    est = GaussNewtonBartlett(seed=0)
    n = 400
    samples = torch.stack(
        [
            torch.cat([d.reshape(-1) for d in est.estimate(closure, params, step=s).diagonal])
            for s in range(n)
        ]
    )
    exact = torch.cat([exact_w.reshape(-1), exact_b])
    z = (samples.mean(0) - exact) / (samples.std(0) / n**0.5)
    assert (z.abs() < 3).float().mean() >= 0.95
    assert z.abs().max() < 4.5


def test_split_loss_logits_accepts_pairs_dicts_and_model_outputs():
    from transformers.modeling_outputs import CausalLMOutput

    loss, logits = torch.tensor(1.0), torch.zeros(2, 3)
    assert split_loss_logits((loss, logits))[1] is logits
    assert split_loss_logits({"loss": loss, "logits": logits})[1] is logits
    assert split_loss_logits(CausalLMOutput(loss=loss, logits=logits))[1] is logits
    with pytest.raises(TypeError, match="needs the logits"):
        split_loss_logits(loss)


def test_fallback_warns_once_and_then_uses_finite_differences():
    model = torch.nn.Linear(3, 2).double()
    calls = {"n": 0}

    class TanhBackward(torch.autograd.Function):
        # Like a fused kernel whose backward has no derivative of its own.
        @staticmethod
        def forward(ctx, grad, t):
            ctx.save_for_backward(t)
            return grad * (1 - t.tanh() ** 2)

        @staticmethod
        def backward(ctx, _):
            raise RuntimeError("derivative for test_tanh_backward is not implemented")

    class NoDoubleBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, t):
            ctx.save_for_backward(t)
            return t.tanh()

        @staticmethod
        def backward(ctx, grad):
            (t,) = ctx.saved_tensors
            return TanhBackward.apply(grad, t)

    x = torch.randn(5, 3, dtype=torch.float64)

    def closure(backward: bool = True):
        calls["n"] += 1
        loss = NoDoubleBackward.apply(model(x)).pow(2).sum()
        if backward:
            model.zero_grad()
            loss.backward()
        return loss

    est = HutchinsonDiagonal(seed=0, owner="Test")
    params = list(model.parameters())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = est.estimate(closure, params)
        second = est.estimate(closure, params)
    fallbacks = [w for w in caught if issubclass(w.category, CurvatureFallbackWarning)]
    assert len(fallbacks) == 1 and "Test" in str(fallbacks[0].message)
    assert first.method == second.method == "finite_difference"
    assert calls["n"] == 2 + 2  # 1 failed try + 1 shifted; then 1 + 1 shifted
    with pytest.raises(RuntimeError):
        HutchinsonDiagonal(hvp="autograd").estimate(closure, params)


def test_make_closure_feeds_the_estimators():
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    batch = (torch.randn(10, 4), torch.randint(0, 2, (10,)))
    closure = make_closure(model, F.cross_entropy, batch)
    out = HutchinsonDiagonal().estimate(closure, list(model.parameters()))

    def by_hand(backward=True):
        loss = F.cross_entropy(model(batch[0]), batch[1])
        if backward:
            loss.backward()
        return loss

    ref = HutchinsonDiagonal().estimate(by_hand, list(model.parameters()))
    assert len(out.diagonal) == 4
    assert all(torch.equal(a, b) for a, b in zip(out.diagonal, ref.diagonal))
    assert all(torch.equal(a, b) for a, b in zip(out.grads, ref.grads))
    with pytest.raises(TypeError, match="backward=False"):
        HutchinsonDiagonal().estimate(lambda: F.cross_entropy(model(batch[0]), batch[1]), [])
