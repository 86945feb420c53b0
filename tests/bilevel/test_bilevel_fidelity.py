"""Departures found and fixed while checking the algorithms against their papers: AID's adjoint
on an inner Hessian that is not positive definite (CG's curvature test, MINRES), and LV-HBA's
stability condition on its step sizes (the cause of its divergence on MNIST hyper-cleaning)."""

from __future__ import annotations

import warnings

import pytest
import torch

from anyorder.bilevel import AID, LVHBA, LVHBAStepWarning
from anyorder.core import NonFiniteLossError
from anyorder.implicit import solve_cg

DT = torch.float64


# -- CG's curvature test ------------------------------------------------------------------------
def _sym(eigs, seed=0):
    q, _ = torch.linalg.qr(torch.randn(len(eigs), len(eigs), dtype=DT,
                                       generator=torch.Generator().manual_seed(seed)))
    return q @ torch.diag(torch.tensor(eigs, dtype=DT)) @ q.T


@pytest.mark.parametrize("eigs", [[1.0, 2.0, 5.0, 9.0], [-1.0, -3.0, -4.0, -8.0]])
def test_cg_reports_no_indefinite_curvature_on_a_definite_system(eigs):
    a = _sym(eigs)
    b = torch.arange(1.0, 5.0, dtype=DT)
    res = solve_cg(lambda v: a @ v, b, rtol=1e-12)
    assert res.converged and res.indefinite_curvature is None
    assert torch.allclose(res.solution, torch.linalg.solve(a, b), atol=1e-10)


def test_cg_stops_at_a_direction_of_the_wrong_curvature_and_says_so():
    a = _sym([3.0, 1.0, -2.0, 4.0])
    b = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=DT)
    seen = []

    def mv(v):
        out = a @ v
        seen.append(float(v @ out))
        return out

    with pytest.warns(RuntimeWarning, match="not definite"):
        res = solve_cg(mv, b, rtol=1e-12, maxiter=50)
    assert res.indefinite_curvature is not None
    # it is the curvature of the last search direction, of the other sign than the first one
    assert res.indefinite_curvature == pytest.approx(seen[-2])  # the last product is the check
    assert res.indefinite_curvature * seen[0] <= 0
    assert not res.converged
    r = b - a @ res.solution  # the reported residual is the honest one
    assert res.residual_norm == pytest.approx(float(r.norm()), rel=1e-12)


# -- AID with an inner Hessian that is not positive definite -----------------------------------
D = torch.tensor([2.0, -1.0, 0.5], dtype=DT)  # an indefinite inner Hessian (a saddle in y)
B = torch.tensor([[1.0, 0.5], [-0.3, 0.8], [0.2, -1.0]], dtype=DT)
TGT = torch.tensor([0.3, -0.2, 1.0], dtype=DT)


class Saddle:
    """G(x, y) = 0.5 y^T diag(D) y + y^T B x (stationary point y* = -diag(D)^-1 B x, a saddle),
    F(x, y) = 0.5 ||y - t||^2 + 0.1 ||x||^2."""

    def __init__(self, d=D):
        self.d = d
        self.x = torch.tensor([0.4, -0.7], dtype=DT, requires_grad=True)
        self.y = torch.tensor([0.1, 0.2, -0.3], dtype=DT, requires_grad=True)

    def inner(self):
        return 0.5 * (self.d * self.y**2).sum() + self.y @ (B @ self.x)

    def outer(self):
        return 0.5 * ((self.y - TGT) ** 2).sum() + 0.1 * (self.x**2).sum()


def _exact_step(p, lr):
    """x - lr (grad_x F - B^T H^-1 grad_y F), H = diag(D), at the current point (no inner
    steps): the AID update with an exact adjoint."""
    x, y = p.x.detach(), p.y.detach()
    v = (y - TGT) / p.d
    return x - lr * (0.2 * x - B.T @ v)


def test_aid_cg_refuses_an_indefinite_inner_hessian_and_leaves_everything_unchanged():
    p = Saddle()
    x0, y0 = p.x.detach().clone(), p.y.detach().clone()
    opt = AID([p.x], [p.y], lr=0.1, inner_lr=0.1, inner_steps=0, cg_maxiter=20)
    with pytest.raises(ValueError, match="not positive definite.*adjoint='minres'"):
        opt.step(p.inner, p.outer)
    assert torch.equal(p.x.detach(), x0) and torch.equal(p.y.detach(), y0)
    assert opt.global_state["step"] == 0 and "v" not in opt.bstate


