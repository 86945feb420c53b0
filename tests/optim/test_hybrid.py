"""HybridZO: one step = the exact gradient step on the head + the ZO-SGD step on the body."""

import copy

import pytest
import torch
from torch import nn

from anyorder.core.rng import direction
from anyorder.optim import HybridZO


def _net(dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(dtype)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=dtype))
    return net


def _data(dtype=torch.float64):
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 4, generator=g, dtype=dtype), torch.randint(0, 3, (8,), generator=g)


def _loss(net, x, y):
    return nn.functional.cross_entropy(net(x), y)


def _closure(net, x, y, log=None):
    def closure(backward=True):
        if log is not None:
            log.append([p.requires_grad for p in net.parameters()] + [torch.is_grad_enabled()])
        loss = _loss(net, x, y)
        if backward:
            net.zero_grad()
            loss.backward()
        return loss

    return closure


def _groups(net, **head):
    return [{"params": net[0].parameters()}, {"params": net[2].parameters(), "order": 1, **head}]


def test_one_step_equals_exact_head_gradient_plus_zo_body_estimate_float64():
    x, y = _data()
    net = _net()
    ref = copy.deepcopy(net)
    mu, lr, lr_head, seed = 1e-3, 0.1, 0.5, 3
    opt = HybridZO(_groups(net, lr=lr_head), lr=lr, mu=mu, seed=seed, distribution="rademacher")
    log = []
    for step in range(3):
        opt.step(_closure(net, x, y, log))
        # The hand-written reference at the same point w: autograd on the head ...
        body, head = list(ref[0].parameters()), list(ref[2].parameters())
        g_head = torch.autograd.grad(_loss(ref, x, y), head)
        # ... and the two-point estimate on the body along the optimizer's directions (tensor
        # indices 0 and 1: positions over all groups).
        z = [
            direction(p.shape, seed, step, 0, i, distribution="rademacher", dtype=torch.float64)
            for i, p in enumerate(body)
        ]
        with torch.no_grad():
            for p, zi in zip(body, z):
                p.add_(mu * zi)
            plus = float(_loss(ref, x, y))
            for p, zi in zip(body, z):
                p.sub_(2 * mu * zi)
            minus = float(_loss(ref, x, y))
            for p, zi in zip(body, z):
                p.add_(mu * zi)
            g = (plus - minus) / (2 * mu)
            assert opt.last_sample.projected[0] == pytest.approx(g, rel=1e-8)
            for p, zi in zip(body, z):
                p.sub_(lr * g * zi)
            for p, gh in zip(head, g_head):
                p.sub_(lr_head * gh)
        for a, b in zip(net.parameters(), ref.parameters()):
            assert torch.allclose(a, b, rtol=0, atol=1e-12)
    assert opt.global_state["evaluations"] == 9  # 1 with the head's graph + 2 ZO per step
    # The exact evaluation ran with grad on and the body's requires_grad off (head's graph only);
    # the ZO evaluations ran without grad; the flags are back afterwards.
    assert log[0] == [False, False, True, True, True]
    assert [entry[-1] for entry in log[1:3]] == [False, False]
    assert all(p.requires_grad for p in net.parameters())
    assert opt.global_state["exact_loss"] is not None


def test_head_momentum_and_weight_decay_follow_torch_sgd():
    x, y = _data()
    net = _net()
    ref = copy.deepcopy(net)
    head_kw = dict(lr=0.3, momentum=0.9, weight_decay=0.01)
    opt = HybridZO(_groups(net, **head_kw), lr=0.0, mu=1e-3, seed=0)
    sgd = torch.optim.SGD(ref[2].parameters(), **head_kw)
    for _ in range(4):
        opt.step(_closure(net, x, y))
        sgd.zero_grad()
        _loss(ref, x, y).backward()
        sgd.step()
    for a, b in zip(net[2].parameters(), ref[2].parameters()):
        assert torch.allclose(a, b, rtol=0, atol=1e-12)
    for a, b in zip(net[0].parameters(), ref[0].parameters()):
        assert torch.allclose(a, b, rtol=0, atol=1e-12)  # body lr 0: restored


