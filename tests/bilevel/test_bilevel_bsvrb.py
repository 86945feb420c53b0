"""BSVRB v1/v2 against a plain reference of the paper's update (flat vectors, torch.func
derivatives, the same block draws), convergence on a multi-block quadratic with a closed-form
solution, state_dict round trip and bad input."""

from __future__ import annotations

import io

import pytest
import torch
from torch.func import grad, jacfwd

from anyorder.bilevel import BSVRB

DT = torch.float64
M, NX, NY = 4, 2, 3


def _data():
    g = torch.Generator().manual_seed(3)
    As, Ws, Ts = [], [], []
    for _ in range(M):
        a = torch.randn(NY, NY, generator=g, dtype=DT)
        As.append(a @ a.T / NY + torch.eye(NY, dtype=DT))
        Ws.append(torch.randn(NY, NX, generator=g, dtype=DT))
        Ts.append(torch.randn(NY, generator=g, dtype=DT))
    x0 = torch.randn(NX, generator=g, dtype=DT) * 0.5
    y0 = torch.randn(M, NY, generator=g, dtype=DT) * 0.5
    return As, Ws, Ts, x0, y0


AS, WS, TS, X0, Y0 = _data()


def g_i(i, x, y):
    return 0.5 * y @ AS[i] @ y + torch.nn.functional.softplus((WS[i] @ x) * y).sum()


def f_i(i, x, y):
    return torch.log(torch.cosh(y - TS[i])).sum() + 0.1 * (x**2).sum() + 0.3 * torch.sin(x[0]) * y[1]


def d(fn, i, argnum):
    return grad(lambda x, y: fn(i, x, y), argnum)


def hyy(i, x, y):
    return jacfwd(d(g_i, i, 1), 1)(x, y)


def hxy_v(i, x, y, v):
    return jacfwd(d(g_i, i, 1), 0)(x, y).T @ v


def G_blk(i, x, y, H=None, v=None):
    if H is not None:
        v = torch.linalg.solve(H, d(f_i, i, 1)(x, y))
    return d(f_i, i, 0)(x, y) - hxy_v(i, x, y, v)


def clip(h, mu):
    e, q = torch.linalg.eigh(0.5 * (h + h.T))
    return (q * e.clamp(min=mu)) @ q.T


def reference(version, steps, lr, tau, tau_v, alpha, gamma, beta, mu, vmax, blocks, seed,
              y0=None):
    x, y = X0.clone(), (Y0 if y0 is None else y0).clone()
    xp, yp = x.clone(), y.clone()
    s = torch.zeros(M, NY, dtype=DT)
    z = torch.zeros(NX, dtype=DT)
    H = [torch.eye(NY, dtype=DT) for _ in range(M)]
    Hp = [h.clone() for h in H]
    u = torch.zeros(M, NY, dtype=DT)
    v = torch.zeros(M, NY, dtype=DT)
    vp = v.clone()
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        chosen = torch.randperm(M, generator=gen)[:blocks].tolist()
        Gn = torch.zeros(NX, dtype=DT)
        Go = torch.zeros(NX, dtype=DT)
        Hn = list(H)
        for i in chosen:
            s[i] = ((1 - alpha) * s[i] + (alpha + gamma) * d(g_i, i, 1)(x, y[i])
                    - gamma * d(g_i, i, 1)(xp, yp[i]))
            if version == "v1":
                Hn[i] = clip((1 - alpha) * H[i] + (alpha + gamma) * hyy(i, x, y[i])
                             - gamma * hyy(i, xp, yp[i]), mu)
                Gn += G_blk(i, x, y[i], H=H[i])
                Go += G_blk(i, xp, yp[i], H=Hp[i])
            else:
                r_new = hyy(i, x, y[i]) @ v[i] - d(f_i, i, 1)(x, y[i])
                r_old = hyy(i, xp, yp[i]) @ vp[i] - d(f_i, i, 1)(xp, yp[i])
                u[i] = (1 - alpha) * u[i] + (alpha + gamma) * r_new - gamma * r_old
                Gn += G_blk(i, x, y[i], v=v[i])
                Go += G_blk(i, xp, yp[i], v=vp[i])
        k = len(chosen)
        z = (1 - beta) * (z - Go / k) + Gn / k
        xp, yp = x.clone(), y.clone()
        x = x - lr * z
        y = y - tau * s
        if version == "v1":
            Hp, H = H, Hn
        else:
            vp = v.clone()
            v = v - tau_v * u
            for i in range(M):
                if v[i].norm() > vmax:
                    v[i] = v[i] * (vmax / v[i].norm())
    return x, y


