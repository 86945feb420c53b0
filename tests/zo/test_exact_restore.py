"""Bit-exact restore of zeroth-order steps without a copy of the weights (issue 13): an exception
in any evaluation, or a non-finite loss, leaves weights and optimizer state bit-identical."""

import copy

import pytest
import torch
from torch import nn

from anyorder.core import native
from anyorder.core.rng import direction, flat_view
from anyorder.estimators import SPSA
from anyorder.estimators.restore import PerturbationGuard, from_ordered_keys, ordered_keys
from anyorder.optim import ZOSGD, ZOAdam

DTYPES = [torch.float32, torch.bfloat16]


def _model(dtype, seed=0):
    """A small MLP whose weights include zeros, -0.0 and tiny values (restored through escapes)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3))
    with torch.no_grad():
        w = model[0].weight.view(-1)
        w[:6] = 0.0
        w[6:12] = -0.0
        w[12:30] *= 1e-5
        model[2].bias[0] = 1e-30
    return model.to(dtype)


def _batch(dtype):
    g = torch.Generator().manual_seed(3)
    return torch.randn(12, 5, generator=g).to(dtype), torch.randint(0, 3, (12,), generator=g)


def _closure(model, dtype, *, fail_at=None, error=RuntimeError, nan_at=None):
    x, y = _batch(dtype)
    calls = [0]

    def closure(backward=False):
        k = calls[0]
        calls[0] += 1
        if k == fail_at:
            raise error("injected")
        loss = nn.functional.cross_entropy(model(x).float(), y)
        return loss * float("nan") if k == nan_at else loss

    closure.calls = calls
    return closure


def _bits(t):
    return t.detach().view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def _same_weights(model, weights):
    return all(torch.equal(_bits(p), _bits(w)) for p, w in zip(model.parameters(), weights))


def _same_state(a, b):
    if isinstance(a, torch.Tensor):
        return torch.equal(_bits(a), _bits(b)) if a.is_floating_point() else torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same_state(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same_state(x, y) for x, y in zip(a, b))
    return a == b


CASES = [
    (cls, one_sided, n_queries)
    for cls in (ZOSGD, ZOAdam)
    for one_sided in (False, True)
    for n_queries in (1, 3)
]


def _make(cls, model, one_sided, n_queries, **kw):
    extra = dict(momentum=0.9) if cls is ZOSGD else {}
    dtype = next(model.parameters()).dtype
    return cls(
        model.parameters(),
        lr=1e-2,
        mu=1e-3 if dtype == torch.float32 else 1e-2,  # bfloat16: above its resolution
        n_queries=n_queries,
        one_sided=one_sided,
        seed=5,
        **extra,
        **kw,
    )


def _warm(cls, dtype, one_sided, n_queries, **kw):
    model = _model(dtype)
    opt = _make(cls, model, one_sided, n_queries, **kw)
    opt.step(_closure(model, dtype))  # state exists (momentum, Adam moments)
    return model, opt


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cls,one_sided,n_queries", CASES)
def test_an_exception_in_any_evaluation_leaves_weights_and_state_bit_identical(
    cls, one_sided, n_queries, dtype
):
    evaluations = 1 + n_queries if one_sided else 2 * n_queries
    for k in range(evaluations):
        errors = (RuntimeError, KeyboardInterrupt) if k in (0, evaluations - 1) else (RuntimeError,)
        for error in errors:
            model, opt = _warm(cls, dtype, one_sided, n_queries)
            weights = [p.detach().clone() for p in model.parameters()]
            state = copy.deepcopy(opt.state_dict())
            closure = _closure(model, dtype, fail_at=k, error=error)
            with pytest.raises(error, match="injected"):
                opt.step(closure)
            assert closure.calls[0] == k + 1
            assert _same_weights(model, weights), (k, error)
            assert _same_state(opt.state_dict(), state)
            if k != evaluations - 1:
                continue
            # and it carries on exactly as an optimizer that never saw the failure
            twin_model, twin = _warm(cls, dtype, one_sided, n_queries)
            opt.step(_closure(model, dtype))
            twin.step(_closure(twin_model, dtype))
            assert _same_weights(model, list(twin_model.parameters()))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cls,one_sided,n_queries", CASES)
def test_a_nonfinite_loss_at_any_evaluation_changes_neither_weights_nor_state(
    cls, one_sided, n_queries, dtype
):
    evaluations = 1 + n_queries if one_sided else 2 * n_queries
    for k in range(evaluations):
        model, opt = _warm(cls, dtype, one_sided, n_queries)
        weights = [p.detach().clone() for p in model.parameters()]
        state = copy.deepcopy(opt.state_dict())
        opt.step(_closure(model, dtype, nan_at=k))
        assert _same_weights(model, weights), k
        now = opt.state_dict()
        assert _same_state(now["state"], state["state"])
        assert now["anyorder"]["updates"] == state["anyorder"]["updates"]
        assert now["anyorder"]["skipped_steps"] == state["anyorder"]["skipped_steps"] + 1


def test_the_escapes_are_exercised_and_the_arithmetic_restore_would_miss():
    # The same failures with MeZO's arithmetic restore leave some element moved: the tests
    # above can fail, and the guard's escapes are what saves the zeros and tiny weights.
    missed = 0
    for dtype in DTYPES:
        for k in (0, 1):
            model, opt = _warm(ZOSGD, dtype, False, 1, restore="arithmetic")
            weights = [p.detach().clone() for p in model.parameters()]
            with pytest.raises(RuntimeError):
                opt.step(_closure(model, dtype, fail_at=k))
            missed += not _same_weights(model, weights)
    assert missed == 4
    model = _model(torch.float32)
    est = SPSA(mu=1e-3, seed=5)
    params = list(enumerate(model.parameters()))
    guard = PerturbationGuard(est, params, 0)
    guard.first_move_(0, 1e-3, -2e-3)
    assert guard.escape_count() >= 12  # the zeros, -0.0 and the 1e-5-scaled weights at least
    assert guard.nbytes() < 4 * sum(p.numel() for _, p in params)  # below a float32 copy


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
@pytest.mark.parametrize("one_sided", [False, True])
def test_single_query_trajectory_is_unchanged(dtype, one_sided):
    # With one query the guard only adds bookkeeping: the same weights, bit for bit, as the
    # arithmetic restore of the previous release, for the fused SGD pass and for Adam.
    mu = 1e-2 if dtype == torch.bfloat16 else 1e-3
    for cls, kw in ((ZOSGD, {}), (ZOSGD, dict(momentum=0.9)), (ZOAdam, {})):
        a, b = _model(dtype), _model(dtype)
        oa = cls(a.parameters(), lr=1e-2, mu=mu, one_sided=one_sided, seed=2, **kw)
        ob = cls(
            b.parameters(), lr=1e-2, mu=mu, one_sided=one_sided, seed=2, restore="arithmetic", **kw
        )
        for _ in range(4):
            assert oa.step(_closure(a, dtype)) == ob.step(_closure(b, dtype))
        assert _same_weights(a, list(b.parameters()))


@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
def test_every_query_is_evaluated_around_the_exact_starting_weights(distribution):
    # Plain reference: query q evaluates at fl(w + mu z_q) and fl(fl(w + mu z_q) - 2 mu z_q),
    # with z_q the direction keyed by (seed, step, q, index), all from the same w.
    mu, seed, step = 1e-3, 4, 7
    model = _model(torch.float32)
    w0 = [p.detach().clone() for p in model.parameters()]
    seen = []

    def loss_at():
        seen.append([p.detach().clone() for p in model.parameters()])
        return float(sum(p.double().sum() for p in model.parameters()))

    est = SPSA(mu=mu, n_queries=3, distribution=distribution, seed=seed)
    params = list(enumerate(model.parameters()))
    est.sample(params, loss_at, step)
    assert len(seen) == 6
    for q in range(3):
        for i, w in enumerate(w0):
            z = direction(w.shape, seed, step, q, i, distribution=distribution)
            plus = torch.add(w, z, alpha=mu)  # as the pass adds (one rounding where fused)
            minus = torch.add(plus, z, alpha=-2 * mu)
            assert torch.equal(seen[2 * q][i], plus) and torch.equal(seen[2 * q + 1][i], minus)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("two_sided", [False, True])
def test_the_kernel_and_the_torch_path_keep_the_same_codes_and_escapes(
    dtype, two_sided, monkeypatch
):
    if not native.available():
        pytest.skip(native.status())
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(70_001, generator=g) * 0.05).to(dtype)
    w[:500] = 0.0
    w[500:5000] *= 1e-4  # more escapes than the kernel's scratch holds: it is called again
    w[5000:5100] = -0.0
    est = SPSA(mu=1e-3, seed=9, distribution="rademacher")
    alpha_2 = -2e-3 if two_sided else None
    results = []
    for kernel in (True, False):
        if not kernel:
            monkeypatch.setattr(native, "_state", {"lib": None, "why": "disabled"})
        p = w.clone()
        guard = PerturbationGuard(est, [(3, p)], 11)
        guard.first_move_(0, 1e-3, alpha_2)
        moved = p.clone()
        if two_sided:
            est.perturb_([(3, p)], 11, 0, -2e-3)
            guard.moved(-2e-3)
        assert guard.escape_count() >= 4000  # the tiny weights
        escapes = guard.escapes[0]
        guard.restore()
        results.append((moved, guard.codes[0].clone(), p, escapes))
    (m1, c1, r1, e1), (m2, c2, r2, e2) = results
    assert torch.equal(_bits(m1), _bits(m2)) and torch.equal(c1, c2)
    assert torch.equal(e1[0], e2[0]) and torch.equal(_bits(e1[1]), _bits(e2[1]))
    assert torch.equal(_bits(r1), _bits(w)) and torch.equal(_bits(r2), _bits(w))
    # the first move equals the estimator's own pass
    ref = w.clone()
    est.perturb_([(3, ref)], 11, 0, 1e-3)
    assert torch.equal(_bits(m1), _bits(ref))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_ordered_keys_are_monotone_and_invert(dtype):
    info = torch.finfo(dtype)
    x = torch.tensor(
        [-info.max, -1.0, -info.tiny, -0.0, 0.0, info.tiny, 1e-3, 1.0, info.max], dtype=dtype
    )
    k = ordered_keys(x)
    assert torch.all(k[1:] > k[:-1]) and k[3] == -1 and k[4] == 0
    assert torch.equal(_bits(from_ordered_keys(k, dtype)), _bits(x))


@pytest.mark.parametrize("kernel", [True, False])
def test_channels_last_weights_and_the_guard_memory(kernel, monkeypatch):
    if not kernel:  # the loader state of a machine without the compiled kernel
        monkeypatch.setattr(native, "_state", {"lib": None, "why": "disabled for the test"})
    conv = nn.Conv2d(3, 8, 3).to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 8, 8).to(memory_format=torch.channels_last)
    before = conv.weight.detach().clone()
    opt = ZOSGD(conv.parameters(), lr=0.1, n_queries=2, seed=3)
    for k in range(4):
        calls = [0]

        def closure(backward=False, k=k, calls=calls):
            calls[0] += 1
            if calls[0] > k:
                raise KeyboardInterrupt
            return conv(x).pow(2).mean()

        with pytest.raises(KeyboardInterrupt):
            opt.step(closure)
        assert torch.equal(_bits(conv.weight), _bits(before))
        assert conv.weight.stride() == before.stride()
    params = [(0, conv.weight)]
    guard = PerturbationGuard(opt.estimator, params, 0)
    guard.first_move_(0, 1e-3, -2e-3)
    assert guard.codes[0].numel() == (conv.weight.numel() + 63) // 64 * 16
    opt.estimator.perturb_(params, 0, 0, -2e-3)
    guard.moved(-2e-3)
    guard.restore()
    assert torch.equal(_bits(conv.weight), _bits(before))
    assert torch.equal(flat_view(conv.weight), flat_view(before))


def test_bad_restore_is_refused():
    with pytest.raises(ValueError, match="unknown restore 'exact'"):
        ZOSGD([nn.Parameter(torch.zeros(2))], lr=0.1, restore="exact")
    with pytest.raises(ValueError, match="unknown restore"):
        SPSA(restore="copy")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
def test_the_estimator_restores_every_dtype_over_several_chunks(dtype, distribution):
    # 70,001 elements: two chunks of directions and a ragged end; zeros, -0.0 and tiny weights.
    g = torch.Generator().manual_seed(1)
    w = torch.randn(70_001, generator=g) * 0.05
    w[:300], w[300:600], w[600:900] = 0.0, -0.0, w[600:900] * 1e-4
    w = w.to(dtype)
    mu = 1e-3 if dtype in (torch.float32, torch.float64) else 1e-2
    for one_sided in (False, True):
        last = 3 if one_sided else 5  # three queries; the ZO optimizer tests cover every index
        for k, nan in ((1, False), (last, False), (last - 1, True)):
            if True:
                p = w.clone()
                calls = [0]

                def loss_at(p=p, calls=calls, k=k, nan=nan):
                    calls[0] += 1
                    if calls[0] > k:
                        if nan:
                            return float("nan")
                        raise KeyboardInterrupt
                    return float(p.double().sum())

                est = SPSA(mu=mu, n_queries=3, one_sided=one_sided, distribution=distribution)
                if nan:
                    sample = est.sample([(0, p)], loss_at, 2)
                    assert not sample.finite and sample.pending == 0.0
                else:
                    with pytest.raises(KeyboardInterrupt):
                        est.sample([(0, p)], loss_at, 2)
                assert torch.equal(_bits(p), _bits(w)), (one_sided, k, nan)
