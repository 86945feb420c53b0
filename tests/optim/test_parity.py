"""Each optimizer's trajectory against a plain per-tensor reference of its paper's update rule
(float64, 25 steps, two param groups, a conv layer for AdaHessian's spatial averaging). Hessian
diagonals in the references come from the dense Hessian (torch.func.hessian) applied to the same
replayed probes, so they check the library's own Hessian-vector products too."""

import math

import pytest
import torch
import torch.nn.functional as F

from anyorder.core.rng import direction, generator_for
from anyorder.optim import SAM, AdaHessian, DiffGrad, Lion, Sophia

STEPS = 25
SHAPES = {"conv": (2, 1, 3, 3), "conv_b": (2,), "lin": (3, 18), "lin_b": (3,)}


def _make_data(t):
    g = torch.Generator().manual_seed(100 + t)
    x = torch.randn(12, 1, 5, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (12,), generator=g)
    return x, y


DATA = [_make_data(t) for t in range(STEPS)]


def _data(t):
    return DATA[t]


def _logits(ps, x):
    h = torch.tanh(F.conv2d(x, ps["conv"], ps["conv_b"]))
    return h.flatten(1) @ ps["lin"].T + ps["lin_b"]


def _loss(ps, t):
    x, y = _data(t)
    return F.cross_entropy(_logits(ps, x), y)


def _init():
    g = torch.Generator().manual_seed(0)
    return {k: 0.5 * torch.randn(s, generator=g, dtype=torch.float64) for k, s in SHAPES.items()}


def _ours(cls, **kwargs):
    """Our optimizer on the same problem: params in two groups; returns (params, opt, closure)."""
    ps = {k: v.clone().requires_grad_() for k, v in _init().items()}
    groups = [
        {"params": [ps["conv"], ps["conv_b"]]},
        {"params": [ps["lin"], ps["lin_b"]], "lr": kwargs.pop("lr2")},
    ]
    opt = cls(groups, **kwargs)
    return ps, opt


def _closure(ps, t, with_logits=False):
    def closure(backward: bool = True):
        x, y = _data(t)
        logits = _logits(ps, x)
        loss = F.cross_entropy(logits, y)
        if backward:
            for p in ps.values():
                p.grad = None
            loss.backward()
        return (loss, logits) if with_logits else loss

    return closure


def _grad(ps, t):
    ps = {k: v.detach().clone().requires_grad_() for k, v in ps.items()}
    loss = _loss(ps, t)
    return dict(zip(ps, torch.autograd.grad(loss, list(ps.values()))))


def _dense_hessian(ps, t):
    keys = list(ps)
    sizes = [ps[k].numel() for k in keys]
    flat = torch.cat([ps[k].reshape(-1) for k in keys])

    def f(v):
        return _loss({k: c.view(SHAPES[k]) for k, c in zip(keys, v.split(sizes))}, t)

    return torch.func.hessian(f)(flat)


def _hutchinson(ps, t, seed, step):
    # The probe: one flat Rademacher direction keyed by (seed, step, 0) over the parameters in
    # order (conv, conv_b, lin, lin_b), split into their shapes.
    keys = list(ps)
    sizes = [ps[k].numel() for k in keys]
    zflat = direction(
        (sum(sizes),), seed, step, 0, 0, distribution="rademacher", dtype=torch.float64
    )
    hz = _dense_hessian(ps, t) @ zflat
    out, start = {}, 0
    for k, n in zip(keys, sizes):
        out[k] = (zflat[start : start + n] * hz[start : start + n]).view(SHAPES[k])
        start += n
    return out


def _lrs(lr, lr2):
    return {"conv": lr, "conv_b": lr, "lin": lr2, "lin_b": lr2}


def _check(ps, ref):
    for k in SHAPES:
        assert torch.allclose(ps[k].detach(), ref[k], rtol=0, atol=1e-11), k


@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_sophia_hutchinson_matches_reference(wd):
    lr, lr2, b1, b2, rho, eps, k, seed = 0.02, 0.01, 0.9, 0.95, 0.05, 1e-12, 3, 7
    ps, opt = _ours(
        Sophia,
        lr=lr,
        lr2=lr2,
        betas=(b1, b2),
        rho=rho,
        weight_decay=wd,
        eps=eps,
        update_every=k,
        seed=seed,
    )
    ref = _init()
    m = {n: torch.zeros_like(v) for n, v in ref.items()}
    h = {n: torch.zeros_like(v) for n, v in ref.items()}
    lrs = _lrs(lr, lr2)
    clipped_any = False
    total = sum(v.numel() for v in ref.values())
    for t in range(STEPS):
        opt.step(_closure(ps, t))
        g = _grad(ref, t)
        if t % k == 0:
            hh = _hutchinson(ref, t, seed, t)
            for n in ref:
                h[n] = b2 * h[n] + (1 - b2) * hh[n]
        clipped = 0
        for n in ref:
            ref[n] = ref[n] * (1 - lrs[n] * wd)
            m[n] = b1 * m[n] + (1 - b1) * g[n]
            ratio = m[n] / torch.clamp(rho * h[n], min=eps)
            clipped += int((ratio.abs() >= 1).sum())
            ref[n] = ref[n] - lrs[n] * torch.clamp(ratio, -1, 1)
        if t % 2 == 0:  # read every other step: an unread (lazy) figure is replaced correctly
            assert opt.telemetry["clip_fraction"] == clipped / total
            assert opt.telemetry["refreshed"] == (t % k == 0)
        clipped_any |= clipped > 0
        _check(ps, ref)
    assert clipped_any
    assert opt.telemetry["hessian_norm"] == pytest.approx(
        math.sqrt(sum(float((v**2).sum()) for v in h.values())), rel=1e-9
    )