@pytest.mark.parametrize("adjoint", ["minres", "auto"])
def test_aid_minres_gives_the_exact_hypergradient_step_on_a_saddle(adjoint):
    p = Saddle()
    want = _exact_step(p, 0.1)
    opt = AID([p.x], [p.y], lr=0.1, inner_lr=0.1, inner_steps=0, cg_maxiter=20, cg_rtol=1e-13,
              adjoint=adjoint)
    opt.step(p.inner, p.outer)
    assert torch.allclose(p.x.detach(), want, rtol=0, atol=1e-12)
    assert opt.last_solve["method"] == "minres" and opt.last_solve["converged"]


def test_aid_auto_keeps_cg_on_a_positive_definite_inner_hessian():
    pd = torch.tensor([2.0, 1.0, 0.5], dtype=DT)
    p, q = Saddle(pd), Saddle(pd)
    a = AID([p.x], [p.y], lr=0.1, inner_lr=0.1, inner_steps=0, cg_maxiter=20, cg_rtol=1e-13,
            adjoint="auto")
    c = AID([q.x], [q.y], lr=0.1, inner_lr=0.1, inner_steps=0, cg_maxiter=20, cg_rtol=1e-13)
    want = _exact_step(p, 0.1)
    a.step(p.inner, p.outer)
    c.step(q.inner, q.outer)
    assert a.last_solve["method"] == "cg"
    assert torch.equal(p.x, q.x)
    assert torch.allclose(p.x.detach(), want, rtol=0, atol=1e-12)


def test_aid_rejects_an_unknown_adjoint():
    p = Saddle()
    with pytest.raises(ValueError, match="adjoint must be one of cg, minres, auto"):
        AID([p.x], [p.y], lr=0.1, inner_lr=0.1, adjoint="lu")


# -- LV-HBA's step-size condition ---------------------------------------------------------------
class Flat:
    """f = 0.5 (y1 - x)^2 is flat in y2; F = 0.5 y1^2 + 0.5 x^2 does not see y2; the
    constraint y1 - 10 <= 0 stays inactive (lam = z = 0)."""

    def __init__(self):
        self.x = torch.tensor([0.5], dtype=DT, requires_grad=True)
        self.y = torch.tensor([0.2, 0.0], dtype=DT, requires_grad=True)
        self.nan = False

    def inner(self):
        out = 0.5 * (self.y[0] - self.x[0]) ** 2
        return out * float("nan") if self.nan else out

    def outer(self):
        return 0.5 * self.y[0] ** 2 + 0.5 * self.x[0] ** 2

    def con(self):
        return (self.y[0] - 10.0).reshape(1)


@pytest.mark.parametrize("alpha_y,eta,gamma1", [(1.0, 0.5, 10.0), (0.3, 0.5, 2.0)])
def test_lvhba_y_minus_theta_follows_the_predicted_factor(alpha_y, eta, gamma1):
    p = Flat()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LVHBAStepWarning)
        opt = LVHBA([p.x], [p.y], lr=0.1, inner_lr=alpha_y, theta_lr=eta, z_lr=0.1,
                    gamma1=gamma1, gamma2=1.0)
    opt.step(p.inner, p.outer, p.con)
    opt.bstate["theta"][0][1] += 0.01  # a gap between y2 and theta2 (zero at the start)
    factor = (1 + alpha_y / gamma1) * (1 - eta / gamma1)
    gaps = []
    for _ in range(6):
        gaps.append(float(p.y.detach()[1] - opt.bstate["theta"][0][1]))
        opt.step(p.inner, p.outer, p.con)
    gaps.append(float(p.y.detach()[1] - opt.bstate["theta"][0][1]))
    assert float(opt.bstate["lam"]) == 0.0
    for a, b in zip(gaps, gaps[1:]):
        assert b == pytest.approx(factor * a, rel=1e-12)


def test_lvhba_warns_on_a_diverging_step_and_names_it_when_a_step_fails():
    p = Flat()
    with pytest.warns(LVHBAStepWarning, match=r"inner_lr=1 .*1\.045 per step"):
        opt = LVHBA([p.x], [p.y], lr=0.1, inner_lr=1.0, theta_lr=0.5, z_lr=0.1, gamma1=10.0,
                    gamma2=1.0)
    opt.step(p.inner, p.outer, p.con)
    p.nan = True
    with pytest.raises(NonFiniteLossError, match="Likely cause: .*inner_lr=1 is too large"):
        opt.step(p.inner, p.outer, p.con)
    with warnings.catch_warnings():
        warnings.simplefilter("error", LVHBAStepWarning)  # the stable setting does not warn
        LVHBA([p.x], [p.y], lr=0.1, inner_lr=0.5, theta_lr=1.0, z_lr=0.1, gamma1=10.0,
              gamma2=1.0)


