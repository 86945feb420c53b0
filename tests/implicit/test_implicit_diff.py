"""The implicit layer: hypergradients and Jacobians against closed forms, under autograd and every
torch.func transform, pytrees, nn.Module parameters, products counted, and bad input."""

import warnings

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, jacfwd, jacrev, jvp, vjp, vmap

from anyorder.implicit import (
    LinearSolveWarning,
    custom_fixed_point,
    custom_root,
    root_jvp,
    root_vjp,
)


def ridge_data(dtype=torch.float64, n=120, d=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    w = torch.randn(d, generator=g, dtype=torch.float64)
    y = x @ w + 0.5 * torch.randn(n, generator=g, dtype=torch.float64)
    xv = torch.randn(n // 2, d, generator=g, dtype=torch.float64)
    yv = xv @ w + 0.5 * torch.randn(n // 2, generator=g, dtype=torch.float64)
    lam = 0.1 + torch.rand(d, generator=g, dtype=torch.float64)
    return [t.to(dtype) for t in (x, y, xv, yv, lam)]


def make_ridge(x, y, rtol):
    n = x.shape[0]
    gram, c = x.T @ x / n, x.T @ y / n

    def optimality(w, lam):  # gradient of 0.5 ||X w - y||^2 / n + 0.5 sum(lam w^2)
        return gram @ w - c + lam * w

    @custom_root(optimality, solve_options={"rtol": rtol})
    def ridge(lam):
        return torch.linalg.solve(gram + torch.diag(lam), c)

    return ridge, gram, c


def val_loss(w, xv, yv):
    r = xv @ w - yv
    return 0.5 * (r @ r) / xv.shape[0]


def ridge_hypergradient(x, y, xv, yv, lam):
    """Closed form: w* = H^-1 c, H = X^T X / n + diag(lam); dL/dlam = -w* (H^-1 grad_w L)."""
    n = x.shape[0]
    h = x.T @ x / n + torch.diag(lam)
    w = torch.linalg.solve(h, x.T @ y / n)
    gw = xv.T @ (xv @ w - yv) / xv.shape[0]
    return -w * torch.linalg.solve(h, gw), w, h


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-9), (torch.float32, 1e-5)])
def test_ridge_per_feature_hypergradient(dtype, tol):
    x, y, xv, yv, lam = ridge_data(dtype)
    ridge, _, _ = make_ridge(x, y, rtol=1e-12 if dtype == torch.float64 else 1e-7)
    exact, _, _ = ridge_hypergradient(*(t.double() for t in (x, y, xv, yv, lam)))
    got = grad(lambda lam: val_loss(ridge(lam), xv, yv))(lam)
    assert got.dtype == dtype
    assert float((got.double() - exact).norm() / exact.norm()) <= tol
    lam_leaf = lam.clone().requires_grad_()  # plain autograd gives the same
    val_loss(ridge(lam_leaf), xv, yv).backward()
    torch.testing.assert_close(lam_leaf.grad, got, rtol=0, atol=0)


def test_scalar_theta():
    x, y, xv, yv, _ = ridge_data()
    n, d = x.shape
    gram, c = x.T @ x / n, x.T @ y / n

    @custom_root(lambda w, a: gram @ w - c + a * w, solve_options={"rtol": 1e-12})
    def ridge(a):
        return torch.linalg.solve(gram + a * torch.eye(d, dtype=a.dtype), c)

    a = torch.tensor(0.3, dtype=torch.float64)
    exact = ridge_hypergradient(x, y, xv, yv, a * torch.ones(d, dtype=torch.float64))[0].sum()
    got = grad(lambda a: val_loss(ridge(a), xv, yv))(a)
    assert got.shape == () and abs(float(exact)) > 1e-3  # torchopt returns 0 here
    assert abs(float(got - exact)) <= 1e-9 * abs(float(exact))