def test_sophia_gnb_matches_reference():
    lr, lr2, b1, b2, rho, eps, k, seed = 0.02, 0.01, 0.9, 0.95, 0.05, 1e-12, 4, 3
    ps, opt = _ours(
        Sophia,
        lr=lr,
        lr2=lr2,
        betas=(b1, b2),
        rho=rho,
        weight_decay=0.0,
        eps=eps,
        update_every=k,
        seed=seed,
        estimator="gnb",
    )
    ref = _init()
    m = {n: torch.zeros_like(v) for n, v in ref.items()}
    h = {n: torch.zeros_like(v) for n, v in ref.items()}
    lrs = _lrs(lr, lr2)
    for t in range(STEPS):
        opt.step(_closure(ps, t, with_logits=True))
        g = _grad(ref, t)
        if t % k == 0:
            x, _ = _data(t)
            leaves = {n: v.clone().requires_grad_() for n, v in ref.items()}
            logits = _logits(leaves, x)
            probs = torch.softmax(logits.detach().float(), -1)
            labels = torch.multinomial(probs, 1, generator=generator_for(seed, t)).view(-1)
            gs = torch.autograd.grad(F.cross_entropy(logits, labels), list(leaves.values()))
            for n, gn in zip(leaves, gs):
                h[n] = b2 * h[n] + (1 - b2) * len(labels) * gn * gn
        for n in ref:
            m[n] = b1 * m[n] + (1 - b1) * g[n]
            ref[n] = ref[n] - lrs[n] * torch.clamp(m[n] / torch.clamp(rho * h[n], min=eps), -1, 1)
        _check(ps, ref)


@pytest.mark.parametrize("k,power,wd", [(1, 1.0, 0.0), (2, 0.5, 0.01)])
def test_adahessian_matches_reference(k, power, wd):
    lr, lr2, b1, b2, eps, seed = 0.05, 0.02, 0.9, 0.99, 1e-4, 5
    ps, opt = _ours(
        AdaHessian,
        lr=lr,
        lr2=lr2,
        betas=(b1, b2),
        eps=eps,
        weight_decay=wd,
        hessian_power=power,
        update_every=k,
        seed=seed,
    )
    ref = _init()
    m = {n: torch.zeros_like(v) for n, v in ref.items()}
    v = {n: torch.zeros_like(x) for n, x in ref.items()}
    lrs = _lrs(lr, lr2)
    s = 0
    for t in range(STEPS):
        opt.step(_closure(ps, t))
        g = _grad(ref, t)
        if t % k == 0:
            s += 1
            d = _hutchinson(ref, t, seed, t)
            for n in ref:
                dn = d[n]
                if dn.dim() == 4:  # the paper's eq. 11: mean over each kernel window
                    for o in range(dn.shape[0]):
                        for i in range(dn.shape[1]):
                            dn[o, i] = dn[o, i].mean()
                v[n] = b2 * v[n] + (1 - b2) * dn * dn
        for n in ref:
            m[n] = b1 * m[n] + (1 - b1) * g[n]
            denom = (torch.sqrt(v[n]) / math.sqrt(1 - b2**s)) ** power + eps
            # The authors' optim_adahessian.py: p -= lr * (m / bias_correction1 / denom + wd * p)
            ref[n] = ref[n] - lrs[n] * (m[n] / (1 - b1 ** (t + 1)) / denom + wd * ref[n])
        _check(ps, ref)


@pytest.mark.parametrize("wd", [0.0, 0.3])
def test_lion_matches_reference(wd):
    lr, lr2, b1, b2 = 0.01, 0.003, 0.9, 0.99
    ps, opt = _ours(Lion, lr=lr, lr2=lr2, betas=(b1, b2), weight_decay=wd)
    ref = _init()
    m = {n: torch.zeros_like(v) for n, v in ref.items()}
    lrs = _lrs(lr, lr2)
    for t in range(STEPS):
        opt.zero_grad()
        _loss(ps, t).backward()  # the standard loop, no closure
        opt.step()
        g = _grad(ref, t)
        for n in ref:
            c = b1 * m[n] + (1 - b1) * g[n]
            ref[n] = ref[n] * (1 - lrs[n] * wd) - lrs[n] * torch.sign(c)
            m[n] = b2 * m[n] + (1 - b2) * g[n]
        _check(ps, ref)


