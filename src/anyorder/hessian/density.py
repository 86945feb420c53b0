"""Spectral density by stochastic Lanczos quadrature (SLQ): Ghorbani, Krishnan and Xiao, "An
Investigation into Neural Net Optimization via Hessian Eigenvalue Density" (2019), after Lin,
Saad and Yang, "Approximating Spectral Densities of Large Matrices" (2016); PyHessian's density.
"""

from __future__ import annotations

import math

import torch

from anyorder.hessian.lanczos import lanczos, random_vectors
from anyorder.hessian.operators import CurvatureOperator
from anyorder.hessian.results import SpectralDensity

__all__ = ["density", "slq_nodes"]


def slq_nodes(
    op: CurvatureOperator,
    *,
    n_vectors: int = 8,
    steps: int = 80,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quadrature ``(nodes, weights)`` of the spectral measure ``(1/n) sum_i delta(t - lambda_i)``:
    for each Rademacher start vector, the Ritz values of ``steps`` Lanczos steps weighted by the
    squared first components of their eigenvectors, averaged over ``n_vectors`` (weights sum to
    one). The runs advance together, one batched product per step."""
    if not isinstance(n_vectors, int) or n_vectors < 1:
        raise ValueError(f"n_vectors must be a positive integer, got {n_vectors!r}")
    if not isinstance(steps, int) or steps < 2:
        raise ValueError(f"steps must be an integer >= 2, got {steps!r}")
    start = random_vectors(n_vectors, op.size, seed=seed, dtype=op.dtype, device=op.device)
    res = lanczos(op, start, steps)
    nodes, weights = [], []
    for r in range(n_vectors):
        theta, s = torch.linalg.eigh(res.tridiagonal(r))
        nodes.append(theta)
        weights.append(s[0] ** 2 / n_vectors)
    return torch.cat(nodes), torch.cat(weights)


def density(
    op: CurvatureOperator,
    *,
    n_vectors: int = 8,
    steps: int = 80,
    grid_points: int = 1000,
    sigma: float | None = None,
    seed: int = 0,
) -> SpectralDensity:
    """The eigenvalue density of ``op`` by stochastic Lanczos quadrature (Ghorbani et al. 2019;
    Lin et al. 2016): quadrature nodes from :func:`slq_nodes` smoothed with a Gaussian kernel of
    width ``sigma`` (default: 1% of the spectral range found) on ``grid_points`` points spanning the
    extremes plus ``5 sigma``; the values integrate to one (trapezoid rule) and the mass of an
    interval approximates the fraction of eigenvalues in it."""
    if not isinstance(grid_points, int) or grid_points < 10:
        raise ValueError(f"grid_points must be an integer >= 10, got {grid_points!r}")
    if sigma is not None and not (isinstance(sigma, (int, float)) and sigma > 0):
        raise ValueError(f"sigma must be a number > 0 or None, got {sigma!r}")
    before = op.matvecs
    nodes, weights = slq_nodes(op, n_vectors=n_vectors, steps=steps, seed=seed)
    lo, hi = float(nodes.min()), float(nodes.max())
    width = hi - lo
    if sigma is None:
        sigma = 0.01 * width if width > 0 else max(abs(hi), 1.0) * 1e-3
    grid = torch.linspace(lo - 5 * sigma, hi + 5 * sigma, grid_points, dtype=torch.float64)
    values = torch.zeros_like(grid)
    norm = 1.0 / (sigma * math.sqrt(2 * math.pi))
    for start in range(0, nodes.numel(), 512):  # bounded (grid x nodes) blocks
        t, w = nodes[start : start + 512], weights[start : start + 512]
        values += (torch.exp(-0.5 * ((grid[:, None] - t[None, :]) / sigma) ** 2) * w).sum(1)
    values *= norm
    return SpectralDensity(
        grid=tuple(grid.tolist()),
        values=tuple(values.tolist()),
        nodes=tuple(nodes.tolist()),
        weights=tuple(weights.tolist()),
        sigma=float(sigma),
        n_vectors=n_vectors,
        steps=steps,
        matvecs=op.matvecs - before,
    )
