"""Error paths of all nine optimizers (issue 13): an exception inside the closure, a closure that
returns the wrong thing, a non-finite hyperparameter, a non-finite gradient or Hessian estimate
with a finite loss. Each must leave the weights and the optimizer state exactly as they were."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from anyorder.core import NonFiniteLossError
from anyorder.curvature.hutchinson import CurvatureEstimate
from anyorder.optim import (
    CBO,
    MFAC,
    SAM,
    ZOSGD,
    AdaHessian,
    DiffGrad,
    Lion,
    Sophia,
    ZOAdam,
)

FACTORIES = {
    # the default restore ("compact": 2 bits per element and escapes) and the full copy
    "zosgd": lambda ps, **kw: ZOSGD(ps, lr=1e-2, momentum=0.9, n_queries=2, **kw),
    "zosgd-copy": lambda ps, **kw: ZOSGD(ps, lr=1e-2, n_queries=2, restore="copy", **kw),
    "zoadam": lambda ps, **kw: ZOAdam(ps, lr=1e-2, one_sided=True, **kw),
    "cbo": lambda ps, **kw: CBO(ps, n_particles=3, vectorize=False, **kw),
    "sophia-h": lambda ps, **kw: Sophia(ps, lr=1e-2, update_every=2, **kw),
    "sophia-fd": lambda ps, **kw: Sophia(
        ps, lr=1e-2, hvp="finite_difference", update_every=1, **kw
    ),
    "sophia-g": lambda ps, **kw: Sophia(ps, lr=1e-2, estimator="gnb", update_every=2, **kw),
    "adahessian": lambda ps, **kw: AdaHessian(ps, lr=0.05, weight_decay=1e-3, **kw),
    "mfac": lambda ps, **kw: MFAC(ps, lr=1e-2, m=3, damping=0.1, momentum=0.5, **kw),
    "sam": lambda ps, **kw: SAM(ps, "SGD", rho=0.05, lr=0.1, momentum=0.9, **kw),
    "asam": lambda ps, **kw: SAM(ps, torch.optim.AdamW, rho=0.5, adaptive=True, lr=1e-2, **kw),
    "lion": lambda ps, **kw: Lion(ps, lr=1e-3, weight_decay=0.1, **kw),
    "diffgrad": lambda ps, **kw: DiffGrad(ps, lr=1e-2, weight_decay=1e-3, **kw),
}
GRADIENT_BASED = ["sophia-h", "sophia-g", "adahessian", "mfac", "sam", "asam", "lion", "diffgrad"]


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)
    ).double()


def _batch(t):
    g = torch.Generator().manual_seed(t)
    return torch.randn(6, 4, generator=g, dtype=torch.float64), torch.randint(
        0, 3, (6,), generator=g
    )


class _PoisonGrad(torch.autograd.Function):
    """Identity whose backward makes every gradient behind it non-finite (the loss stays finite)."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * math.inf


_LOSS = object()  # "return the loss" (the default of ``returns``)


def _closure(name, model, t, *, fail_at=None, error=RuntimeError, returns=_LOSS, poison=False):
    """A contract closure on batch ``t``; ``fail_at``: raise ``error`` on that call (0-based);
    ``returns``: return this instead of the loss; ``poison``: non-finite gradients."""
    x, y = _batch(t)
    calls = [0]

    def closure(backward=True):
        k = calls[0]
        calls[0] += 1
        if k == fail_at:
            raise error("injected")
        with torch.enable_grad() if backward else torch.no_grad():
            logits = model(x)
            if poison:
                logits = _PoisonGrad.apply(logits)
            loss = F.cross_entropy(logits, y)
        if backward:
            model.zero_grad(set_to_none=True)
            loss.backward()
        if returns is not _LOSS:
            return returns
        return (loss, logits) if name == "sophia-g" else loss

    closure.calls = calls
    if name == "cbo":
        closure.model = model
    return closure


def _graph_closure(name, model, t, **kw):
    """Sophia-H/AdaHessian/Sophia-G differentiate closure(backward=False) themselves, so the
    forward must record the graph even with backward=False."""
    x, y = _batch(t)
    calls = [0]
    fail_at, error = kw.get("fail_at"), kw.get("error", RuntimeError)

    def closure(backward=True):
        k = calls[0]
        calls[0] += 1
        if k == fail_at:
            raise error("injected")
        logits = model(x)
        if kw.get("poison"):
            logits = _PoisonGrad.apply(logits)
        loss = F.cross_entropy(logits, y)
        if backward:
            model.zero_grad(set_to_none=True)
            loss.backward()
        if kw.get("returns", _LOSS) is not _LOSS:
            return kw["returns"]
        return (loss, logits) if name == "sophia-g" else loss

    closure.calls = calls
    return closure