@pytest.mark.parametrize("wd", [0.0, 0.05])
def test_diffgrad_matches_reference(wd):
    lr, lr2, b1, b2, eps = 0.01, 0.02, 0.9, 0.999, 1e-8
    ps, opt = _ours(DiffGrad, lr=lr, lr2=lr2, betas=(b1, b2), eps=eps, weight_decay=wd)
    ref = _init()
    m = {n: torch.zeros_like(v) for n, v in ref.items()}
    v = {n: torch.zeros_like(x) for n, x in ref.items()}
    prev = {n: torch.zeros_like(x) for n, x in ref.items()}
    lrs = _lrs(lr, lr2)
    for t in range(STEPS):
        opt.step(_closure(ps, t))
        g = _grad(ref, t)
        for n in ref:
            gn = g[n] + wd * ref[n]
            m[n] = b1 * m[n] + (1 - b1) * gn
            v[n] = b2 * v[n] + (1 - b2) * gn * gn
            xi = 1 / (1 + torch.exp(-(prev[n] - gn).abs()))
            prev[n] = gn
            step = t + 1
            step_size = lrs[n] * math.sqrt(1 - b2**step) / (1 - b1**step)
            ref[n] = ref[n] - step_size * xi * m[n] / (torch.sqrt(v[n]) + eps)
        _check(ps, ref)


@pytest.mark.parametrize("adaptive", [False, True])
def test_sam_matches_reference(adaptive):
    lr, lr2, rho, eta, mom = 0.1, 0.05, 0.05, 0.01, 0.9
    ps, opt = _ours(
        SAM,
        lr=lr,
        lr2=lr2,
        base_optimizer=torch.optim.SGD,
        rho=rho,
        adaptive=adaptive,
        eta=eta,
        momentum=mom,
    )
    ref = _init()
    buf = {n: None for n in ref}
    lrs = _lrs(lr, lr2)
    for t in range(STEPS):
        loss = opt.step(_closure(ps, t))
        assert float(loss) == pytest.approx(float(_loss(ref, t)), abs=1e-12)
        g = _grad(ref, t)
        tw = {n: (ref[n].abs() + eta) if adaptive else torch.ones_like(ref[n]) for n in ref}
        norm = math.sqrt(sum(float(((tw[n] * g[n]) ** 2).sum()) for n in ref))
        e = {n: rho * tw[n] ** 2 * g[n] / (norm + 1e-12) for n in ref}
        assert opt.telemetry["perturbation_norm"] == pytest.approx(
            math.sqrt(sum(float((x**2).sum()) for x in e.values())), rel=1e-10
        )
        g_adv = _grad({n: ref[n] + e[n] for n in ref}, t)
        for n in ref:
            buf[n] = g_adv[n].clone() if buf[n] is None else mom * buf[n] + g_adv[n]
            ref[n] = ref[n] - lrs[n] * buf[n]
        _check(ps, ref)


def test_sam_manual_first_and_second_step():
    lr, rho = 0.1, 0.05
    ps, opt = _ours(SAM, lr=lr, lr2=lr, rho=rho)
    ps2, opt2 = _ours(SAM, lr=lr, lr2=lr, rho=rho)
    for t in range(5):
        opt.step(_closure(ps, t))
        _loss(ps2, t).backward()
        opt2.first_step(zero_grad=True)
        _loss(ps2, t).backward()
        opt2.second_step(zero_grad=True)
    for k in ps:
        assert torch.equal(ps[k], ps2[k])


@pytest.mark.parametrize("mom", [0.0, 0.9])
def test_mfac_matches_dense_inverse_of_damped_empirical_fisher(mom):
    from anyorder.optim import MFAC

    lr, lr2, m, lam = 0.01, 0.02, 4, 0.1
    ps, opt = _ours(MFAC, lr=lr, lr2=lr2, m=m, damping=lam, momentum=mom)
    ref = _init()
    keys = list(ref)
    window: list[torch.Tensor] = []
    buf = None
    lrs = torch.cat(
        [torch.full((ref[k].numel(),), _lrs(lr, lr2)[k], dtype=torch.float64) for k in keys]
    )
    for t in range(STEPS):
        opt.step(_closure(ps, t))
        g = _grad(ref, t)
        flat_g = torch.cat([g[k].reshape(-1) for k in keys])
        window = (window + [flat_g])[-m:]  # sliding window of the last m gradients
        d = flat_g.numel()
        fisher = lam * torch.eye(d, dtype=torch.float64)
        for w in window:
            fisher += torch.outer(w, w) / m
        u = torch.linalg.solve(fisher, flat_g)
        buf = u if buf is None or mom == 0 else mom * buf + u
        flat = torch.cat([ref[k].reshape(-1) for k in keys]) - lrs * buf
        ref = {
            k: c.view(SHAPES[k]) for k, c in zip(keys, flat.split([ref[k].numel() for k in keys]))
        }
        for k in SHAPES:
            err = float((ps[k].detach() - ref[k]).abs().max())
            assert err < 1e-10, (t, k, err)
