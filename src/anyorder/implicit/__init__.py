"""Implicit differentiation and the linear solvers of its adjoint systems ("Efficient and Modular
Implicit Differentiation", Blondel et al. 2022).

* :mod:`anyorder.implicit.linear_solve`: matrix-free solvers (CG, MINRES, GMRES, BiCGSTAB,
  Neumann, dense) returning the solution with its recomputed residual, products used and a
  converged flag.
"""

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
