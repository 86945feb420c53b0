"""ZOSGD and ZOAdam: parity with the rules fed by SPSA, the MeZO memory property, the contract."""

import io
import math
import warnings

import pytest
import torch
from torch import nn

from anyorder.bench.measure import peak_memory_bytes
from anyorder.core.base import NonFiniteLossError
from anyorder.core.closure import make_closure
from anyorder.core.rng import CHUNK, direction, flat_view
from anyorder.estimators import SPSA
from anyorder.optim import ZOSGD, ZOAdam


def _model(dtype=torch.float64, seed=0):
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).to(dtype)


def _batch(dtype=torch.float64):
    g = torch.Generator().manual_seed(1)
    return torch.randn(32, 6, generator=g, dtype=dtype), torch.randint(0, 3, (32,), generator=g)


def _closure(model, batch):
    return make_closure(model, nn.functional.cross_entropy, batch)


@pytest.mark.parametrize(
    "zo_cls,zo_kwargs,ref_cls,ref_kwargs",
    [
        (ZOSGD, dict(lr=0.05), torch.optim.SGD, dict(lr=0.05)),
        (
            ZOSGD,
            dict(lr=0.05, momentum=0.9, weight_decay=0.01),
            torch.optim.SGD,
            dict(lr=0.05, momentum=0.9, weight_decay=0.01),
        ),
        (
            ZOAdam,
            dict(lr=0.01, betas=(0.8, 0.99), weight_decay=0.01),
            torch.optim.Adam,
            dict(lr=0.01, betas=(0.8, 0.99), weight_decay=0.01),
        ),
    ],
)
@pytest.mark.parametrize("n_queries,one_sided", [(1, False), (3, False), (2, True)])
def test_zo_optimizer_equals_the_torch_rule_fed_by_spsa(
    zo_cls, zo_kwargs, ref_cls, ref_kwargs, n_queries, one_sided
):
    batch = _batch()
    ours, ref = _model(), _model()
    opt = zo_cls(
        ours.parameters(), mu=1e-3, n_queries=n_queries, one_sided=one_sided, seed=7, **zo_kwargs
    )
    est = SPSA(mu=1e-3, n_queries=n_queries, one_sided=one_sided, seed=7)
    ref_opt = ref_cls(ref.parameters(), **ref_kwargs)
    for step in range(25):
        loss = opt.step(_closure(ours, batch))
        sample = est.estimate_(list(ref.parameters()), _closure(ref, batch), step)
        ref_opt.step()
        assert loss == pytest.approx(sample.mean_loss, rel=1e-9)
    for a, b in zip(ours.parameters(), ref.parameters()):
        assert torch.allclose(a, b, rtol=0, atol=1e-12)
    assert opt.global_state["evaluations"] == 25 * est.evaluations_per_step


def test_lr_zero_restores_the_weights_to_within_two_ulps_and_replicas_stay_identical():
    # w + mu z - 2 mu z + mu z rounds three times, each within half an ulp of |w| + 2 mu |z|.
    batch = _batch(torch.float32)
    model = _model(torch.float32)
    before = [p.detach().clone() for p in model.parameters()]
    mu = 1e-3
    opt = ZOSGD(model.parameters(), lr=0.0, mu=mu, seed=1)
    opt.step(_closure(model, batch))
    eps = torch.finfo(torch.float32).eps
    for index, (p, b) in enumerate(zip(model.parameters(), before)):
        z = direction(p.shape, 1, 0, 0, index, distribution="rademacher")
        ulp = eps * (b.abs() + 2 * mu * z.abs())
        assert torch.all((p.detach() - b).abs() <= 2 * ulp)
    assert any(not torch.equal(p, b) for p, b in zip(model.parameters(), before))  # not a no-op
    a, b = _model(torch.float32), _model(torch.float32)
    oa = ZOAdam(a.parameters(), lr=1e-2, seed=4)
    ob = ZOAdam(b.parameters(), lr=1e-2, seed=4)
    for _ in range(10):
        oa.step(_closure(a, batch))
        ob.step(_closure(b, batch))
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize(
    "cls,kwargs", [(ZOSGD, dict(lr=0.05, momentum=0.9)), (ZOAdam, dict(lr=1e-2))]
)
def test_state_dict_round_trip_resumes_bit_identically(cls, kwargs):
    batch = _batch()
    model = _model()
    opt = cls(model.parameters(), seed=11, **kwargs)
    for _ in range(5):
        opt.step(_closure(model, batch))
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    for _ in range(5):
        opt.step(_closure(model, batch))
    uninterrupted = [p.detach().clone() for p in model.parameters()]

    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    resumed = _model(seed=99)
    resumed.load_state_dict(saved["model"])
    fresh = cls(resumed.parameters(), seed=0, **kwargs)  # seed comes back from the state dict
    fresh.load_state_dict(saved["opt"])
    for _ in range(5):
        fresh.step(_closure(resumed, batch))
    assert all(torch.equal(a, b) for a, b in zip(resumed.parameters(), uninterrupted))


