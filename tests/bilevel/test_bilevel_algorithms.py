"""Each bilevel algorithm against a plain reference of its paper's update rule (written here on
flat vectors, derivatives by torch.func -- a different path from the algorithms' autograd), on a
non-quadratic problem where second derivatives change with the point; convergence on a
quadratic bilevel problem with a known solution; state_dict round trip; bad input."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from torch.func import grad, jacfwd

from anyorder.bilevel import AID, BOREP, ITD, LVHBA, Penalty
from anyorder.bilevel.problems import QuadraticBilevel
from anyorder.core import NonFiniteLossError

DT = torch.float64
NX, NY = 3, 4  # x = [x1 (2,), x2 (1,)], y = [y1 (3,), y2 (1,)]


def _data():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(NY, NY, generator=g, dtype=DT)
    A = a @ a.T / NY + torch.eye(NY, dtype=DT)
    W = torch.randn(NY, NX, generator=g, dtype=DT)
    t = torch.randn(NY, generator=g, dtype=DT)
    x0 = torch.randn(NX, generator=g, dtype=DT) * 0.5
    y0 = torch.randn(NY, generator=g, dtype=DT) * 0.5
    return A, W, t, x0, y0


A, W, TGT, X0, Y0 = _data()


def G(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Strongly convex in y; mixed and yy second derivatives depend on (x, y)."""
    return 0.5 * y @ A @ y + torch.nn.functional.softplus((W @ x) * y).sum() - 0.3 * y.sum()