class Blocks:
    def __init__(self):
        self.x = X0.clone().requires_grad_()
        self.y = [Y0[i].clone().requires_grad_() for i in range(M)]

    def inner(self, i):
        return g_i(i, self.x, self.y[i])

    def outer(self, i):
        return f_i(i, self.x, self.y[i])


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_bsvrb_matches_reference(version):
    b = Blocks()
    kw = dict(lr=0.05, inner_lr=0.2, v_lr=0.3, alpha=0.6, beta=0.4, mu=0.5, v_max=0.4,
              blocks=2, seed=7)
    opt = BSVRB([b.x], b.y, version=version, **kw)
    for _ in range(5):
        opt.step(b.inner, b.outer)
    gamma = (M - 2) / (2 * (1 - 0.6)) + (1 - 0.6)
    assert opt.gamma == pytest.approx(gamma)
    x, y = reference(version, 5, 0.05, 0.2, 0.3, 0.6, gamma, 0.4, 0.5, 0.4, 2, 7)
    assert torch.allclose(b.x.detach(), x, rtol=0, atol=1e-12)
    assert torch.allclose(torch.stack([t.detach() for t in b.y]), y, rtol=0, atol=1e-12)


def _quadratic_blocks():
    """g_i = y^T A_i y / 2 - y^T B_i x, f_i = ||y - t_i||^2 / 2 + rho ||x||^2 / 2:
    x* = (sum M_i^T M_i + m rho I)^{-1} sum M_i^T t_i with M_i = A_i^{-1} B_i."""
    g = torch.Generator().manual_seed(5)
    A, B, T = [], [], []
    for _ in range(M):
        q, _ = torch.linalg.qr(torch.randn(NY, NY, generator=g, dtype=DT))
        A.append((q * torch.linspace(1.0, 3.0, NY, dtype=DT)) @ q.T)
        B.append(torch.randn(NY, NX, generator=g, dtype=DT))
        T.append(torch.randn(NY, generator=g, dtype=DT))
    rho = 0.1
    Ms = [torch.linalg.solve(a, b) for a, b in zip(A, B)]
    lhs = sum(m.T @ m for m in Ms) + M * rho * torch.eye(NX, dtype=DT)
    xs = torch.linalg.solve(lhs, sum(m.T @ t for m, t in zip(Ms, T)))
    return A, B, T, rho, xs


@pytest.mark.parametrize("version", [pytest.param("v1", marks=pytest.mark.slow), "v2"])
def test_bsvrb_converges_on_multiblock_quadratic(version):
    A, B, T, rho, xs = _quadratic_blocks()
    x = torch.zeros(NX, dtype=DT, requires_grad=True)
    ys = [torch.zeros(NY, dtype=DT, requires_grad=True) for _ in range(M)]

    def inner(i):
        return 0.5 * ys[i] @ A[i] @ ys[i] - ys[i] @ B[i] @ x

    def outer(i):
        return 0.5 * (ys[i] - T[i]).square().sum() + 0.5 * rho * x.square().sum()

    # two of four blocks a step: a stochastic hypergradient, so a decaying step
    opt = BSVRB([x], ys, version=version, lr=0.05, inner_lr=0.3, blocks=2, alpha=0.5,
                gamma=0.5, beta=0.5, seed=1)
    sched = torch.optim.lr_scheduler.StepLR(opt, 100, 0.3)
    for _ in range(300):
        opt.step(inner, outer)
        sched.step()
    err = float((x.detach() - xs).norm() / xs.norm())
    assert err < 3e-2, err


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_bsvrb_state_dict_round_trip(version):
    b = Blocks()
    kw = dict(lr=0.05, inner_lr=0.2, blocks=2, seed=3, version=version)
    opt = BSVRB([b.x], b.y, **kw)
    for _ in range(3):
        opt.step(b.inner, b.outer)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    saved_x = b.x.detach().clone()
    saved_y = [t.detach().clone() for t in b.y]
    for _ in range(3):
        opt.step(b.inner, b.outer)
    buf.seek(0)
    c = Blocks()
    with torch.no_grad():
        c.x.copy_(saved_x)
        for t, s in zip(c.y, saved_y):
            t.copy_(s)
    opt2 = BSVRB([c.x], c.y, **{**kw, "seed": 99})  # the sampler state comes from the dict
    opt2.load_state_dict(torch.load(buf, weights_only=True))
    for _ in range(3):
        opt2.step(c.inner, c.outer)
    assert torch.equal(c.x, b.x) and all(torch.equal(p, q) for p, q in zip(c.y, b.y))