def test_param_groups_with_different_lr_and_frozen_parameters():
    batch = _batch()
    model = _model()
    first, second = model[0], model[2]
    second.bias.requires_grad_(False)
    frozen = second.bias.detach().clone()
    w1, w2 = first.weight.detach().clone(), second.weight.detach().clone()
    opt = ZOSGD(
        [{"params": first.parameters(), "lr": 0.1}, {"params": second.parameters(), "lr": 0.0}],
        lr=1.0,
        seed=2,
    )
    sched = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5)
    opt.step(_closure(model, batch))
    assert torch.equal(second.bias, frozen)  # never perturbed, never updated
    assert torch.allclose(second.weight, w2, atol=1e-15)  # lr 0: restored
    g = opt.last_sample.projected[0]
    z = direction(w1.shape, 2, 0, 0, 0, distribution="rademacher", dtype=torch.float64)
    assert torch.allclose(first.weight, w1 - 0.1 * g * z, atol=1e-13)
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)


@pytest.mark.parametrize(
    "cls,kwargs",
    [
        (ZOSGD, dict(lr=1e-6)),
        (ZOSGD, dict(lr=1e-6, momentum=0.9, n_queries=2)),
        (ZOAdam, dict(lr=1e-6)),
    ],
)
def test_memory_stays_at_inference_level(cls, kwargs):
    # Two 4 MB tensors. A weight copy, a whole direction or a whole estimate would each need
    # >= 4 MB; directions are drawn in chunks of CHUNK elements (256 KiB), a few alive at once.
    model = nn.Sequential(nn.Linear(1000, 1000, bias=False), nn.Linear(1000, 1000, bias=False))
    x = torch.randn(4, 1000)

    def closure(backward=False):
        return model(x).pow(2).mean()

    opt = cls(model.parameters(), seed=0, **kwargs)
    opt.step(closure)  # creates ZOAdam's moment buffers / the momentum buffer
    with torch.no_grad():
        inference = peak_memory_bytes(lambda: closure())
    peak = peak_memory_bytes(lambda: opt.step(closure))
    assert peak <= inference + 8 * CHUNK * 4, (peak, inference)
    assert all(p.grad is None for p in model.parameters())
    expected_state = {ZOAdam: {"exp_avg", "exp_avg_sq"}}.get(
        cls, {"momentum_buffer"} if kwargs.get("momentum") else set()
    )
    for p in model.parameters():
        assert set(opt.state[p]) == expected_state


def test_channels_last_weights_are_perturbed_in_memory_order():
    conv = nn.Conv2d(3, 8, 3).to(memory_format=torch.channels_last)
    assert not conv.weight.is_contiguous()
    x = torch.randn(2, 3, 8, 8).to(memory_format=torch.channels_last)
    before = conv.weight.detach().clone()
    opt = ZOSGD(conv.parameters(), lr=0.0, seed=3)
    opt.step(lambda backward=False: conv(x).pow(2).mean())
    assert torch.allclose(conv.weight, before, atol=1e-6)
    assert conv.weight.stride() == before.stride()
    moved = ZOSGD(conv.parameters(), lr=0.1, seed=3)
    moved.step(lambda backward=False: conv(x).pow(2).mean())
    g = moved.last_sample.projected[0]
    z = direction((conv.weight.numel(),), 3, 0, 0, 0, distribution="rademacher")
    assert torch.allclose(
        flat_view(conv.weight.detach()), flat_view(before) - 0.1 * g * z, atol=1e-6
    )


def test_nonfinite_loss_never_reaches_the_weights():
    model = _model()
    batch = _batch()
    before = [p.detach().clone() for p in model.parameters()]
    calls = {"n": 0}

    def flaky(backward=True):
        calls["n"] += 1
        loss = nn.functional.cross_entropy(model(batch[0]), batch[1])
        return loss * float("nan") if calls["n"] == 2 else loss

    opt = ZOSGD(model.parameters(), lr=0.1, seed=0)
    loss = opt.step(flaky)
    assert math.isnan(loss)
    assert opt.global_state["skipped_steps"] == 1 and opt.global_state["updates"] == 0
    for p, b in zip(model.parameters(), before):
        assert torch.allclose(p, b, atol=1e-15)
    strict = ZOAdam(model.parameters(), lr=0.1, on_nonfinite="raise")
    calls["n"] = 0
    with pytest.raises(NonFiniteLossError):
        strict.step(flaky)
    for p, b in zip(model.parameters(), before):
        assert torch.allclose(p, b, atol=1e-15)