def test_jacobians_under_torch_func():
    x, y, _, _, lam = ridge_data()
    ridge, _, _ = make_ridge(x, y, rtol=1e-13)

    def jac(lam):  # closed form: dw*/dlam = -H^-1 diag(w*)
        h = x.T @ x / x.shape[0] + torch.diag(lam)
        w = torch.linalg.solve(h, x.T @ y / x.shape[0])
        return -torch.linalg.solve(h, torch.diag(w))

    j = jac(lam)
    assert float((jacrev(ridge)(lam) - j).abs().max()) <= 1e-10
    assert float((jacfwd(ridge)(lam) - j).abs().max()) <= 1e-10
    g = torch.Generator().manual_seed(5)
    v, t = torch.randn(2, lam.numel(), generator=g, dtype=torch.float64)
    out, pull = vjp(ridge, lam)
    assert float((pull(v)[0] - j.T @ v).abs().max()) <= 1e-10
    assert float((jvp(ridge, (lam,), (t,))[1] - j @ t).abs().max()) <= 1e-10
    lams = lam + 0.3 * torch.rand(3, lam.numel(), generator=g, dtype=torch.float64)
    closed = torch.stack(
        [torch.linalg.solve(x.T @ x / 120 + torch.diag(li), x.T @ y / 120) for li in lams]
    )
    assert float((vmap(ridge)(lams) - closed).abs().max()) <= 1e-12
    jacs = vmap(jacrev(ridge))(lams)
    for ji, li in zip(jacs, lams):
        assert float((ji - jac(li)).abs().max()) <= 1e-10


def test_quadratic_bilevel_with_dict_theta_and_iterative_inner_solver():
    """Inner: x* = argmin 0.5 x^T A x - x^T (B p + q) (A SPD), found by gradient descent under
    no_grad; outer 0.5 ||x* - t||^2. Closed form: dL/dp = B^T A^-1 (x* - t), dL/dq = A^-1 (x* - t)."""
    g = torch.Generator().manual_seed(2)
    m, k = 10, 4
    q_, _ = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64))
    a = q_ @ torch.diag(torch.linspace(1, 5, m, dtype=torch.float64)) @ q_.T
    b = torch.randn(m, k, generator=g, dtype=torch.float64)
    target = torch.randn(m, generator=g, dtype=torch.float64)
    theta = {
        "p": torch.randn(k, generator=g, dtype=torch.float64),
        "q": torch.randn(m, generator=g, dtype=torch.float64),
    }

    def optimality(x, th):
        return a @ x - (b @ th["p"] + th["q"])

    @custom_root(optimality, solve_options={"rtol": 1e-12})
    def inner(th, *, steps=3000):
        x = torch.zeros(m, dtype=torch.float64)
        for _ in range(steps):
            x = x - 0.3 * optimality(x, th)
        return x

    gr = grad(lambda th: 0.5 * ((inner(th) - target) ** 2).sum())(theta)
    xs = torch.linalg.solve(a, b @ theta["p"] + theta["q"])
    adj = torch.linalg.solve(a, xs - target)
    assert set(gr) == {"p", "q"}
    for got, exact in ((gr["p"], b.T @ adj), (gr["q"], adj)):
        assert float((got - exact).norm() / exact.norm()) <= 1e-9
    # the same products by the standalone functions
    p, q = root_vjp(optimality, xs, (theta,), xs - target)[0].values()
    torch.testing.assert_close(p, b.T @ adj, rtol=1e-9, atol=0)
    tangent = {"p": torch.ones(k, dtype=torch.float64), "q": torch.zeros(m, dtype=torch.float64)}
    w = root_jvp(optimality, xs, (theta,), (tangent,))
    torch.testing.assert_close(w, torch.linalg.solve(a, b @ tangent["p"]), rtol=1e-9, atol=1e-12)


def test_module_parameters_fixed_point_matches_unrolled():
    """A contractive fixed point x = tanh(W x + u) of an nn.Linear (a DEQ layer), parameters
    through functional_call; GMRES on the non-symmetric system; the implicit gradient equals
    autograd through 200 unrolled iterations (error 0.5^200)."""
    g = torch.Generator().manual_seed(4)
    lin = nn.Linear(6, 6).double()
    with torch.no_grad():
        w = torch.randn(6, 6, generator=g, dtype=torch.float64)
        lin.weight.copy_(0.5 * w / torch.linalg.matrix_norm(w, 2))
    u = torch.randn(6, generator=g, dtype=torch.float64)
    params = {k: v.detach() for k, v in lin.named_parameters()}

    def t_map(x, p):
        return torch.tanh(functional_call(lin, p, (x,)) + u)

    @custom_fixed_point(t_map, solve_options={"rtol": 1e-13})
    def deq(p):
        x = torch.zeros(6, dtype=torch.float64)
        for _ in range(200):
            x = t_map(x, p)
        return x

    def unrolled(p):
        x = torch.zeros(6, dtype=torch.float64)
        for _ in range(200):
            x = t_map(x, p)
        return x

    loss = lambda f: lambda p: (f(p) ** 2).sum()  # noqa: E731
    got, exact = grad(loss(deq))(params), grad(loss(unrolled))(params)
    assert deq.last_solve.method == "gmres" and deq.last_solve.converged
    for k in params:
        assert float((got[k] - exact[k]).abs().max()) <= 1e-11 * float(exact[k].abs().max())
    # forward mode (the non-transposed system) gives the same Jacobian as reverse mode
    fwd, rev = jacfwd(deq)(params), jacrev(deq)(params)
    for k in params:
        assert float((fwd[k] - rev[k]).abs().max()) <= 1e-10
    with pytest.raises(TypeError, match=r"fixed_point_fn must accept \(x, \*theta\)"):
        deq(params, params)


