"""Matrix-free linear solvers for the adjoint systems of implicit differentiation.

Each solver takes ``matvec`` (a function applying ``A`` to a tensor or to a tuple/list/dict of
tensors shaped like ``b``) and returns a :class:`LinearSolveResult`: the solution in ``b``'s
structure, the residual norm ``||b - A x||`` recomputed from the returned ``x`` with one extra
product (not the recurrence's estimate, which drifts in floating point), the number of products
with ``A`` used (every one counted: the initial residual of a warm start, a Lanczos estimate, the
final check) and whether the residual met ``max(rtol * ||b||, atol)``. Like lineax/optimistix,
the result carries its statistics so callers can check convergence without re-running; a solve
that does not converge also warns (:class:`LinearSolveWarning`).

When the recomputed residual misses the tolerance although the iteration thought it had
converged (floating-point drift), the solver restarts from the returned ``x`` with the true
residual as long as that makes progress and the product budget ``maxiter`` lasts (residual
replacement; for GMRES this is its restart cycle).

Solvers run under ``torch.no_grad()`` on the tensors they are given (the implicit layer makes them
differentiable by the implicit function theorem, not by unrolling them) and keep ``b``'s dtype.

* :func:`solve_cg`: conjugate gradient (Hestenes and Stiefel 1952), symmetric definite ``A``;
* :func:`solve_minres`: MINRES (Paige and Saunders 1975), symmetric, possibly indefinite ``A``;
* :func:`solve_gmres`: restarted GMRES(m) (Saad and Schultz 1986), any non-singular ``A``;
* :func:`solve_bicgstab`: BiCGSTAB (van der Vorst 1992), any non-singular ``A``, short memory;
* :func:`solve_neumann`: the truncated Neumann series ``eta * sum_k (I - eta A)^k b`` (the
  Richardson iteration), with ``eta`` set from Lanczos estimates of the extreme eigenvalues of
  ``A``, refusing to run when the series would diverge (torchopt's ``solve_inv(ns=True)`` keeps
  ``eta = 1`` and diverges silently once the largest eigenvalue exceeds 2);
* :func:`solve_dense`: forms ``A`` column by column and solves it directly (small problems).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from anyorder.hessian.lanczos import lanczos, random_vectors
from anyorder.hessian.operators import CurvatureOperator
from anyorder.implicit._tree import describe, tree_flatten, tree_unflatten

__all__ = [
    "LinearSolveResult",
    "LinearSolveWarning",
    "NeumannDivergenceError",
    "SOLVERS",
    "solve",
    "solve_cg",
    "solve_minres",
    "solve_gmres",
    "solve_bicgstab",
    "solve_neumann",
    "solve_dense",
]

Matvec = Callable[[Any], Any]


class LinearSolveWarning(RuntimeWarning):
    """A linear solve stopped without meeting its tolerance (the result says by how much)."""


class NeumannDivergenceError(ValueError):
    """The Neumann series would diverge for this operator and step (the message says why)."""


@dataclass(frozen=True)
class LinearSolveResult:
    """A linear solve's outcome: ``solution`` (same structure as ``b``), ``residual_norm``
    (``||b - A x||`` recomputed from ``solution``), ``iterations`` (products with ``A`` used, all
    counted), ``converged`` (``residual_norm <= tolerance``), the ``tolerance`` it was held to
    (``max(rtol * ||b||, atol)``), the ``method``, and for CG ``indefinite_curvature``: the first
    curvature ``p^T A p`` of a search direction that was zero or of the other sign than the
    first direction's (``A`` is then not definite and CG stops there; ``None`` when none was
    met)."""

    solution: Any
    residual_norm: float
    iterations: int
    converged: bool
    tolerance: float = 0.0
    method: str = ""
    indefinite_curvature: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """The statistics as a JSON-ready dict (the solution is left out)."""
        return {
            "residual_norm": self.residual_norm if math.isfinite(self.residual_norm) else None,
            "iterations": self.iterations,
            "converged": self.converged,
            "tolerance": self.tolerance,
            "method": self.method,
            "indefinite_curvature": self.indefinite_curvature,
        }


class _System:
    """``A x = b`` over flat vectors: ``b``'s leaves concatenated, products counted, the matvec's
    output checked against ``b``'s structure."""

    def __init__(self, matvec: Matvec, b: Any, method: str) -> None:
        if not callable(matvec):
            raise TypeError(f"matvec must be callable, got {type(matvec).__name__}")
        leaves, spec = tree_flatten(b, "b")
        if not leaves:
            raise ValueError("b holds no tensor")
        first = leaves[0]
        for t in leaves:
            if not t.is_floating_point():
                raise TypeError(f"b must hold floating-point tensors, got dtype {t.dtype}")
            if t.dtype != first.dtype or t.device != first.device:
                raise TypeError(
                    "b's tensors must share one dtype and device, got "
                    f"{first.dtype}/{first.device} and {t.dtype}/{t.device}"
                )
        self.matvec = matvec
        self.method = method
        self.spec = spec
        self.shapes = [tuple(t.shape) for t in leaves]
        self._flat_tuple = spec == ("tuple", (None,) * len(leaves))
        self.sizes = [t.numel() for t in leaves]
        self.dtype = first.dtype
        self.device = first.device
        self.b = self.flat(leaves)
        self.n = self.b.numel()
        self.count = 0
        self.precond: Matvec | None = None
        self.curvature_sign = 0.0  # CG: the sign of the first p^T A p
        self.indefinite: float | None = None  # CG: a p^T A p of the wrong sign (or zero)

    def flat(self, leaves: list[torch.Tensor]) -> torch.Tensor:
        if len(leaves) == 1:
            return leaves[0].detach().reshape(-1)
        return torch.cat([t.detach().reshape(-1) for t in leaves])

    def tree(self, vec: torch.Tensor) -> Any:
        if self._flat_tuple and len(self.sizes) == 1:
            return (vec.view(self.shapes[0]),)
        if len(self.sizes) == 1:
            return tree_unflatten(self.spec, [vec.view(self.shapes[0])])
        parts = torch.split(vec, self.sizes)
        return tree_unflatten(self.spec, [p.view(s) for p, s in zip(parts, self.shapes)])

    def flatten_like_b(self, tree: Any, what: str) -> torch.Tensor:
        if self._flat_tuple and type(tree) is tuple and len(tree) == len(self.shapes):
            # The hot path of every product (the implicit layer passes flat tuples): the same
            # checks as below, without walking the tree generically.
            ok = True
            for t, shape in zip(tree, self.shapes):
                if not (isinstance(t, torch.Tensor) and t.dtype == self.dtype
                        and tuple(t.shape) == shape):
                    ok = False
                    break
            if ok:
                return self.flat(list(tree))
        leaves, spec = tree_flatten(tree, what)
        if spec != self.spec:
            raise ValueError(
                f"{what} must have b's structure {describe(self.spec)}, got {describe(spec)}"
            )
        for t, shape in zip(leaves, self.shapes):
            if tuple(t.shape) != shape:
                raise ValueError(
                    f"{what} must have b's shapes {[tuple(s) for s in self.shapes]}, got "
                    f"{[tuple(x.shape) for x in leaves]}"
                )
            if t.dtype != self.dtype:
                raise TypeError(f"{what} must have b's dtype {self.dtype}, got {t.dtype}")
        return self.flat(leaves)

    def mv(self, vec: torch.Tensor) -> torch.Tensor:
        self.count += 1
        return self.flatten_like_b(self.matvec(self.tree(vec)), "matvec's output")

    def apply(self, fn: Matvec, vec: torch.Tensor, what: str) -> torch.Tensor:
        """``fn`` (e.g. a preconditioner) on a flat vector, not counted as a product."""
        return self.flatten_like_b(fn(self.tree(vec)), what)


