"""The linear solvers: exact solutions of small systems, honest residuals, the systems each one
claims, warm starts, warnings, the Neumann safeguard and bad input."""

import math
import warnings

import pytest
import torch

from anyorder.implicit import (
    SOLVERS,
    LinearSolveWarning,
    NeumannDivergenceError,
    solve,
    solve_bicgstab,
    solve_cg,
    solve_dense,
    solve_gmres,
    solve_minres,
    solve_neumann,
)

N = 40


def sym(eigs: torch.Tensor, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(len(eigs), len(eigs), generator=g, dtype=torch.float64))
    return (q @ torch.diag(eigs.double()) @ q.T).to(dtype)


def rhs(seed: int = 1, n: int = N, dtype=torch.float64) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(
        dtype
    )


SPD = sym(torch.linspace(1, 25, N))
INDEFINITE = sym(torch.cat([torch.linspace(-6, -1, N // 4), torch.linspace(1, 20, N - N // 4)]))
NONSYM = torch.randn(N, N, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
NONSYM = NONSYM / math.sqrt(N) + 2 * torch.eye(N, dtype=torch.float64)

CLAIMS = {
    "cg": ["spd"],
    "minres": ["spd", "indefinite"],
    "gmres": ["spd", "indefinite", "nonsym"],
    "bicgstab": ["spd", "nonsym"],
    "neumann": ["spd"],
    "dense": ["spd", "indefinite", "nonsym"],
}
SYSTEMS = {"spd": SPD, "indefinite": INDEFINITE, "nonsym": NONSYM}


@pytest.mark.parametrize(
    "method,system", [(m, s) for m, systems in CLAIMS.items() for s in systems]
)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_solves_claimed_systems_with_honest_residual(method, system, dtype):
    a = SYSTEMS[system].to(dtype)
    b = rhs(dtype=dtype)
    rtol = 1e-10 if dtype == torch.float64 else 1e-5
    options = {"restart": N} if method == "gmres" and system == "indefinite" else {}
    with warnings.catch_warnings():
        warnings.simplefilter("error", LinearSolveWarning)
        res = solve(method, lambda v: a @ v, b, rtol=rtol, **options)
    x = res.solution
    assert x.dtype == dtype and x.shape == b.shape
    true_residual = float(torch.linalg.vector_norm(a @ x - b))
    assert res.residual_norm == pytest.approx(true_residual, rel=1e-4, abs=1e-12)
    assert res.converged and res.residual_norm <= rtol * float(b.norm())
    assert res.tolerance == pytest.approx(rtol * float(b.norm()))
    exact = torch.linalg.solve(a.double(), b.double())
    cond = float(torch.linalg.cond(a.double()))
    assert float((x.double() - exact).norm() / exact.norm()) <= 10 * cond * rtol
    assert res.iterations >= 1 and res.method == method


def test_cg_counts_every_product():
    calls = []

    def mv(v):
        calls.append(1)
        return SPD @ v

    res = solve_cg(mv, rhs(), rtol=1e-8)
    assert res.iterations == len(calls)
    calls.clear()
    res = solve_cg(mv, rhs(), x0=torch.ones(N, dtype=torch.float64), rtol=1e-8)
    assert res.iterations == len(calls)  # the warm start's initial residual included


def test_cg_matches_plain_reference():
    """Three CG iterations equal the textbook recurrence written here."""
    a, b = SPD, rhs()
    x = torch.zeros(N, dtype=torch.float64)
    r = b.clone()
    p = r.clone()
    for _ in range(3):
        ap = a @ p
        alpha = (r @ r) / (p @ ap)
        x = x + alpha * p
        r_new = r - alpha * ap
        p = r_new + (r_new @ r_new) / (r @ r) * p
        r = r_new
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LinearSolveWarning)
        res = solve_cg(lambda v: a @ v, b, rtol=1e-14, maxiter=3)
    torch.testing.assert_close(res.solution, x, rtol=1e-12, atol=1e-12)
    assert res.iterations == 4 and not res.converged  # 3 in the loop + the recomputation


@pytest.mark.parametrize("method", ["cg", "minres"])
def test_fails_where_not_claimed_and_warns(method):
    with pytest.warns(LinearSolveWarning, match=f"{method} did not converge"):
        res = solve(method, lambda v: NONSYM @ v, rhs(), rtol=1e-10, maxiter=200)
    assert not res.converged
    assert res.residual_norm == pytest.approx(float((NONSYM @ res.solution - rhs()).norm()))


@pytest.mark.parametrize("method", sorted(set(SOLVERS) - {"dense"}))
def test_maxiter_warns_and_reports(method):
    with pytest.warns(LinearSolveWarning, match="did not converge"):
        res = solve(
            method, lambda v: SPD @ v, rhs(), rtol=1e-12, maxiter=3 if method != "neumann" else 12
        )
    assert not res.converged and res.residual_norm > res.tolerance
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        solve(
            method,
            lambda v: SPD @ v,
            rhs(),
            rtol=1e-12,
            maxiter=3 if method != "neumann" else 12,
            warn=False,
        )


@pytest.mark.parametrize("method", ["cg", "minres", "gmres", "bicgstab", "neumann"])
def test_warm_start_uses_fewer_products(method):
    b = rhs()
    cold = solve(method, lambda v: SPD @ v, b, rtol=1e-9)
    near = cold.solution + 1e-6 * rhs(seed=7)
    warm = solve(method, lambda v: SPD @ v, b, x0=near, rtol=1e-9)
    assert warm.converged and warm.iterations < cold.iterations
    exact = solve(method, lambda v: SPD @ v, b, x0=torch.linalg.solve(SPD, b), rtol=1e-9)
    assert exact.iterations <= 2  # the initial residual and nothing else to do


def test_pytrees_and_zero_dim():
    blocks = {"w": SPD[:30, :30], "b": SPD[30:, 30:]}

    def mv(t):
        return {"w": (blocks["w"] @ t["w"].reshape(-1)).reshape(5, 6), "b": blocks["b"] @ t["b"]}

    b = {"w": rhs()[:30].reshape(5, 6), "b": rhs()[30:]}
    res = solve_cg(mv, b, rtol=1e-12)
    assert set(res.solution) == {"w", "b"} and res.solution["w"].shape == (5, 6)
    torch.testing.assert_close(res.solution["b"], torch.linalg.solve(blocks["b"], b["b"]))
    tup = solve_minres(lambda t: (2.0 * t[0], 3.0 * t[1]), (torch.tensor(4.0), torch.ones(3)))
    assert isinstance(tup.solution, tuple)
    torch.testing.assert_close(tup.solution[0], torch.tensor(2.0))
    torch.testing.assert_close(tup.solution[1], torch.full((3,), 1 / 3))
    scalar = solve_gmres(lambda t: 5.0 * t, torch.tensor(10.0, dtype=torch.float64))
    assert scalar.solution.shape == () and float(scalar.solution) == pytest.approx(2.0)


def test_zero_rhs_is_free():
    res = solve_cg(lambda v: SPD @ v, torch.zeros(N, dtype=torch.float64))
    assert res.converged and res.iterations == 0 and float(res.solution.abs().max()) == 0


def test_neumann_sets_its_step_where_unit_step_diverges():
    a = sym(torch.linspace(0.5, 6.0, N))  # lambda_max = 6 > 2: the unit-step series diverges
    b = rhs()
    x = torch.zeros(N, dtype=torch.float64)
    for _ in range(50):  # torchopt's Neumann series (step 1), written plainly
        x = x + (b - a @ x)
    assert float((a @ x - b).norm()) > 1e6 * float(b.norm())
    res = solve_neumann(lambda v: a @ v, b, rtol=1e-8)
    assert res.converged
    torch.testing.assert_close(res.solution, torch.linalg.solve(a, b), rtol=1e-6, atol=1e-7)


def test_neumann_refuses_divergent_step_and_indefinite():
    a = sym(torch.linspace(0.5, 6.0, N))
    with pytest.raises(NeumannDivergenceError, match="step=1.0 times the largest eigenvalue"):
        solve_neumann(lambda v: a @ v, rhs(), step=1.0)
    res = solve_neumann(lambda v: a @ v, rhs(), step=0.3, rtol=1e-8)  # 0.3 * 6 < 2
    assert res.converged
    with pytest.raises(NeumannDivergenceError, match="not positive definite"):
        solve_neumann(lambda v: INDEFINITE @ v, rhs())


def test_dense_handles_singular_and_limits_size():
    a = torch.diag(torch.tensor([1.0, 2.0, 0.0], dtype=torch.float64))
    b = torch.tensor([1.0, 2.0, 0.0], dtype=torch.float64)
    res = solve_dense(lambda v: a @ v, b)
    assert res.converged
    torch.testing.assert_close(res.solution, torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="max_size"):
        solve_dense(lambda v: v, torch.ones(10), max_size=5)


def test_nonfinite_operator_warns():
    with pytest.warns(LinearSolveWarning, match="not finite"):
        res = solve_cg(lambda v: v * float("nan"), torch.ones(4))
    assert not res.converged


def test_bad_input():
    b = torch.ones(4)
    with pytest.raises(ValueError, match="matvec's output must have b's shapes"):
        solve_cg(lambda v: torch.ones(5), b)
    with pytest.raises(ValueError, match="structure"):
        solve_cg(lambda v: (v,), b)
    with pytest.raises(TypeError, match="dtype"):
        solve_cg(lambda v: v.double(), b)
    with pytest.raises(TypeError, match="floating-point"):
        solve_cg(lambda v: v, torch.ones(4, dtype=torch.long))
    with pytest.raises(TypeError, match=r"b\[0\] must be a tensor"):
        solve_cg(lambda v: v, [1.0, 2.0])
    with pytest.raises(ValueError, match="rtol"):
        solve_cg(lambda v: v, b, rtol=-1.0)
    with pytest.raises(ValueError, match="maxiter"):
        solve_bicgstab(lambda v: v, b, maxiter=0)
    with pytest.raises(ValueError, match="x0 must have b's shapes"):
        solve_cg(lambda v: v, b, x0=torch.ones(3))
    with pytest.raises(ValueError, match="method must be one of"):
        solve("lu", lambda v: v, b)
    with pytest.raises(ValueError, match="step"):
        solve_neumann(lambda v: v, b, step=-1.0)