def _make_closure(name, model, t, **kw):
    if name in ("sophia-h", "sophia-fd", "sophia-g", "adahessian", "zosgd", "zosgd-copy", "zoadam"):
        return _graph_closure(name, model, t, **kw)
    return _closure(name, model, t, **kw)


def _same(a, b, skip=()):
    """Bit-identical nested state (tensors with torch.equal, floats NaN-aware)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        keys = set(a) - set(skip)
        return keys == set(b) - set(skip) and all(_same(a[k], b[k]) for k in keys)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    return a == b


def _snapshot(model, opt):
    return [p.detach().clone() for p in model.parameters()], copy.deepcopy(opt.state_dict())


def _unchanged(model, opt, snap, skip=()):
    weights, state = snap
    now = opt.state_dict()
    for p, w in zip(model.parameters(), weights):
        assert torch.equal(p.detach(), w)
    assert _same(state["state"], now["state"])
    assert _same(state["anyorder"], now["anyorder"], skip)
    if "base" in state:
        assert _same(state["base"]["state"], now["base"]["state"])


def _warm(name, **kw):
    model = _model()
    opt = FACTORIES[name](model.parameters(), **kw)
    for t in range(2):
        opt.step(_make_closure(name, model, t))
    return model, opt


def _evaluations_per_step(name):
    model, opt = _warm(name)
    closure = _make_closure(name, model, 2)
    opt.step(closure)
    return closure.calls[0]


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_an_exception_in_any_evaluation_leaves_weights_and_state_bit_identical(name):
    n = _evaluations_per_step(name)
    assert n >= 1
    for k in range(n):
        for error in (RuntimeError, KeyboardInterrupt):
            model, opt = _warm(name)
            snap = _snapshot(model, opt)
            with pytest.raises(error, match="injected"):
                opt.step(_make_closure(name, model, 2, fail_at=k, error=error))
            _unchanged(model, opt, snap)
            # and the optimizer carries on exactly as one that never saw the failure
            twin_model, twin = _warm(name)
            opt.step(_make_closure(name, model, 2))
            twin.step(_make_closure(name, twin_model, 2))
            for p, q in zip(model.parameters(), twin_model.parameters()):
                assert torch.equal(p, q), (name, k, error)


@pytest.mark.parametrize("name", ["zosgd", "zoadam"])
def test_zo_arithmetic_restore_is_exact_to_the_rounding_of_its_own_restore(name):
    # restore="arithmetic" (MeZO's, no memory): the displacement is subtracted again.
    cls = ZOSGD if name == "zosgd" else ZOAdam
    model = _model()
    opt = cls(model.parameters(), lr=1e-2, mu=1e-3, restore="arithmetic")
    before = [p.detach().clone() for p in model.parameters()]
    for k in (0, 1):
        with pytest.raises(KeyboardInterrupt):
            opt.step(_graph_closure(name, model, 0, fail_at=k, error=KeyboardInterrupt))
        for p, w in zip(model.parameters(), before):
            assert (p.detach() - w).abs().max() <= 4 * torch.finfo(w.dtype).eps * (
                1 + w.abs().max()
            )
    assert opt.global_state["step"] == 0 and opt.global_state["evaluations"] == 0
    assert not opt.state


@pytest.mark.parametrize("name", GRADIENT_BASED)
@pytest.mark.parametrize("policy", ["skip", "raise"])
def test_a_nonfinite_gradient_with_a_finite_loss_changes_nothing(name, policy):
    model, opt = _warm(name, on_nonfinite=policy)
    snap = _snapshot(model, opt)
    before = dict(opt.global_state)
    closure = _make_closure(name, model, 2, poison=True)
    if policy == "raise":
        with pytest.raises(NonFiniteLossError, match="non-finite.*(gradient|Hessian)"):
            opt.step(closure)
        _unchanged(model, opt, snap, skip=("evaluations",))
        return
    loss = opt.step(closure)
    loss = loss[0] if isinstance(loss, tuple) else loss
    assert math.isfinite(float(loss))
    _unchanged(model, opt, snap, skip=("evaluations", "step", "skipped_steps"))
    assert opt.global_state["skipped_steps"] == before["skipped_steps"] + 1
    # the following steps are ordinary ones (M-FAC's window was not poisoned)
    for t in range(3, 3 + 5):
        opt.step(_make_closure(name, model, t))
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert opt.global_state["skipped_steps"] == before["skipped_steps"] + 1


def test_lion_and_diffgrad_check_gradients_in_the_standard_loop_too():
    for cls in (Lion, DiffGrad):
        model = _model()
        opt = cls(model.parameters(), lr=1e-2)
        x, y = _batch(0)
        F.cross_entropy(_PoisonGrad.apply(model(x)), y).backward()
        before = [p.detach().clone() for p in model.parameters()]
        opt.step()
        assert all(torch.equal(p, w) for p, w in zip(model.parameters(), before))
        assert not opt.state and opt.global_state["skipped_steps"] == 1


class _InfiniteDiagonal:
    """An estimator object whose Hessian diagonal is infinite (gradient and loss finite)."""

    def estimate(self, closure, params, step, indices):
        loss = closure(backward=False)
        grads = torch.autograd.grad(loss, params)
        return CurvatureEstimate(
            loss.detach(),
            [g.detach() for g in grads],
            [torch.full_like(p, math.inf) for p in params],
            "x",
        )


def test_a_nonfinite_hessian_estimate_is_skipped_and_never_enters_the_state():
    model = _model()
    opt = Sophia(model.parameters(), lr=1e-2, estimator=_InfiniteDiagonal(), update_every=1)
    before = [p.detach().clone() for p in model.parameters()]
    opt.step(_graph_closure("sophia-h", model, 0))
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), before))
    assert not opt.state and opt.global_state["skipped_steps"] == 1
    strict = Sophia(model.parameters(), estimator=_InfiniteDiagonal(), on_nonfinite="raise")
    with pytest.raises(NonFiniteLossError, match="Hessian estimate"):
        strict.step(_graph_closure("sophia-h", model, 0))


BAD_RETURNS = [
    (None, TypeError, "got None"),
    ("0.5", TypeError, "got str '0.5'"),
    (torch.ones(6, dtype=torch.float64), ValueError, r"got a tensor of shape \(6,\)"),
    ((1.0, 2.0, 3.0), TypeError, "got a tuple of 3 elements"),
]


@pytest.mark.parametrize("name", sorted(FACTORIES))
@pytest.mark.parametrize("value,error,match", BAD_RETURNS)
def test_a_closure_returning_the_wrong_thing_gets_one_clear_message(name, value, error, match):
    if name == "sophia-g" and isinstance(value, torch.Tensor):
        error = TypeError  # it needs (loss, logits): a lone tensor is the wrong kind of value
    model, opt = _warm(name)
    snap = _snapshot(model, opt)
    with pytest.raises(error, match="closure must return a scalar loss tensor or float.*" + match):
        opt.step(_make_closure(name, model, 2, returns=value))
    _unchanged(model, opt, snap)


def test_a_string_loss_is_refused_and_sophia_g_given_none_is_not_told_about_logits():
    model = _model()
    with pytest.raises(TypeError) as info:
        Sophia(model.parameters(), estimator="gnb").step(
            _graph_closure("sophia-g", model, 0, returns=None)
        )
    assert "got None" in str(info.value) and "needs the logits" not in str(info.value)
    with pytest.raises(TypeError, match="needs the logits"):
        Sophia(model.parameters(), estimator="gnb").step(
            _graph_closure("sophia-h", model, 0)  # a loss without its logits
        )


HYPERPARAMETERS = {
    "zosgd": ["lr", "weight_decay", "momentum"],
    "zoadam": ["lr", "weight_decay", "eps", "betas"],
    "cbo": ["lr", "lam", "sigma"],
    "sophia-h": ["lr", "weight_decay", "rho", "eps", "betas"],
    "adahessian": ["lr", "weight_decay", "eps", "betas", "hessian_power"],
    "mfac": ["lr", "weight_decay", "momentum"],
    "sam": ["lr", "rho", "momentum"],
    "asam": ["lr", "rho", "eta", "weight_decay", "betas"],
    "lion": ["lr", "weight_decay", "betas"],
    "diffgrad": ["lr", "weight_decay", "eps", "betas"],
}


@pytest.mark.parametrize("name", sorted(HYPERPARAMETERS))
def test_nonfinite_hyperparameters_are_refused_at_construction_and_at_every_step(name):
    for key in HYPERPARAMETERS[name]:
        for bad in (math.nan, math.inf):
            value = (bad, 0.9) if key == "betas" else bad
            with pytest.raises(ValueError, match=f"{key}(\\[0\\])?={bad}"):
                model = _model()
                opt = FACTORIES[name](model.parameters())
                opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(1))], key: value})
            model, opt = _warm(name)
            snap = _snapshot(model, opt)
            opt.param_groups[0][key] = value  # as a scheduler or the user might
            with pytest.raises(ValueError, match=f"{key}(\\[0\\])?={bad} in param group 0"):
                opt.step(_make_closure(name, model, 2))
            _unchanged(model, opt, snap)


@pytest.mark.parametrize(
    "build",
    [
        lambda ps: ZOSGD(ps, lr=math.nan),
        lambda ps: ZOSGD(ps, lr=0.1, weight_decay=math.nan),
        lambda ps: ZOAdam(ps, lr=math.inf),
        lambda ps: CBO(ps, lr=math.nan),
        lambda ps: Sophia(ps, lr=math.nan),
        lambda ps: AdaHessian(ps, lr=math.inf),
        lambda ps: MFAC(ps, lr=math.nan),
        lambda ps: SAM(ps, lr=math.nan),
        lambda ps: Lion(ps, lr=math.inf),
        lambda ps: DiffGrad(ps, lr=math.nan),
    ],
)
def test_a_nonfinite_learning_rate_is_refused_by_every_constructor(build):
    with pytest.raises(ValueError, match="(lr|weight_decay)=(nan|inf)"):
        build([torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))])


def test_zo_mu_changed_by_hand_is_checked_at_the_step():
    model = _model()
    opt = ZOSGD(model.parameters(), lr=0.1)
    opt.estimator.mu = math.nan
    with pytest.raises(ValueError, match="mu=nan"):
        opt.step(_graph_closure("zosgd", model, 0))


def test_cbo_and_mfac_add_param_group_before_the_first_step_and_refuse_after():
    for name in ("cbo", "mfac"):
        model = _model()
        first, second = list(model[0].parameters()), list(model[2].parameters())
        opt = FACTORIES[name](first)
        opt.add_param_group({"params": second})
        before = [p.detach().clone() for p in model.parameters()]
        opt.step(_make_closure(name, model, 0))
        opt.step(_make_closure(name, model, 1))
        assert all(not torch.equal(p, w) for p, w in zip(model.parameters(), before))
        extra = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
        with pytest.raises(ValueError, match="cannot add a param group after its first step"):
            opt.add_param_group({"params": [extra]})
        assert len(opt.param_groups) == 2
    with pytest.raises(ValueError, match="share the dtype"):
        CBO(model[0].parameters()).add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))]})


def test_the_estimators_restore_the_weights_when_the_closure_raises():
    from anyorder.estimators import SPSA, CoordinateWise

    w = torch.nn.Parameter(torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64))
    for est in (CoordinateWise(mu=1e-3), SPSA(mu=1e-3)):
        for k in range(2):  # SPSA: two evaluations; CoordinateWise: four
            calls = [0]

            def closure(backward=False, k=k, calls=calls):
                calls[0] += 1
                if calls[0] > k:
                    raise KeyboardInterrupt
                return (w**2).sum()

            before = w.detach().clone()
            with pytest.raises(KeyboardInterrupt):
                if isinstance(est, SPSA):
                    est.estimate_([w], closure, step=0)
                else:
                    est.estimate_([w], closure)
            assert (w.detach() - before).abs().max() <= 1e-15


def test_huge_but_finite_gradients_are_not_mistaken_for_nonfinite_ones():
    # Their sum of squares overflows float32; the policy looks again by the largest magnitude.
    p = torch.nn.Parameter(torch.ones(10))
    opt = Lion([p], lr=0.1)
    p.grad = torch.full((10,), 1e30)
    opt.step()
    assert (
        torch.allclose(p.detach(), torch.full((10,), 0.9))
        and opt.global_state["skipped_steps"] == 0
    )