def test_dropout_masks_are_shared_by_both_evaluations_of_a_query():
    # loss = sum(W dropout(x)) is linear in W: the central difference is exact only if both
    # evaluations see the same mask.
    torch.manual_seed(0)
    lin = nn.Linear(50, 4, bias=False).double()
    model = nn.Sequential(nn.Dropout(0.5), lin)
    x = torch.randn(8, 50, dtype=torch.float64)
    closure = make_closure(
        model, lambda out, _b: out.sum(), (x, None), forward=lambda m, b: m(b[0])
    )
    state = torch.get_rng_state()
    opt = ZOSGD(model.parameters(), lr=0.0, mu=1e-3, seed=5)
    opt.step(closure)
    torch.set_rng_state(state)
    mask_grad = torch.autograd.grad(model(x).sum(), lin.weight)[0]
    z = direction(lin.weight.shape, 5, 0, 0, 0, distribution="rademacher", dtype=torch.float64)
    assert opt.last_sample.projected[0] == pytest.approx(float((mask_grad * z).sum()), rel=1e-8)


def test_batchnorm_statistics_update_once_per_step():
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Linear(8, 3)).double()
    batch = _batch()
    opt = ZOSGD(model.parameters(), lr=0.01, n_queries=3)
    for _ in range(4):
        opt.step(_closure(model, batch))
    assert int(model[1].num_batches_tracked) == 4


def test_probe_records_cosine_with_the_backprop_gradient():
    batch = _batch()
    model = _model()
    opt = ZOSGD(model.parameters(), lr=0.0, n_queries=64, seed=0, probe_every=2)
    for _ in range(4):
        opt.step(_closure(model, batch))
    assert [r.step for r in opt.probes] == [0, 2]
    d = sum(p.numel() for p in model.parameters())
    for r in opt.probes:
        # With 64 queries in d = 83 dimensions the cosine is far above a random direction's.
        assert r.cosine > 3 * math.sqrt(1 / d)
        assert r.gradient_norm > 0 and r.projected_gradient > 0
    assert all(p.grad is None for p in model.parameters())


def test_losses_and_projected_gradient_in_float64_and_mu_warning_for_bfloat16():
    model = _model(torch.bfloat16)
    batch = _batch(torch.bfloat16)
    with pytest.warns(RuntimeWarning, match="mu=1e-05 is below the resolution of torch.bfloat16"):
        ZOSGD(model.parameters(), lr=0.01, mu=1e-5).step(_closure(model, batch))
    opt = ZOSGD(model.parameters(), lr=0.01, mu=1e-2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step(_closure(model, batch))
    s = opt.last_sample
    assert isinstance(s.projected[0], float)
    assert s.projected[0] == (s.losses[0] - s.losses[1]) / (2 * 1e-2)


def test_bad_input():
    model = _model()
    with pytest.raises(ValueError, match="needs a closure"):
        ZOSGD(model.parameters(), lr=0.1).step()
    with pytest.raises(ValueError, match="scalar loss.*got a tensor of shape \\(32, 3\\)"):
        x, _ = _batch()
        ZOSGD(model.parameters(), lr=0.1).step(lambda: model(x))
    with pytest.raises(ValueError, match="mu must be a finite number > 0, got 0"):
        ZOSGD(model.parameters(), lr=0.1, mu=0)
    with pytest.raises(ValueError, match="unknown distribution 'normal'"):
        ZOAdam(model.parameters(), lr=0.1, distribution="normal")
    with pytest.raises(ValueError, match="invalid learning rate lr=-1"):
        ZOSGD(model.parameters(), lr=-1)
    with pytest.raises(ValueError, match="momentum must be in \\[0, 1\\), got 1.5"):
        ZOSGD(model.parameters(), lr=0.1, momentum=1.5)
    with pytest.raises(ValueError, match="betas must be two numbers"):
        ZOAdam(model.parameters(), lr=0.1, betas=(0.9, 1.0))


def test_probe_compares_estimate_and_gradient_in_the_same_layout_for_channels_last_weights():
    conv = nn.Conv2d(3, 4, 3, bias=False).double().to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64).to(memory_format=torch.channels_last)

    def closure(backward=False):
        return conv(x).pow(2).mean()

    grad = torch.autograd.grad(closure(), conv.weight)[0]
    opt = ZOSGD(conv.parameters(), lr=0.0, seed=4, probe_every=1)
    opt.step(closure)
    g = opt.last_sample.projected[0]
    z = direction(
        (conv.weight.numel(),), 4, 0, 0, 0, distribution="rademacher", dtype=torch.float64
    )
    # The direction runs over the weight in memory order; so must the gradient it is compared with.
    grad_memory_order = grad.permute(0, 2, 3, 1).reshape(-1)
    expected = float(torch.dot(g * z, grad_memory_order) / ((g * z).norm() * grad.norm()))
    assert opt.probes[0].cosine == pytest.approx(expected, rel=1e-9)