def test_exception_or_nonfinite_changes_nothing_and_restores_requires_grad():
    x, y = _data()
    net = _net()
    before = [p.detach().clone() for p in net.parameters()]
    opt = HybridZO(_groups(net), lr=0.1, mu=1e-3)

    def boom(backward=True):
        _loss(net, x, y)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        opt.step(boom)
    assert all(p.requires_grad for p in net.parameters())
    assert all(torch.equal(p, b) for p, b in zip(net.parameters(), before))
    assert opt.global_state["step"] == 0

    def nan_closure(backward=True):
        return _loss(net, x, y) * float("nan")

    opt.step(nan_closure)
    assert all(torch.equal(p, b) for p, b in zip(net.parameters(), before))
    assert opt.global_state["skipped_steps"] == 1 and opt.global_state["updates"] == 0


def test_exact_lr_is_the_default_of_exact_groups_and_bad_values_are_refused():
    net = _net()
    opt = HybridZO(_groups(net), lr=0.1, exact_lr=0.5)
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.5]
    opt = HybridZO(_groups(net, lr=0.2), lr=0.1, exact_lr=0.5)
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.2]
    with pytest.raises(ValueError, match="exact_lr"):
        HybridZO(_groups(net), lr=0.1, exact_lr=-1.0)
    with pytest.raises(ValueError, match="order"):
        HybridZO([{"params": net.parameters(), "order": 2}], lr=0.1)
    with pytest.raises(ValueError, match="order"):
        HybridZO(net.parameters(), lr=0.1, order=True)


def test_memory_is_inference_plus_the_head_graph():
    # A wide body: a backward through it would keep its activations (8 x 4096 floats per layer).
    from anyorder.bench.measure import peak_memory_bytes

    torch.manual_seed(0)
    body = nn.Sequential(*[nn.Sequential(nn.Linear(512, 512), nn.Tanh()) for _ in range(8)])
    net = nn.Sequential(body, nn.Linear(512, 2))
    x, y = torch.randn(256, 512), torch.randint(0, 2, (256,))
    groups = [{"params": body.parameters()}, {"params": net[1].parameters(), "order": 1}]
    opt = HybridZO(groups, lr=1e-4, mu=1e-3, restore="arithmetic")
    exact = HybridZO(groups, lr=1e-4, mu=1e-3)  # the default bit-exact restore
    for o in (opt, exact):
        o.step(_closure(net, x, y))  # warm-up

    def infer():
        with torch.no_grad():
            _loss(net, x, y)

    inference = peak_memory_bytes(infer)
    hybrid = peak_memory_bytes(lambda: opt.step(_closure(net, x, y)))
    full = peak_memory_bytes(lambda: _closure(net, x, y)(backward=True))
    assert hybrid <= 1.25 * inference < full / 2
    # The exact restore adds its codes (2 bits per body weight) and escapes: ~7% of the body's
    # float32 bytes (README, "Exact restore of zeroth-order steps"), nothing per activation.
    body_bytes = sum(p.numel() * p.element_size() for p in body.parameters())
    guarded = peak_memory_bytes(lambda: exact.step(_closure(net, x, y)))
    assert guarded <= 1.25 * inference + 0.1 * body_bytes


def test_constructor_keeps_every_zosgd_option_with_the_same_default():
    """HybridZO spells out ZOSGD's constructor (for signatures and help); this holds the two
    together: an option added to ZOSGD (as ``restore=`` was) must be added here too."""
    import inspect

    from anyorder.optim import ZOSGD

    zo = inspect.signature(ZOSGD.__init__).parameters
    hybrid = inspect.signature(HybridZO.__init__).parameters
    missing = [name for name in zo if name not in hybrid]
    assert not missing, f"HybridZO lacks ZOSGD's {missing}"
    for name, param in zo.items():
        assert hybrid[name].default == param.default, name
        assert hybrid[name].kind == param.kind, name
    positional = inspect.Parameter.POSITIONAL_OR_KEYWORD
    assert [n for n, q in hybrid.items() if q.kind == positional] == [
        n for n, q in zo.items() if q.kind == positional
    ]  # the same positional order: HybridZO(params, 1e-3, 1e-3, ...) means what ZOSGD's does