class _Operator(CurvatureOperator):
    """A :class:`_System` as a symmetric operator for anyorder's Lanczos."""

    def __init__(self, system: _System) -> None:
        super().__init__()
        self.system = system
        self.size = system.n
        self.dtype = system.dtype
        self.device = system.device

    def _matmat(self, vs: torch.Tensor) -> torch.Tensor:
        return torch.stack([self.system.mv(v) for v in vs])


def _check_options(rtol: float, atol: float, maxiter: int | None) -> None:
    for name, value in (("rtol", rtol), ("atol", atol)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{name} must be a number, got {type(value).__name__}")
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    if maxiter is not None and (
        isinstance(maxiter, bool) or not isinstance(maxiter, int) or maxiter < 1
    ):
        raise ValueError(f"maxiter must be a positive integer or None, got {maxiter!r}")


def _norm(v: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(v))


# An iteration: (system, x, r, tol, budget) -> (x, products used in the loop, broke down).
_Run = Callable[[_System, torch.Tensor, torch.Tensor, float, int], tuple[torch.Tensor, int, bool]]


def _drive(
    method: str,
    run: _Run,
    matvec: Matvec,
    b: Any,
    x0: Any,
    rtol: float,
    atol: float,
    maxiter: int | None,
    warn: bool,
    suggest: str,
    prepare: Callable[[_System], None] | None = None,
    precond: Matvec | None = None,
) -> LinearSolveResult:
    _check_options(rtol, atol, maxiter)
    with torch.no_grad():
        sys = _System(matvec, b, method)
        sys.precond = precond
        budget = 10 * sys.n if maxiter is None else maxiter
        bnorm = _norm(sys.b)
        tol = max(rtol * bnorm, atol)
        if x0 is None:
            x = torch.zeros_like(sys.b)
            r = sys.b.clone()
        else:
            x = sys.flatten_like_b(x0, "x0").clone()
            r = sys.b - sys.mv(x)
        rnorm = _norm(r)
        if prepare is not None and rnorm > tol and math.isfinite(rnorm):
            before = sys.count
            prepare(sys)
            budget -= sys.count - before
        broke = False
        while rnorm > tol and budget > 0 and math.isfinite(rnorm):
            x, used, broke = run(sys, x, r, tol, budget)
            budget -= used
            r = sys.b - sys.mv(x)  # the honest residual, and the restart's starting residual
            before, rnorm = rnorm, _norm(r)
            if broke or not rnorm < before * (1 - 1e-3):  # no progress: stop restarting
                break
        converged = rnorm <= tol
    if warn and not converged:
        why = (
            "the residual is not finite (the operator produced NaN/inf, or the iteration diverged)"
            if not math.isfinite(rnorm)
            else f"residual {rnorm:.3e} > tolerance {tol:.3e}"
            + (" (the iteration broke down)" if broke else "")
        )
        if sys.indefinite is not None:
            why += (
                f"; A is not definite: a search direction p had p^T A p = {sys.indefinite:.3e}, "
                "of the other sign than the first (or zero)"
            )
        warnings.warn(
            f"{method} did not converge: {why} after {sys.count} products with A "
            f"(rtol={rtol}, atol={atol}, maxiter={maxiter}); raise maxiter, loosen rtol, "
            f"or use {suggest}",
            LinearSolveWarning,
            stacklevel=3,
        )
    return LinearSolveResult(
        solution=sys.tree(x),
        residual_norm=rnorm,
        iterations=sys.count,
        converged=bool(converged),
        tolerance=tol,
        method=method,
        indefinite_curvature=sys.indefinite,
    )


def _cg_run(
    sys: _System, x: torch.Tensor, r: torch.Tensor, tol: float, budget: int
) -> tuple[torch.Tensor, int, bool]:
    # Preconditioned CG (Hestenes and Stiefel 1952; Golub and Van Loan, Algorithm 11.5.1) with
    # M ~ A^-1 (the identity when none is given); the stopping test is on ||r||, not ||r||_M.
    precond = sys.precond
    z = r.clone() if precond is None else sys.apply(precond, r, "M's output")
    p = z.clone()
    rz = float(torch.dot(r, z))
    rr = rz if precond is None else float(torch.dot(r, r))
    used = 0
    while used < budget and math.sqrt(rr) > tol:
        ap = sys.mv(p)
        used += 1
        pap = float(torch.dot(p, ap))
        if not math.isfinite(pap):
            return x, used, True
        if sys.curvature_sign == 0.0:
            sys.curvature_sign = math.copysign(1.0, pap)
        if pap * sys.curvature_sign <= 0.0:  # A is not definite: CG's step is meaningless
            sys.indefinite = pap
            return x, used, True
        alpha = rz / pap
        x.add_(p, alpha=alpha)
        r.sub_(ap, alpha=alpha)
        if precond is None:
            z = r
            rz_new = rr = float(torch.dot(r, r))
        else:
            z = sys.apply(precond, r, "M's output")
            rz_new = float(torch.dot(r, z))
            rr = float(torch.dot(r, r))
        if not (math.isfinite(rz_new) and math.isfinite(rr)) or rz == 0.0:
            return x, used, True
        p.mul_(rz_new / rz).add_(z)
        rz = rz_new
    return x, used, False


def solve_cg(
    matvec: Matvec,
    b: Any,
    x0: Any = None,
    *,
    rtol: float = 1e-6,
    atol: float = 0.0,
    maxiter: int | None = None,
    M: Matvec | None = None,  # noqa: N803 (SciPy's name)
    warn: bool = True,
) -> LinearSolveResult:
    """Solve ``A x = b`` by conjugate gradient (Hestenes and Stiefel 1952) for a symmetric
    definite ``A`` (positive or negative). ``x0`` warm-starts; stops when ``||b - A x|| <=
    max(rtol ||b||, atol)`` or after ``maxiter`` products (default ``10 n``, SciPy's).
    One product with ``A`` per iteration, plus one to recompute the residual at the end (and one
    for a warm start's initial residual); ``maxiter`` bounds the products inside the iteration,
    those two are not counted against it (they are in ``iterations``).

    ``M``: an optional preconditioner, a function applying a symmetric positive definite
    approximation of ``A^-1`` to ``b``'s structure (e.g. ``lambda r: r / diag`` for Jacobi);
    CG then converges at the rate of the condition number of ``M A``.

    CG stops at the first search direction ``p`` whose curvature ``p^T A p`` is zero or of the
    other sign than the first direction's: ``A`` is then not definite and CG's step is
    meaningless. The result reports it (``indefinite_curvature``), is not converged, and the
    warning suggests :func:`solve_minres`."""
    if M is not None and not callable(M):
        raise TypeError(f"M must be callable or None, got {type(M).__name__}")
    return _drive(
        "cg", _cg_run, matvec, b, x0, rtol, atol, maxiter, warn, "solve_minres", precond=M
    )


def _minres_run(
    sys: _System, x: torch.Tensor, r: torch.Tensor, tol: float, budget: int
) -> tuple[torch.Tensor, int, bool]:
    # Paige and Saunders (1975), as in SciPy's minres without a preconditioner: Lanczos on A from
    # r, a QR factorisation of the tridiagonal by Givens rotations, x updated by three-term
    # recurrences of the search directions w; phibar is ||r_k||.
    beta1 = _norm(r)
    eps = float(torch.finfo(sys.dtype).eps)
    r1 = r.clone()
    r2 = r.clone()
    y = r.clone()
    oldb, beta, dbar, epsln, phibar = 0.0, beta1, 0.0, 0.0, beta1
    cs, sn = -1.0, 0.0
    w = torch.zeros_like(x)
    w2 = torch.zeros_like(x)
    used = 0
    while used < budget:
        v = y / beta
        y = sys.mv(v)
        used += 1
        if used >= 2:
            y.sub_(r1, alpha=beta / oldb)
        alfa = float(torch.dot(v, y))
        y.sub_(r2, alpha=alfa / beta)
        r1, r2 = r2, y
        oldb, beta = beta, _norm(y)
        if not (math.isfinite(alfa) and math.isfinite(beta)):
            return x, used, True
        oldeps = epsln
        delta = cs * dbar + sn * alfa
        gbar = sn * dbar - cs * alfa
        epsln = sn * beta
        dbar = -cs * beta
        gamma = max(math.hypot(gbar, beta), eps)
        cs, sn = gbar / gamma, beta / gamma
        phi = cs * phibar
        phibar = sn * phibar
        w1, w2 = w2, w
        w = (v - oldeps * w1 - delta * w2) / gamma
        x.add_(w, alpha=phi)
        if phibar <= tol:
            break
        if beta <= eps * beta1:  # an invariant Krylov space: x is exact
            break
    return x, used, False


def solve_minres(
    matvec: Matvec,
    b: Any,
    x0: Any = None,
    *,
    rtol: float = 1e-6,
    atol: float = 0.0,
    maxiter: int | None = None,
    warn: bool = True,
) -> LinearSolveResult:
    """Solve ``A x = b`` by MINRES (Paige and Saunders 1975) for a symmetric ``A`` that may be
    indefinite (e.g. the Hessian at a saddle, or a KKT matrix). Minimises ``||b - A x||`` over
    the Krylov space; one product per iteration plus the final check. Options as
    :func:`solve_cg`."""
    return _drive("minres", _minres_run, matvec, b, x0, rtol, atol, maxiter, warn, "solve_gmres")


def _gmres_run(restart: int) -> _Run:
    def run(
        sys: _System, x: torch.Tensor, r: torch.Tensor, tol: float, budget: int
    ) -> tuple[torch.Tensor, int, bool]:
        # One cycle of GMRES(m): Arnoldi with classical Gram-Schmidt done twice (stable as
        # modified Gram-Schmidt, as matrix products), Givens rotations on the Hessenberg matrix,
        # |g[j+1]| is the residual norm of the cycle's least-squares solution.
        m = min(restart, budget, sys.n)
        beta = _norm(r)
        basis = torch.empty(m + 1, sys.n, dtype=sys.dtype, device=sys.device)
        basis[0] = r / beta
        h = torch.zeros(m + 1, m, dtype=torch.float64)
        cs = torch.zeros(m, dtype=torch.float64)
        sn = torch.zeros(m, dtype=torch.float64)
        g = torch.zeros(m + 1, dtype=torch.float64)
        g[0] = beta
        k = 0
        broke = False
        for j in range(m):
            w = sys.mv(basis[j])
            k = j + 1
            past = basis[: j + 1]
            coef = past @ w
            w = w - coef @ past
            extra = past @ w
            w = w - extra @ past
            col = (coef + extra).double().cpu()
            hn = _norm(w)
            if not (math.isfinite(hn) and bool(torch.isfinite(col).all())):
                k = j  # drop the poisoned column
                broke = True
                break
            h[: j + 1, j] = col
            h[j + 1, j] = hn
            for i in range(j):  # earlier rotations
                a, c = float(h[i, j]), float(h[i + 1, j])
                h[i, j] = cs[i] * a + sn[i] * c
                h[i + 1, j] = -sn[i] * a + cs[i] * c
            a, c = float(h[j, j]), float(h[j + 1, j])
            den = math.hypot(a, c)
            if den == 0.0:
                k = j
                broke = True
                break
            cs[j], sn[j] = a / den, c / den
            h[j, j] = den
            h[j + 1, j] = 0.0
            g[j + 1] = -sn[j] * g[j]
            g[j] = cs[j] * g[j]
            if abs(float(g[j + 1])) <= tol or hn <= 1e-14 * beta:
                break
            basis[j + 1] = w / hn
        if k > 0:
            coeffs = torch.linalg.solve_triangular(h[:k, :k], g[:k, None], upper=True)[:, 0]
            x = x + coeffs.to(sys.dtype).to(sys.device) @ basis[:k]
        return x, k, broke

    return run


def solve_gmres(
    matvec: Matvec,
    b: Any,
    x0: Any = None,
    *,
    rtol: float = 1e-6,
    atol: float = 0.0,
    maxiter: int | None = None,
    restart: int = 30,
    warn: bool = True,
) -> LinearSolveResult:
    """Solve ``A x = b`` by restarted GMRES(``restart``) (Saad and Schultz 1986) for any
    non-singular ``A`` (e.g. the Jacobian of a fixed-point map that is not a gradient). Each
    cycle minimises the residual over a Krylov space of dimension ``restart`` and ends with the
    recomputed residual that starts the next cycle; memory ``restart + 1`` vectors. One product
    per iteration plus one per cycle. Other options as :func:`solve_cg`."""
    if isinstance(restart, bool) or not isinstance(restart, int) or restart < 1:
        raise ValueError(f"restart must be a positive integer, got {restart!r}")
    return _drive(
        "gmres", _gmres_run(restart), matvec, b, x0, rtol, atol, maxiter, warn, "solve_dense"
    )


def _bicgstab_run(
    sys: _System, x: torch.Tensor, r: torch.Tensor, tol: float, budget: int
) -> tuple[torch.Tensor, int, bool]:
    r_hat = r.clone()
    rho = alpha = omega = 1.0
    v = torch.zeros_like(x)
    p = torch.zeros_like(x)
    used = 0
    while used + 2 <= budget:
        rho_new = float(torch.dot(r_hat, r))
        if rho_new == 0.0 or not math.isfinite(rho_new):
            return x, used, True
        beta = (rho_new / rho) * (alpha / omega)
        rho = rho_new
        p = r + beta * (p - omega * v)
        v = sys.mv(p)
        used += 1
        den = float(torch.dot(r_hat, v))
        if den == 0.0 or not math.isfinite(den):
            return x, used, True
        alpha = rho / den
        s = r - alpha * v
        if _norm(s) <= tol:
            x.add_(p, alpha=alpha)
            return x, used, False
        t = sys.mv(s)
        used += 1
        tt = float(torch.dot(t, t))
        if tt == 0.0 or not math.isfinite(tt):
            return x, used, True
        omega = float(torch.dot(t, s)) / tt
        x.add_(p, alpha=alpha).add_(s, alpha=omega)
        r = s - omega * t
        if _norm(r) <= tol:
            break
        if omega == 0.0:
            return x, used, True
    return x, used, False


def solve_bicgstab(
    matvec: Matvec,
    b: Any,
    x0: Any = None,
    *,
    rtol: float = 1e-6,
    atol: float = 0.0,
    maxiter: int | None = None,
    warn: bool = True,
) -> LinearSolveResult:
    """Solve ``A x = b`` by BiCGSTAB (van der Vorst 1992) for any non-singular ``A`` with a
    fixed, small memory (its residual is not monotone; GMRES's is). Two products per
    iteration; ``maxiter`` counts products. Other options as :func:`solve_cg`."""
    return _drive(
        "bicgstab", _bicgstab_run, matvec, b, x0, rtol, atol, maxiter, warn, "solve_gmres"
    )


@dataclass(frozen=True)
class _Spectrum:
    low: float  # the smallest Ritz value (>= the smallest eigenvalue)
    high: float  # the largest Ritz value plus its residual


def _extremes(sys: _System, steps: int, seed: int) -> _Spectrum:
    op = _Operator(sys)
    start = random_vectors(
        1, sys.n, seed=seed, distribution="gaussian", dtype=sys.dtype, device=sys.device
    )
    res = lanczos(op, start, min(steps, sys.n))
    m = res.steps[0]
    theta, s = torch.linalg.eigh(res.tridiagonal(0))
    resid = abs(float(res.beta[0, m - 1]) * float(s[m - 1, -1])) if m < sys.n else 0.0
    return _Spectrum(low=float(theta[0]), high=float(theta[-1]) + resid)


def solve_neumann(
    matvec: Matvec,
    b: Any,
    x0: Any = None,
    *,
    rtol: float = 1e-6,
    atol: float = 0.0,
    maxiter: int | None = None,
    step: float | None = None,
    lanczos_steps: int = 10,
    seed: int = 0,
    warn: bool = True,
) -> LinearSolveResult:
    """Solve ``A x = b`` for a symmetric positive definite ``A`` by the truncated Neumann series
    ``x_k = step * sum_{i<k} (I - step A)^i b`` (the Richardson iteration
    ``x <- x + step (b - A x)``; Lorraine et al. 2020 use it for hypergradients).

    The series converges iff every eigenvalue of ``step A`` lies in ``(0, 2)``. Before iterating,
    ``lanczos_steps`` steps of anyorder's Lanczos (from a Gaussian start drawn from ``seed``)
    estimate the extreme eigenvalues: ``lo`` (the smallest Ritz value, an upper bound on the
    smallest eigenvalue) and ``hi`` (the largest Ritz value plus its residual). If ``lo <= 0``,
    ``A`` is not positive definite and no step converges: :class:`NeumannDivergenceError`.
    ``step=None`` takes ``0.95 * 2 / (hi + lo)`` (the optimal Richardson step for the estimated
    spectrum, shrunk a little). A given ``step`` with ``step * hi >= 2`` is refused with
    :class:`NeumannDivergenceError` (torchopt's Neumann solver runs, and diverges silently, there).
    Should the residual still grow (an eigenvalue Lanczos missed), the iteration stops with a
    warning. One product per term; ``maxiter`` counts products including Lanczos's.
    """
    if step is not None:
        if isinstance(step, bool) or not isinstance(step, (int, float)):
            raise TypeError(f"step must be a number or None, got {type(step).__name__}")
        if not (math.isfinite(step) and step > 0):
            raise ValueError(f"step must be a finite number > 0 or None, got {step!r}")
    if isinstance(lanczos_steps, bool) or not isinstance(lanczos_steps, int) or lanczos_steps < 2:
        raise ValueError(f"lanczos_steps must be an integer >= 2, got {lanczos_steps!r}")
    chosen: dict[str, float] = {}

    def prepare(sys: _System) -> None:
        spec = _extremes(sys, lanczos_steps, seed)
        if not (math.isfinite(spec.low) and math.isfinite(spec.high)):
            raise NeumannDivergenceError(
                "the Lanczos estimate of A's spectrum is not finite: matvec produced NaN/inf"
            )
        if spec.low <= 0:
            raise NeumannDivergenceError(
                f"A is not positive definite (Lanczos found the eigenvalue estimate "
                f"{spec.low:.4g} <= 0): the Neumann series diverges for every step; use "
                "solve_minres (symmetric indefinite) or solve_gmres"
            )
        if step is None:
            chosen["step"] = 0.95 * 2.0 / (spec.high + spec.low)
        elif step * spec.high >= 2:
            raise NeumannDivergenceError(
                f"step={step} times the largest eigenvalue estimate {spec.high:.4g} of A is "
                f"{step * spec.high:.4g} >= 2: the Neumann series diverges; use a step below "
                f"{2 / spec.high:.4g}, or step=None to set it from the estimate"
            )
        else:
            chosen["step"] = float(step)

    def run(
        sys: _System, x: torch.Tensor, r: torch.Tensor, tol: float, budget: int
    ) -> tuple[torch.Tensor, int, bool]:
        eta = chosen["step"]
        start = _norm(r)
        used = 0
        while used < budget:
            ar = sys.mv(r)
            used += 1
            x.add_(r, alpha=eta)
            r.sub_(ar, alpha=eta)
            rn = _norm(r)
            if rn <= tol:
                break
            if not math.isfinite(rn) or rn > 1e3 * start:  # diverging: stop, warn
                return x, used, True
        return x, used, False

    return _drive(
        "neumann", run, matvec, b, x0, rtol, atol, maxiter, warn, "solve_cg", prepare=prepare
    )


def solve_dense(
    matvec: Matvec,
    b: Any,
    x0: Any = None,
    *,
    rtol: float = 1e-6,
    atol: float = 0.0,
    maxiter: int | None = None,
    max_size: int = 4096,
    warn: bool = True,
) -> LinearSolveResult:
    """Solve ``A x = b`` directly: ``A`` is formed from ``n`` products with the unit vectors and
    factorised by ``torch.linalg.solve`` (least squares, minimum norm, if it is singular). For
    small systems (``n <= max_size``); ``x0`` and ``maxiter`` are accepted for a common signature
    and not used. The residual is recomputed with one more product."""
    _check_options(rtol, atol, maxiter)
    with torch.no_grad():
        sys = _System(matvec, b, "dense")
        if sys.n > max_size:
            raise ValueError(
                f"solve_dense forms the {sys.n} x {sys.n} matrix; that is above max_size="
                f"{max_size}: use an iterative solver (solve_cg, solve_minres, solve_gmres) or "
                "raise max_size"
            )
        eye = torch.eye(sys.n, dtype=sys.dtype, device=sys.device)
        a = torch.stack([sys.mv(e) for e in eye], dim=1)
        if not bool(torch.isfinite(a).all()):
            x = torch.full_like(sys.b, math.nan)
        else:
            try:
                x = torch.linalg.solve(a, sys.b)
            except RuntimeError:  # singular: the minimum-norm least-squares solution, by SVD
                # (lstsq's default QR driver, gelsy, misjudged the rank of diag(1, 2, 0) in one
                # CPU environment and returned a non-solution)
                x = torch.linalg.pinv(a) @ sys.b
        rnorm = _norm(sys.b - sys.mv(x))
        tol = max(rtol * _norm(sys.b), atol)
        converged = rnorm <= tol
    if warn and not converged:
        warnings.warn(
            f"dense did not converge: residual {rnorm:.3e} > tolerance {tol:.3e} (A is singular "
            "or ill-conditioned, or matvec produced NaN/inf)",
            LinearSolveWarning,
            stacklevel=2,
        )
    return LinearSolveResult(
        solution=sys.tree(x),
        residual_norm=rnorm,
        iterations=sys.count,
        converged=bool(converged),
        tolerance=tol,
        method="dense",
    )


#: The solvers by name (``solve(name, ...)``, and the implicit layer's ``solve=`` argument).
SOLVERS: dict[str, Callable[..., LinearSolveResult]] = {
    "cg": solve_cg,
    "minres": solve_minres,
    "gmres": solve_gmres,
    "bicgstab": solve_bicgstab,
    "neumann": solve_neumann,
    "dense": solve_dense,
}


def solve(method: str, matvec: Matvec, b: Any, x0: Any = None, **options: Any) -> LinearSolveResult:
    """Solve ``A x = b`` with the solver named ``method`` (one of :data:`SOLVERS`)."""
    if method not in SOLVERS:
        raise ValueError(f"method must be one of {', '.join(SOLVERS)}, got {method!r}")
    return SOLVERS[method](matvec, b, x0, **options)
