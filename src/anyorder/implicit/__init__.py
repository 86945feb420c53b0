"""Implicit differentiation and the linear solvers of its adjoint systems ("Efficient and Modular
Implicit Differentiation", Blondel et al. 2022).

* :func:`custom_root`, :func:`custom_fixed_point`: turn an inner solver and its optimality
  condition into a ``torch.autograd.Function`` differentiated by the implicit function theorem,
  under autograd and ``torch.func`` (``grad``, ``vjp``, ``jvp``, ``jacrev``, ``jacfwd``,
  ``vmap``); :func:`root_vjp`, :func:`root_jvp` for the products alone;
* :mod:`anyorder.implicit.linear_solve`: matrix-free solvers (CG, MINRES, GMRES, BiCGSTAB,
  Neumann, dense) returning the solution with its recomputed residual, products used and a
  converged flag.
"""

from anyorder.implicit.diff import (
    ImplicitFunction,
    custom_fixed_point,
    custom_root,
    root_jvp,
    root_vjp,
)
from anyorder.implicit.linear_solve import (
    SOLVERS,
    LinearSolveResult,
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

__all__ = [
    "ImplicitFunction",
    "custom_root",
    "custom_fixed_point",
    "root_vjp",
    "root_jvp",
    "SOLVERS",
    "LinearSolveResult",
    "LinearSolveWarning",
    "NeumannDivergenceError",
    "solve",
    "solve_cg",
    "solve_minres",
    "solve_gmres",
    "solve_bicgstab",
    "solve_neumann",
    "solve_dense",
]
