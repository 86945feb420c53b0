"""A quadratic bilevel problem with a closed-form solution (the convergence check of every
algorithm in this module)."""

from __future__ import annotations

import torch

__all__ = ["QuadraticBilevel"]


class QuadraticBilevel:
    """``G(x, y) = y^T A y / 2 - y^T B x``, ``F(x, y) = ||y - t||^2 / 2 + rho ||x||^2 / 2``.

    ``y*(x) = A^{-1} B x``; with ``M = A^{-1} B`` the hyper-objective
    ``||M x - t||^2 / 2 + rho ||x||^2 / 2`` is minimised at ``x* = (M^T M + rho I)^{-1} M^T t``,
    and its gradient is ``M^T (M x - t) + rho x``. ``A`` is symmetric positive definite with
    eigenvalues spread evenly in ``[mu, L]``.

    ``x`` and ``y`` are leaf tensors (start: zeros); :meth:`inner_loss` / :meth:`outer_loss`
    are closures over them in the contract of :mod:`anyorder.bilevel`.
    """

    def __init__(
        self,
        nx: int = 5,
        ny: int = 8,
        *,
        mu: float = 1.0,
        L: float = 10.0,
        rho: float = 0.1,
        seed: int = 0,
        dtype: torch.dtype = torch.float64,
    ) -> None:
        if nx < 1 or ny < 1:
            raise ValueError(f"nx and ny must be >= 1, got nx={nx}, ny={ny}")
        if not 0 < mu <= L:
            raise ValueError(f"need 0 < mu <= L, got mu={mu}, L={L}")
        if rho < 0:
            raise ValueError(f"rho must be >= 0, got {rho}")
        g = torch.Generator().manual_seed(seed)
        q, _ = torch.linalg.qr(torch.randn(ny, ny, generator=g, dtype=torch.float64))
        eig = torch.linspace(mu, L, ny, dtype=torch.float64)
        self.A = ((q * eig) @ q.T).to(dtype)
        self.B = torch.randn(ny, nx, generator=g, dtype=torch.float64).to(dtype)
        self.t = torch.randn(ny, generator=g, dtype=torch.float64).to(dtype)
        self.rho = float(rho)
        self.x = torch.zeros(nx, dtype=dtype, requires_grad=True)
        self.y = torch.zeros(ny, dtype=dtype, requires_grad=True)

    def inner_loss(self) -> torch.Tensor:
        return 0.5 * self.y @ self.A @ self.y - self.y @ self.B @ self.x

    def outer_loss(self) -> torch.Tensor:
        return 0.5 * (self.y - self.t).square().sum() + 0.5 * self.rho * self.x.square().sum()

    def inner_solution(self, x: torch.Tensor) -> torch.Tensor:
        return torch.linalg.solve(self.A, self.B @ x)

    def hypergradient(self, x: torch.Tensor) -> torch.Tensor:
        M = torch.linalg.solve(self.A, self.B)
        return M.T @ (M @ x - self.t) + self.rho * x

    def solution(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x*, y*(x*))``."""
        M = torch.linalg.solve(self.A, self.B)
        eye = torch.eye(M.shape[1], dtype=M.dtype)
        xs = torch.linalg.solve(M.T @ M + self.rho * eye, M.T @ self.t)
        return xs, M @ xs