def test_at_most_30_products_per_adjoint_solve_at_condition_25():
    g = torch.Generator().manual_seed(7)
    d = 300
    q_, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    h = q_ @ torch.diag(torch.linspace(1, 25, d, dtype=torch.float64)) @ q_.T
    calls = []

    def optimality(x, th):
        return h @ x - th

    @custom_root(optimality, solve_options={"rtol": 1e-5})
    def inner(th):
        return torch.linalg.solve(h, th)

    th = torch.randn(d, generator=g, dtype=torch.float64)
    v = torch.randn(d, generator=g, dtype=torch.float64)
    _, pull = vjp(inner, th)

    def counted(u):
        calls.append(1)
        return h @ u

    pull(v)
    stats = inner.last_solve
    assert stats.converged and stats.iterations <= 30
    # the same count as a plain CG on the same system, products counted by hand
    from anyorder.implicit import solve_cg

    assert solve_cg(counted, v, rtol=1e-5).iterations == len(calls) == stats.iterations


def test_adjoint_non_convergence_warns():
    x, y, xv, yv, lam = ridge_data()
    ridge, _, _ = make_ridge(x, y, rtol=1e-12)
    ridge.solve_options["maxiter"] = 2
    with pytest.warns(LinearSolveWarning, match="cg did not converge"):
        grad(lambda lam: val_loss(ridge(lam), xv, yv))(lam)
    assert not ridge.last_solve.converged