def test_bsvrb_bad_input_and_rollback():
    b = Blocks()
    with pytest.raises(ValueError, match="version"):
        BSVRB([b.x], b.y, lr=0.1, inner_lr=0.1, version="v3")
    with pytest.raises(ValueError, match="blocks must be in 1..4"):
        BSVRB([b.x], b.y, lr=0.1, inner_lr=0.1, blocks=5)
    with pytest.raises(ValueError, match="alpha"):
        BSVRB([b.x], b.y, lr=0.1, inner_lr=0.1, alpha=1.5)
    opt = BSVRB([b.x], b.y, lr=0.1, inner_lr=0.1, blocks=2)
    opt.step(b.inner, b.outer)
    def bad_outer(i):
        if i == 3:
            raise KeyboardInterrupt
        return b.outer(i)

    for _ in range(20):  # until a draw contains block 3
        x0 = b.x.detach().clone()
        y0 = [t.detach().clone() for t in b.y]
        gen_state = opt.bstate["sampler"].clone()
        z0 = [t.clone() for t in opt.bstate["z"]]
        step = opt.global_state["step"]
        try:
            opt.step(b.inner, bad_outer)
        except KeyboardInterrupt:
            break
    else:
        pytest.fail("block 3 never drawn")
    assert torch.equal(b.x, x0) and all(torch.equal(p, q) for p, q in zip(b.y, y0))
    assert torch.equal(opt.bstate["sampler"], gen_state) and opt.global_state["step"] == step
    assert all(torch.equal(p, q) for p, q in zip(opt.bstate["z"], z0))


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_bsvrb_warmup_is_gradient_steps_on_every_block_then_the_algorithm(version):
    """init_steps=3: bit for bit 3 steps y_i <- y_i - init_lr grad g_i(x0, y_i) on every block,
    then BSVRB without a warm-up; and against the flat-vector reference from the warmed-up y."""
    kw = dict(lr=0.05, inner_lr=0.2, blocks=2, seed=3, version=version)
    b = Blocks()
    opt = BSVRB([b.x], b.y, init_steps=3, init_lr=0.15, **kw)
    for _ in range(4):
        opt.step(b.inner, b.outer)
    c = Blocks()
    for _ in range(3):
        g = torch.autograd.grad(sum(c.inner(i) for i in range(M)), c.y)
        with torch.no_grad():
            torch._foreach_add_(c.y, list(g), alpha=-0.15)
    y_warm = torch.stack([t.detach().clone() for t in c.y])
    opt0 = BSVRB([c.x], c.y, **kw)
    for _ in range(4):
        opt0.step(c.inner, c.outer)
    assert torch.equal(c.x, b.x) and all(torch.equal(p, q) for p, q in zip(c.y, b.y))
    x, y = reference(version, 4, 0.05, 0.2, 0.2, 0.9, opt.gamma, 0.9, 1e-3, float("inf"), 2, 3,
                     y0=y_warm)
    assert torch.allclose(b.x.detach(), x, rtol=0, atol=1e-12)
    assert torch.allclose(torch.stack([t.detach() for t in b.y]), y, rtol=0, atol=1e-12)


def test_bsvrb_warmup_bad_values_and_rollback():
    b = Blocks()
    with pytest.raises(ValueError, match="init_steps.*-2"):
        BSVRB([b.x], b.y, lr=0.1, inner_lr=0.1, init_steps=-2)
    with pytest.raises(ValueError, match="init_lr.*-1"):
        BSVRB([b.x], b.y, lr=0.1, inner_lr=0.1, init_steps=2, init_lr=-1.0)
    assert BSVRB([b.x], b.y, lr=0.1, inner_lr=0.3, init_steps=2).init_lr == 0.3
    opt = BSVRB([b.x], b.y, lr=0.1, inner_lr=0.1, init_steps=4)
    x0, y0 = b.x.detach().clone(), [t.detach().clone() for t in b.y]
    state = opt.state_dict()
    calls = {"n": 0}

    def interrupted(i):  # inside the second warm-up step
        calls["n"] += 1
        if calls["n"] == M + 2:
            raise KeyboardInterrupt
        return b.inner(i)

    with pytest.raises(KeyboardInterrupt):
        opt.step(interrupted, b.outer)
    assert torch.equal(b.x, x0) and all(torch.equal(p, q) for p, q in zip(b.y, y0))
    assert opt.global_state["step"] == 0
    assert torch.equal(opt.state_dict()["anyorder"]["bilevel"]["sampler"],
                       state["anyorder"]["bilevel"]["sampler"])