def F(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.log(torch.cosh(y - TGT)).sum() + 0.1 * (x**2).sum() + 0.2 * torch.sin(x).sum() * y[0]


def Gcon(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """LV-HBA's constraints g(x, y) <= 0 (two of them)."""
    return torch.stack([y.sum() - x.sum() - 1.0, (y**2).sum() - 0.005])


gx, gy = grad(G, 0), grad(G, 1)
fx, fy = grad(F, 0), grad(F, 1)
Jyx = jacfwd(gy, 0)  # (NY, NX): d(grad_y G)/dx
Hyy = jacfwd(gy, 1)


def hxy(x, y, v):  # d^2_xy G v = Jyx^T v
    return Jyx(x, y).T @ v


def hyy(x, y, v):
    return Hyy(x, y) @ v


class Vars:
    """The optimizer's tensors (split in two pieces each) and closures over them."""

    def __init__(self, x0=X0, y0=Y0):
        self.x1 = x0[:2].clone().requires_grad_()
        self.x2 = x0[2:].clone().requires_grad_()
        self.y1 = y0[:3].clone().requires_grad_()
        self.y2 = y0[3:].clone().requires_grad_()
        self.calls = 0

    def x(self):
        return torch.cat([self.x1, self.x2])

    def y(self):
        return torch.cat([self.y1, self.y2])

    def inner(self):
        self.calls += 1
        return G(self.x(), self.y())

    def outer(self):
        return F(self.x(), self.y())

    def con(self):
        return Gcon(self.x(), self.y())

    def groups(self, lr1, lr2):
        return [{"params": [self.x1], "lr": lr1}, {"params": [self.x2], "lr": lr2}]

    def flat(self):
        return self.x().detach(), self.y().detach()


LR1, LR2 = 0.05, 0.03
LRS = torch.tensor([LR1, LR1, LR2], dtype=DT)


def close(a, b, tol=1e-12):
    return torch.allclose(a, b, rtol=0, atol=tol)


# -- references ---------------------------------------------------------------------------------
def ref_penalty(steps, alpha, gamma, T, lam0, delta, lam_max):
    x, y = X0.clone(), Y0.clone()
    z = y.clone()
    lam = lam0
    for _ in range(steps):
        for _ in range(T):
            z_new = z - gamma * gy(x, z)
            y = y - alpha * (fy(x, y) / lam + gy(x, y))
            z = z_new
        d = fx(x, y) + lam * (gx(x, y) - gx(x, z))
        x = x - LRS * d
        lam = min(lam + delta, lam_max)
    return x, y, z, lam


def ref_borep(steps, gamma, N, period, N0, nu, beta, R):
    x, y = X0.clone(), Y0.clone()
    z = torch.zeros(NY, dtype=DT)
    m = torch.zeros(NX, dtype=DT)
    for k in range(steps):
        n = N0 if k == 0 else (N if k % period == 0 else 0)
        for _ in range(n):
            y = y - gamma * gy(x, y)
        z = z - nu * (hyy(x, y, z) - fy(x, y))
        if R is not None and z.norm() > R:
            z = z * (R / z.norm())
        m = beta * m + (1 - beta) * (fx(x, y) - hxy(x, y, z))
        x = x - LRS * m / m.norm()
    return x, y, z, m


def ref_itd_autograd(steps, alpha, T):
    """Full reverse mode by autograd through the unrolled loop (K = T)."""
    x, y = X0.clone(), Y0.clone()
    for _ in range(steps):
        xr = x.clone().requires_grad_()
        yt = y.clone().requires_grad_()  # y_0: a constant of x (warm start)
        for _ in range(T):
            yt = yt - alpha * torch.autograd.grad(G(xr, yt), yt, create_graph=True)[0]
        (h,) = torch.autograd.grad(F(xr, yt), xr)
        y = yt.detach()
        x = x - LRS * h
    return x, y


def ref_itd_truncated(steps, alpha, T, K):
    x, y = X0.clone(), Y0.clone()
    for _ in range(steps):
        its = []
        for _t in range(T):
            its.append(y)
            y = y - alpha * gy(x, y)
        h, a = fx(x, y), fy(x, y)
        for t in range(T - 1, T - K - 1, -1):
            h = h - alpha * hxy(x, its[t], a)
            a = a - alpha * hyy(x, its[t], a)
        x = x - LRS * h
    return x, y


def ref_lvhba(steps, alpha, eta, beta, g1, g2, c, p, zmax, proj):
    x, y = X0.clone(), Y0.clone()
    th = y.clone()
    lam = torch.zeros(2, dtype=DT)
    z = torch.zeros(2, dtype=DT)

    def lag(x, t, lam):
        return G(x, t) + lam @ Gcon(x, t)

    for k in range(steps):
        ck = c * (k + 1) ** p
        th_new = th - eta * (grad(lag, 1)(x, th, lam) + (th - y) / g1)
        lam_new = torch.clamp(lam + eta * (Gcon(x, th) - (lam - z) / g2), min=0)
        dx = fx(x, y) / ck + gx(x, y) - grad(lag, 0)(x, th_new, lam_new)
        dy = fy(x, y) / ck + gy(x, y) - (y - th_new) / g1
        dz = (z - lam_new) / g2
        x = x - LRS * dx
        y = y - alpha * dy
        if proj:
            x, y = x.clamp(-1, 1), y.clamp(-1, 1)
        z = torch.clamp(z - beta * dz, 0, zmax)
        th, lam = th_new, lam_new
    return x, y, th, lam, z


def plain_cg(A, b, x, iters):
    r = b - A @ x
    p = r.clone()
    for _ in range(iters):
        ap = A @ p
        a = (r @ r) / (p @ ap)
        x = x + a * p
        r_new = r - a * ap
        p = r_new + (r_new @ r_new) / (r @ r) * p
        r = r_new
    return x


def ref_aid(steps, alpha, T, K, y0=None):
    x, y = X0.clone(), (Y0 if y0 is None else y0).clone()
    v = torch.zeros(NY, dtype=DT)
    for _ in range(steps):
        for _ in range(T):
            y = y - alpha * gy(x, y)
        v = plain_cg(Hyy(x, y), fy(x, y), v, K)
        x = x - LRS * (fx(x, y) - hxy(x, y, v))
    return x, y, v


# -- trajectory parity --------------------------------------------------------------------------
def test_penalty_matches_reference():
    v = Vars()
    opt = Penalty(v.groups(LR1, LR2), [v.y1, v.y2], lr=LR1, inner_lr=0.2, z_lr=0.3,
                  inner_steps=3, lam=2.0, lam_delta=0.5, lam_max=3.2)
    for _ in range(6):
        opt.step(v.inner, v.outer)
    x, y, z, lam = ref_penalty(6, 0.2, 0.3, 3, 2.0, 0.5, 3.2)
    vx, vy = v.flat()
    assert close(vx, x) and close(vy, y)
    assert close(torch.cat(opt.bstate["z"]), z)
    assert opt.bstate["lam"] == lam == 3.2


@pytest.mark.parametrize("radius", [None, 0.05])
def test_borep_matches_reference(radius):
    v = Vars()
    opt = BOREP(v.groups(LR1, LR2), [v.y1, v.y2], lr=LR1, inner_lr=0.2, z_lr=0.3, beta=0.7,
                inner_steps=2, period=3, init_steps=4, z_radius=radius)
    for _ in range(7):
        opt.step(v.inner, v.outer)
    x, y, z, m = ref_borep(7, 0.2, 2, 3, 4, 0.3, 0.7, radius)
    vx, vy = v.flat()
    assert close(vx, x) and close(vy, y)
    assert close(torch.cat(opt.bstate["z"]), z) and close(torch.cat(opt.bstate["m"]), m)
    # inner-gradient calls: 4 refinement + periodic refreshes at k=3, 6 (2 each) + 1 graph/step
    assert v.calls == 4 + 2 * 2 + 7


def test_itd_full_equals_autograd_through_unrolled_loop():
    v = Vars()
    opt = ITD(v.groups(LR1, LR2), [v.y1, v.y2], lr=LR1, inner_lr=0.2, inner_steps=5)
    for _ in range(4):
        opt.step(v.inner, v.outer)
    x, y = ref_itd_autograd(4, 0.2, 5)
    vx, vy = v.flat()
    assert close(vx, x) and close(vy, y)


def test_itd_truncated_matches_reference():
    v = Vars()
    opt = ITD(v.groups(LR1, LR2), [v.y1, v.y2], lr=LR1, inner_lr=0.2, inner_steps=5, truncate=2)
    for _ in range(4):
        opt.step(v.inner, v.outer)
    x, y = ref_itd_truncated(4, 0.2, 5, 2)
    vx, vy = v.flat()
    assert close(vx, x) and close(vy, y)
    x_full, _ = ref_itd_truncated(4, 0.2, 5, 5)
    assert not close(x_full, x, 1e-6)  # truncation changes the answer


@pytest.mark.parametrize("proj", [False, True])
def test_lvhba_matches_reference(proj):
    v = Vars()

    def project(xs, ys):
        for t in [*xs, *ys]:
            t.clamp_(-1, 1)

    opt = LVHBA(v.groups(LR1, LR2), [v.y1, v.y2], lr=LR1, inner_lr=0.04, theta_lr=0.1,
                z_lr=0.2, gamma1=2.0, gamma2=0.5, c=1.5, p=0.3, z_max=0.8,
                project=project if proj else None)
    active = 0
    for _ in range(6):
        opt.step(v.inner, v.outer, v.con)
        active += int((opt.bstate["lam"] > 0).any())
    x, y, th, lam, z = ref_lvhba(6, 0.04, 0.1, 0.2, 2.0, 0.5, 1.5, 0.3, 0.8, proj)
    vx, vy = v.flat()
    assert close(vx, x) and close(vy, y)
    assert close(torch.cat(opt.bstate["theta"]), th)
    assert close(opt.bstate["lam"], lam) and close(opt.bstate["z"], z)
    assert active >= 2  # a constraint is active, so the multiplier path is exercised


def test_aid_matches_reference():
    v = Vars()
    opt = AID(v.groups(LR1, LR2), [v.y1, v.y2], lr=LR1, inner_lr=0.2, inner_steps=3,
              cg_maxiter=2, cg_rtol=0.0)
    for _ in range(5):
        opt.step(v.inner, v.outer)
    x, y, adj = ref_aid(5, 0.2, 3, 2)
    vx, vy = v.flat()
    assert close(vx, x) and close(vy, y)
    assert close(torch.cat(opt.bstate["v"]), adj)
    assert opt.last_solve["iterations"] >= 2


# -- convergence on the quadratic problem -------------------------------------------------------
def _quadratic_run(make, steps, sched=None, constraint=False):
    prob = QuadraticBilevel(nx=3, ny=5, mu=1.0, L=4.0, rho=0.1, seed=1)
    opt = make([prob.x], [prob.y])
    scheduler = sched(opt) if sched else None
    for _ in range(steps):
        if constraint:
            opt.step(prob.inner_loss, prob.outer_loss, lambda: prob.y.square().sum() - 1e4)
        else:
            opt.step(prob.inner_loss, prob.outer_loss)
        if scheduler:
            scheduler.step()
    xs, ys = prob.solution()
    x, y = prob.x.detach(), prob.y.detach()
    return float((x - xs).norm() / xs.norm()), float((y - ys).norm() / ys.norm())


# (make, steps, scheduler, tolerance on the relative errors of x and y)
CONVERGENCE = {
    "AID": (lambda x, y: AID(x, y, lr=0.3, inner_lr=0.4, inner_steps=5, cg_maxiter=5), 100, None,
            1e-3),
    "ITD": (lambda x, y: ITD(x, y, lr=0.3, inner_lr=0.4, inner_steps=10), 150, None, 2e-3),
    "Penalty": (lambda x, y: Penalty(x, y, lr=0.1, inner_lr=0.4, inner_steps=3, lam=10.0,
                                     lam_delta=10.0, lam_max=1e4), 250, None, 2e-3),
    "BOREP": (lambda x, y: BOREP(x, y, lr=0.1, inner_lr=0.4, z_lr=0.2, beta=0.5, inner_steps=5,
                                 period=2, init_steps=20),
              300, lambda o: torch.optim.lr_scheduler.StepLR(o, 50, 0.3), 5e-3),
    # LV-HBA's weight 1/c_k on F shrinks like k^-p: slower, so a looser check
    "LVHBA": (lambda x, y: LVHBA(x, y, lr=0.3, theta_lr=0.3, z_lr=0.1, gamma1=1.0, gamma2=1.0,
                                 c=1.0, p=0.3), 500, None, 3e-2),
}


@pytest.mark.parametrize("name", list(CONVERGENCE))
def test_converges_on_quadratic(name):
    make, steps, sched, tol = CONVERGENCE[name]
    ex, ey = _quadratic_run(make, steps, sched, constraint=name == "LVHBA")
    assert ex < tol and ey < tol, (ex, ey)


# -- state dict round trip ----------------------------------------------------------------------
MAKERS = {
    "AID": lambda g, y: AID(g, y, lr=LR1, inner_lr=0.2, inner_steps=2, cg_maxiter=3),
    "ITD": lambda g, y: ITD(g, y, lr=LR1, inner_lr=0.2, inner_steps=3, truncate=2),
    "Penalty": lambda g, y: Penalty(g, y, lr=LR1, inner_lr=0.2, inner_steps=2, lam=1.0,
                                    lam_delta=0.7),
    "BOREP": lambda g, y: BOREP(g, y, lr=LR1, inner_lr=0.2, z_lr=0.3, inner_steps=2, period=2),
    "LVHBA": lambda g, y: LVHBA(g, y, lr=LR1, theta_lr=0.1, z_lr=0.2, gamma1=2.0, gamma2=0.5),
}


def _steps(opt, v, n):
    for _ in range(n):
        if isinstance(opt, LVHBA):
            opt.step(v.inner, v.outer, v.con)
        else:
            opt.step(v.inner, v.outer)


@pytest.mark.parametrize("name", list(MAKERS))
def test_state_dict_round_trip_is_bit_exact(name):
    v = Vars()
    opt = MAKERS[name](v.groups(LR1, LR2), [v.y1, v.y2])
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, 0.9)
    _steps(opt, v, 3)
    sched.step()
    buf = io.BytesIO()
    torch.save({"opt": opt.state_dict(), "sched": sched.state_dict()}, buf)
    x_saved, y_saved = v.flat()
    _steps(opt, v, 3)
    want = v.flat()

    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    w = Vars(x_saved, y_saved)
    opt2 = MAKERS[name](w.groups(LR1, LR2), [w.y1, w.y2])
    sched2 = torch.optim.lr_scheduler.ExponentialLR(opt2, 0.9)
    opt2.load_state_dict(saved["opt"])
    sched2.load_state_dict(saved["sched"])
    assert opt2.param_groups[0]["lr"] == pytest.approx(LR1 * 0.9)
    _steps(opt2, w, 3)
    got = w.flat()
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert opt2.global_state["step"] == 6


# -- bad input and error paths ------------------------------------------------------------------
def test_bad_construction_arguments():
    v = Vars()
    with pytest.raises(ValueError, match="inner is empty"):
        AID([v.x1], [], lr=0.1, inner_lr=0.1)
    with pytest.raises(ValueError, match="also an outer parameter"):
        AID([v.x1], [v.x1], lr=0.1, inner_lr=0.1)
    with pytest.raises(ValueError, match="requires_grad"):
        AID([v.x1], [torch.zeros(3)], lr=0.1, inner_lr=0.1)
    with pytest.raises(TypeError, match="inner\\[0\\] must be a tensor"):
        AID([v.x1], [3.0], lr=0.1, inner_lr=0.1)
    with pytest.raises(ValueError, match="inner_lr"):
        Penalty([v.x1], [v.y1], lr=0.1, inner_lr=-1.0)
    with pytest.raises(ValueError, match="lr"):
        ITD([v.x1], [v.y1], lr=-0.1, inner_lr=0.1)
    with pytest.raises(ValueError, match="truncate"):
        ITD([v.x1], [v.y1], lr=0.1, inner_lr=0.1, inner_steps=3, truncate=4)
    with pytest.raises(TypeError, match="inner_steps must be an integer"):
        ITD([v.x1], [v.y1], lr=0.1, inner_lr=0.1, inner_steps=2.5)
    with pytest.raises(ValueError, match="beta"):
        BOREP([v.x1], [v.y1], lr=0.1, inner_lr=0.1, z_lr=0.1, beta=1.0)
    with pytest.raises(ValueError, match="lam_max"):
        Penalty([v.x1], [v.y1], lr=0.1, inner_lr=0.1, lam=5.0, lam_max=1.0)
    with pytest.raises(ValueError, match="gamma2"):
        LVHBA([v.x1], [v.y1], lr=0.1, theta_lr=0.1, z_lr=0.1, gamma2=0.0)
    with pytest.raises(ValueError, match="on_nonfinite"):
        AID([v.x1], [v.y1], lr=0.1, inner_lr=0.1, on_nonfinite="ignore")


@pytest.mark.parametrize("name", list(MAKERS))
def test_bad_closures_leave_everything_unchanged(name):
    v = Vars()
    opt = MAKERS[name](v.groups(LR1, LR2), [v.y1, v.y2])
    _steps(opt, v, 2)
    before = v.flat()
    state = copy.deepcopy(opt.state_dict())

    def same():
        now = v.flat()
        assert torch.equal(now[0], before[0]) and torch.equal(now[1], before[1])
        _assert_state_equal(opt.state_dict(), state)

    con = (v.con,) if name == "LVHBA" else ()
    with pytest.raises(TypeError, match="outer_loss must be a callable"):
        opt.step(v.inner, None, *con)
    with pytest.raises(ValueError, match="scalar"):
        opt.step(v.inner, lambda: v.y() * 2, *con)
    same()
    calls = {"n": 0}

    def interrupted():
        calls["n"] += 1
        if calls["n"] > 1:
            raise KeyboardInterrupt
        return v.inner()

    with pytest.raises(KeyboardInterrupt):
        opt.step(interrupted, v.outer, *con)
    same()

    def nan_outer():
        return v.outer() * float("nan")

    with pytest.raises(NonFiniteLossError, match="left unchanged"):
        opt.step(v.inner, nan_outer, *con)
    same()
    opt.on_nonfinite = "skip"
    skipped = opt.global_state["skipped_steps"]
    assert opt.step(v.inner, nan_outer, *con) is None
    assert opt.global_state["skipped_steps"] == skipped + 1
    v_after = v.flat()
    assert torch.equal(v_after[0], before[0]) and torch.equal(v_after[1], before[1])


def _assert_state_equal(a, b):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _assert_state_equal(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_state_equal(x, y)
    else:
        assert a == b or (isinstance(a, float) and math.isnan(a) and math.isnan(b))


def test_lvhba_needs_a_constraint_closure():
    v = Vars()
    opt = MAKERS["LVHBA"]([v.x1, v.x2], [v.y1, v.y2])
    with pytest.raises(TypeError, match="constraint"):
        opt.step(v.inner, v.outer)


# -- the inner warm-up of the first step (init_steps / init_lr, shared by every algorithm) --------
WARM = {"init_steps": 3, "init_lr": 0.15}
WARM_MAKERS = {
    "AID": lambda g, y, **w: AID(g, y, lr=LR1, inner_lr=0.2, inner_steps=2, cg_maxiter=3, **w),
    "ITD": lambda g, y, **w: ITD(g, y, lr=LR1, inner_lr=0.2, inner_steps=3, truncate=2, **w),
    "Penalty": lambda g, y, **w: Penalty(g, y, lr=LR1, inner_lr=0.2, inner_steps=2, lam=1.0,
                                         lam_delta=0.7, **w),
    "BOREP": lambda g, y, **w: BOREP(g, y, lr=LR1, inner_lr=0.2, z_lr=0.3, inner_steps=2,
                                     period=2, **w),
    "LVHBA": lambda g, y, **w: LVHBA(g, y, lr=LR1, theta_lr=0.1, z_lr=0.2, gamma1=2.0,
                                     gamma2=0.5, **w),
}


@pytest.mark.parametrize("name", list(WARM_MAKERS))
def test_warmup_is_plain_gradient_steps_before_the_first_update(name):
    """init_steps=3 is bit for bit: 3 gradient steps y <- y - init_lr grad_y G(x0, y), then the
    algorithm without a warm-up; later steps do not repeat it."""
    v = Vars()
    opt = WARM_MAKERS[name](v.groups(LR1, LR2), [v.y1, v.y2], **WARM)
    _steps(opt, v, 4)
    want = v.flat()

    w = Vars()
    for _ in range(WARM["init_steps"]):
        g = torch.autograd.grad(w.inner(), [w.y1, w.y2])
        with torch.no_grad():
            torch._foreach_add_([w.y1, w.y2], list(g), alpha=-WARM["init_lr"])
    opt0 = WARM_MAKERS[name](w.groups(LR1, LR2), [w.y1, w.y2], init_steps=0)
    _steps(opt0, w, 4)
    got = w.flat()
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    if name == "AID":  # and the paper-rule reference on flat vectors (torch.func derivatives)
        y0 = Y0.clone()
        for _ in range(WARM["init_steps"]):
            y0 = y0 - WARM["init_lr"] * gy(X0, y0)
        x, y, _ = ref_aid(4, 0.2, 2, 3, y0=y0)
        assert close(want[0], x) and close(want[1], y)


def test_warmup_default_step_is_the_inner_step_and_borep_keeps_its_refinement():
    v = Vars()
    assert WARM_MAKERS["AID"]([v.x1], [v.y1], init_steps=2).init_lr == 0.2
    assert WARM_MAKERS["Penalty"]([v.x1], [v.y1], init_steps=2).init_lr == 0.2
    assert WARM_MAKERS["LVHBA"]([v.x1], [v.y1], init_steps=2).init_lr == 0.1  # theta_lr
    b = WARM_MAKERS["BOREP"]([v.x1], [v.y1])
    assert (b.init_steps, b.init_lr) == (2, 0.2)  # default: inner_steps, inner_lr
    assert WARM_MAKERS["ITD"]([v.x1], [v.y1]).init_steps == 0


@pytest.mark.parametrize("name", list(WARM_MAKERS))
def test_warmup_bad_values_are_refused(name):
    v = Vars()
    with pytest.raises(ValueError, match="init_steps.*-1"):
        WARM_MAKERS[name]([v.x1], [v.y1], init_steps=-1)
    with pytest.raises(TypeError, match="init_steps must be an integer"):
        WARM_MAKERS[name]([v.x1], [v.y1], init_steps=2.5)
    with pytest.raises(ValueError, match="init_lr.*0.0"):
        WARM_MAKERS[name]([v.x1], [v.y1], init_steps=2, init_lr=0.0)
    with pytest.raises(ValueError, match="init_lr.*nan"):
        WARM_MAKERS[name]([v.x1], [v.y1], init_lr=float("nan"))


@pytest.mark.parametrize("name", list(WARM_MAKERS))
def test_warmup_state_dict_round_trip_is_bit_exact_and_not_repeated(name):
    v = Vars()
    opt = WARM_MAKERS[name](v.groups(LR1, LR2), [v.y1, v.y2], **WARM)
    _steps(opt, v, 2)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    x_saved, y_saved = v.flat()
    _steps(opt, v, 3)
    want = v.flat()
    buf.seek(0)
    w = Vars(x_saved, y_saved)
    opt2 = WARM_MAKERS[name](w.groups(LR1, LR2), [w.y1, w.y2], **WARM)
    opt2.load_state_dict(torch.load(buf, weights_only=True))
    _steps(opt2, w, 3)  # a repeated warm-up would change the trajectory
    got = w.flat()
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("name", list(WARM_MAKERS))
def test_an_exception_inside_the_warmup_leaves_everything_unchanged(name):
    v = Vars()
    opt = WARM_MAKERS[name](v.groups(LR1, LR2), [v.y1, v.y2], **WARM)
    before = v.flat()
    state = copy.deepcopy(opt.state_dict())
    con = (v.con,) if name == "LVHBA" else ()
    calls = {"n": 0}

    def interrupted():  # the second warm-up gradient
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return v.inner()

    with pytest.raises(KeyboardInterrupt):
        opt.step(interrupted, v.outer, *con)

    def nan_inner():  # non-finite inside the warm-up: rolled back, then skipped
        return v.inner() * float("nan")

    with pytest.raises(NonFiniteLossError, match="left unchanged"):
        opt.step(nan_inner, v.outer, *con)
    now = v.flat()
    assert torch.equal(now[0], before[0]) and torch.equal(now[1], before[1])
    _assert_state_equal(opt.state_dict(), state)
    assert opt.global_state["step"] == 0
    # the next step still runs the warm-up: the same as a fresh optimizer's first steps
    _steps(opt, v, 2)
    w = Vars()
    fresh = WARM_MAKERS[name](w.groups(LR1, LR2), [w.y1, w.y2], **WARM)
    _steps(fresh, w, 2)
    assert torch.equal(v.flat()[0], w.flat()[0]) and torch.equal(v.flat()[1], w.flat()[1])