def test_bad_input():
    x, y, xv, yv, lam = ridge_data()
    n, d = x.shape
    gram, c = x.T @ x / n, x.T @ y / n

    def optimality(w, lam):
        return gram @ w - c + lam * w

    wrong_shape = custom_root(optimality)(lambda lam: torch.zeros(d, 1, dtype=lam.dtype))
    with pytest.raises(ValueError, match="structure and shapes of the solution"):
        grad(lambda lam: wrong_shape(lam).sum())(lam)
    nonfinite = custom_root(optimality)(lambda lam: torch.full((d,), float("nan"), dtype=lam.dtype))
    with pytest.raises(ValueError, match="non-finite"):
        nonfinite(lam)
    wrong_dtype = custom_root(optimality)(lambda lam: torch.zeros(d, dtype=torch.float32))
    with pytest.raises(TypeError, match="returned dtype torch.float32"):
        wrong_dtype(lam)
    ridge, _, _ = make_ridge(x, y, rtol=1e-10)
    with pytest.raises(TypeError, match="one dtype"):
        ridge((lam, lam.float()))
    with pytest.raises(TypeError, match=r"theta\[0\]\[1\] must be a tensor"):
        ridge((lam, 3.0))
    with pytest.raises(TypeError, match="floating-point"):
        ridge(torch.ones(d, dtype=torch.long))
    with pytest.raises(ValueError, match="keyword argument 'init' requires grad"):
        ridge(lam, init=torch.zeros(d, requires_grad=True))
    with pytest.raises(ValueError, match="solve must be one of"):
        custom_root(optimality, solve="qr")
    with pytest.raises(TypeError, match=r"must accept \(x, \*theta\) with the 2 positional"):
        ridge(lam, lam)  # F takes one theta
    mismatched = custom_root(lambda w, th: th["lam"] * w)(
        lambda th: torch.ones(d, dtype=torch.float64)
    )
    with pytest.raises(IndexError) as info:
        grad(lambda lam: mismatched(lam).sum())(lam)  # theta is a tensor, F indexes a dict
    assert "theta: tensor" in "".join(getattr(info.value, "__notes__", [])) or not hasattr(
        info.value, "add_note"
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ridge(lam)  # no warning on the plain forward


def test_torch_func_products_agree_with_autograd_products(monkeypatch):
    """The products through torch.func.vjp / jvp (used where a tensor is wrapped by a transform,
    or where torch lacks the wrapper test) give the same Jacobians as the plain-autograd ones."""
    import anyorder.implicit.diff as diff

    x, y, _, _, lam = ridge_data()
    ridge, _, _ = make_ridge(x, y, rtol=1e-13)
    fast = (jacrev(ridge)(lam), jacfwd(ridge)(lam))
    monkeypatch.setattr(diff, "_is_wrapped", None)
    slow = (jacrev(ridge)(lam), jacfwd(ridge)(lam))
    for a, b in zip(fast, slow):
        assert float((a - b).abs().max()) <= 1e-12


def test_vmap_over_a_data_dependent_inner_solver():
    """An inner solver that stops on a Python-level test (not vmappable itself) under vmap and
    vmap(grad): each batch element is solved on its own; values and gradients equal the closed
    form row by row."""
    x, y, xv, yv, lam = ridge_data()
    n = x.shape[0]
    gram, c = x.T @ x / n, x.T @ y / n

    def optimality(w, lam):
        return gram @ w - c + lam * w

    @custom_root(optimality, solve_options={"rtol": 1e-13})
    def ridge_gd(lam):
        w = torch.zeros_like(c)
        e = torch.linalg.eigvalsh(gram + torch.diag(lam))
        step = 2.0 / float(e[0] + e[-1])
        while float((r := optimality(w, lam)).norm()) > 1e-12:  # data-dependent: breaks vmap
            w = w - step * r
        return w

    lams = lam + 0.5 * torch.rand(
        3, lam.numel(), generator=torch.Generator().manual_seed(8), dtype=torch.float64
    )
    got = vmap(grad(lambda lam: val_loss(ridge_gd(lam), xv, yv)))(lams)
    for gi, li in zip(got, lams):
        exact = ridge_hypergradient(x, y, xv, yv, li)[0]
        assert float((gi - exact).norm() / exact.norm()) <= 1e-9


def test_warm_start_across_calls_saves_products():
    x, y, xv, yv, lam = ridge_data()
    n = x.shape[0]
    gram, c = x.T @ x / n, x.T @ y / n

    def make(warm):
        @custom_root(
            lambda w, lam: gram @ w - c + lam * w, solve_options={"rtol": 1e-10}, warm_start=warm
        )
        def ridge(lam):
            return torch.linalg.solve(gram + torch.diag(lam), c)

        return ridge

    cold, warm = make(False), make(True)
    used = {}
    for name, f in (("cold", cold), ("warm", warm)):
        used[name] = []
        for k in range(3):  # an outer loop moving lambda a little
            lk = (lam * (1 + 1e-4 * k)).requires_grad_()
            g = torch.autograd.grad(val_loss(f(lk), xv, yv), lk)[0]
            exact = ridge_hypergradient(x, y, xv, yv, lk.detach())[0]
            assert float((g - exact).norm() / exact.norm()) <= 1e-8
            used[name].append(f.last_solve.iterations)
    assert used["warm"][0] == used["cold"][0]
    assert all(w < c for w, c in zip(used["warm"][1:], used["cold"][1:]))
    warm.reset()
    lk = lam.clone().requires_grad_()
    torch.autograd.grad(val_loss(warm(lk), xv, yv), lk)
    assert warm.last_solve.iterations == used["cold"][0]


def test_preconditioner_in_x_structure():
    """A Jacobi preconditioner written for a dict-shaped x reaches the adjoint CG and saves
    products; the hypergradient is unchanged."""
    x, y, xv, yv, lam = ridge_data()
    x = x * torch.logspace(-1, 1, x.shape[1], dtype=torch.float64)  # badly scaled features
    xv = xv * torch.logspace(-1, 1, x.shape[1], dtype=torch.float64)
    n = x.shape[0]
    gram, c = x.T @ x / n, x.T @ y / n

    def optimality(w, lam):
        return {"w": gram @ w["w"] - c + lam * w["w"]}

    def make(options):
        @custom_root(optimality, solve_options=options)
        def ridge(lam):
            return {"w": torch.linalg.solve(gram + torch.diag(lam), c)}

        return ridge

    diag = torch.diagonal(gram) + lam
    plain = make({"rtol": 1e-12})
    pre = make({"rtol": 1e-12, "M": lambda r: {"w": r["w"] / diag}})
    loss = lambda f: lambda lam: val_loss(f(lam)["w"], xv, yv)  # noqa: E731
    g_plain, g_pre = grad(loss(plain))(lam), grad(loss(pre))(lam)
    exact = ridge_hypergradient(x, y, xv, yv, lam)[0]
    for g in (g_plain, g_pre):
        assert float((g - exact).norm() / exact.norm()) <= 1e-9
    assert pre.last_solve.iterations < plain.last_solve.iterations