# -- BSVRB's default MSVR gamma -----------------------------------------------------------------
def test_bsvrb_default_gamma_is_msvr_and_tracks_exactly_like_storm_when_every_block_is_sampled():
    """gamma = (m - I) / (I (1 - alpha)) + (1 - alpha) (MSVR, Jiang et al. 2022). With every
    block sampled it is 1 - alpha, and the tracker s_i of grad_y g_i is STORM's: its error
    s_i - grad_y g_i(e_t) shrinks by exactly (1 - alpha) per step, whatever e_t does. The
    reference code's "theory" gamma, (m - I) / (I (1 - alpha)) = 0 here, would make s_i a plain
    moving average that lags the moving gradient."""
    from anyorder.bilevel import BSVRB

    gen = torch.Generator().manual_seed(5)
    m = 3
    bs = [torch.randn(2, 2, generator=gen, dtype=DT) for _ in range(m)]
    x = torch.tensor([0.3, -0.4], dtype=DT, requires_grad=True)
    ys = [torch.randn(2, generator=gen, dtype=DT).requires_grad_() for _ in range(m)]

    def inner(i):
        return 0.5 * (1 + x[0] ** 2) * (ys[i] ** 2).sum() - ys[i] @ torch.tanh(bs[i] @ x)

    def outer(i):
        return ((ys[i] - 0.5) ** 2).sum() + 0.1 * (x**2).sum()

    alpha = 0.3
    opt = BSVRB([x], ys, version="v2", lr=0.2, inner_lr=0.4, alpha=alpha, beta=0.5)
    assert opt.gamma == pytest.approx(1 - alpha)
    assert BSVRB([x], ys, lr=0.1, inner_lr=0.1, blocks=1, alpha=0.5).gamma == pytest.approx(
        (m - 1) / (1 * 0.5) + 0.5)
    errors = []
    for _ in range(6):
        h = [torch.autograd.grad(inner(i), ys[i])[0] for i in range(m)]  # at e_t
        opt.step(inner, outer)
        errors.append(torch.stack([opt.bstate["s"][i] - h[i] for i in range(m)]))
    moved = float((x.detach() - torch.tensor([0.3, -0.4], dtype=DT)).norm())
    assert moved > 0.05  # the gradient being tracked does change
    for a, b in zip(errors, errors[1:]):
        assert torch.allclose(b, (1 - alpha) * a, rtol=0, atol=1e-13)


def test_aid_auto_resolves_with_minres_when_cg_ends_worse_than_zero():
    """CG's first direction can have tiny positive curvature in an indefinite matrix (no
    non-positive curvature met, so no refusal) and overshoot: here H = diag(1, -0.999),
    b = (1, 1), p^T H p = 0.001, one CG product gives v = 2000 b with residual ~2,800 >> ||b||
    (seen on MNIST hyper-cleaning: ||v|| 738, residual 168). ``"auto"`` re-solves with MINRES,
    whose one-product answer is the residual-minimising multiple of b; ``"cg"`` keeps CG's."""
    h = torch.tensor([1.0, -0.999], dtype=DT)
    b = torch.tensor([1.0, 1.0], dtype=DT)

    def run(adjoint):
        x = torch.zeros(2, dtype=DT, requires_grad=True)
        y = torch.tensor([0.3, -0.2], dtype=DT, requires_grad=True)
        opt = AID([x], [y], lr=0.1, inner_lr=0.1, inner_steps=0, cg_maxiter=1, adjoint=adjoint)
        # G = 0.5 y^T H y - x^T y (d2G/dxdy = -I), F = b^T y: the step is x <- -lr v
        opt.step(lambda: 0.5 * (h * y**2).sum() - x @ y, lambda: b @ y)
        return x.detach(), opt.last_solve

    x_cg, solve_cg_only = run("cg")
    assert solve_cg_only["method"] == "cg" and solve_cg_only["residual_norm"] > 1000
    assert torch.allclose(x_cg, -0.1 * 2000.0 * b, rtol=1e-9)  # v = (b.b / b.Hb) b
    x_auto, solve = run("auto")
    hb = h * b
    v_ref = (b @ hb) / (hb @ hb) * b  # argmin_a ||b - a H b||
    assert solve["method"] == "minres" and solve["residual_norm"] <= float(b.norm())
    assert torch.allclose(x_auto, -0.1 * v_ref, rtol=1e-9, atol=1e-15)
