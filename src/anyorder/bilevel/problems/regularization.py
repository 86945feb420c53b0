"""Regularisation tuned on a validation split: per-feature L2 of ridge and logistic regression,
and one regularisation scale per task (the multi-block problem of BSVRB).

    G(lam, theta) = training loss(theta) + (1/2) sum_j exp(lam_j) theta_j^2
    F(lam, theta) = validation loss(theta)

``lam`` (log scales, start ``log_reg0``) is the outer variable. Ridge has the closed form
``theta*(lam) = (X^T X / n + D)^{-1} X^T y / n`` with ``D = diag(exp(lam))`` and the
hypergradient ``-exp(lam) * theta* * v`` with ``v = (X^T X / n + D)^{-1} grad F(theta*)``
(:meth:`RidgeL2.hypergradient`). Data (offline, scikit-learn): diabetes for ridge, breast
cancer for logistic regression, digits one-vs-rest tasks for the multi-task problem;
standardised with the training split's statistics; train / validation / test disjoint.
"""

from __future__ import annotations

import torch
from torch.nn import functional as TF

__all__ = ["RidgeL2", "LogisticL2", "MultiTaskL2"]


def _split(n: int, fractions: tuple[float, float], seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=g)
    a = int(fractions[0] * n)
    b = a + int(fractions[1] * n)
    return perm[:a], perm[a:b], perm[b:]


def _standardise(X: torch.Tensor, tr: torch.Tensor) -> torch.Tensor:
    mu = X[tr].mean(0)
    sd = X[tr].std(0).clamp(min=1e-8)
    return (X - mu) / sd


class RidgeL2:
    """Per-feature L2 of ridge regression on scikit-learn's diabetes data (442 x 10),
    train / validation / test = 1/3 each (by ``seed``), with a closed-form hypergradient."""

    def __init__(self, *, seed: int = 0, log_reg0: float = 0.0, dtype=torch.float64) -> None:
        from sklearn.datasets import load_diabetes

        d = load_diabetes()
        X = torch.tensor(d.data, dtype=dtype)
        y = torch.tensor(d.target, dtype=dtype)
        tr, va, te = _split(len(y), (1 / 3, 1 / 3), seed)
        X = _standardise(X, tr)
        y = (y - y[tr].mean()) / y[tr].std()
        self.X, self.y = X[tr], y[tr]
        self.Xv, self.yv = X[va], y[va]
        self.Xt, self.yt = X[te], y[te]
        p = X.shape[1]
        self.lam = torch.full((p,), float(log_reg0), dtype=dtype, requires_grad=True)
        self.theta = torch.zeros(p, dtype=dtype, requires_grad=True)

    def inner_loss(self) -> torch.Tensor:
        r = self.X @ self.theta - self.y
        return 0.5 * r.square().mean() + 0.5 * (self.lam.exp() * self.theta.square()).sum()

    def outer_loss(self) -> torch.Tensor:
        return 0.5 * (self.Xv @ self.theta - self.yv).square().mean()

    def _system(self, lam: torch.Tensor) -> torch.Tensor:
        n = len(self.y)
        return self.X.T @ self.X / n + torch.diag(lam.exp())

    def inner_solution(self, lam: torch.Tensor) -> torch.Tensor:
        return torch.linalg.solve(self._system(lam), self.X.T @ self.y / len(self.y))

    def hypergradient(self, lam: torch.Tensor) -> torch.Tensor:
        """The exact hypergradient at ``lam`` (closed form)."""
        lam = lam.detach()
        th = self.inner_solution(lam)
        gF = self.Xv.T @ (self.Xv @ th - self.yv) / len(self.yv)
        v = torch.linalg.solve(self._system(lam), gF)
        return -lam.exp() * th * v

    @torch.no_grad()
    def test_loss(self) -> float:
        """Test mean squared error / 2 of the inner solution at the current ``lam``."""
        th = self.inner_solution(self.lam)
        return float(0.5 * (self.Xt @ th - self.yt).square().mean())


class LogisticL2:
    """Per-feature L2 of logistic regression on scikit-learn's breast cancer data (569 x 30),
    train / validation / test = 40 / 30 / 30 % (by ``seed``)."""

    def __init__(self, *, seed: int = 0, log_reg0: float = -2.0, dtype=torch.float64) -> None:
        from sklearn.datasets import load_breast_cancer

        d = load_breast_cancer()
        X = torch.tensor(d.data, dtype=dtype)
        y = torch.tensor(d.target, dtype=dtype)
        tr, va, te = _split(len(y), (0.4, 0.3), seed)
        X = _standardise(X, tr)
        self.X, self.y = X[tr], y[tr]
        self.Xv, self.yv = X[va], y[va]
        self.Xt, self.yt = X[te], y[te]
        p = X.shape[1]
        self.lam = torch.full((p,), float(log_reg0), dtype=dtype, requires_grad=True)
        self.theta = torch.zeros(p + 1, dtype=dtype, requires_grad=True)

    def _logits(self, X: torch.Tensor) -> torch.Tensor:
        return X @ self.theta[:-1] + self.theta[-1]

    def inner_loss(self) -> torch.Tensor:
        loss = TF.binary_cross_entropy_with_logits(self._logits(self.X), self.y)
        return loss + 0.5 * (self.lam.exp() * self.theta[:-1].square()).sum()

    def outer_loss(self) -> torch.Tensor:
        return TF.binary_cross_entropy_with_logits(self._logits(self.Xv), self.yv)

    @torch.no_grad()
    def accuracy(self) -> float:
        return float(((self._logits(self.Xt) > 0).to(self.yt.dtype) == self.yt).double().mean())


class MultiTaskL2:
    """``m`` one-vs-rest logistic regressions on scikit-learn's digits (task ``i``: digit ``i``
    against the rest), each with its own L2 scale ``exp(lam_i)``: the multi-block problem

        g_i(lam, theta_i) = BCE_train,i(theta_i) + exp(lam_i) ||w_i||^2 / 2
        f_i(lam, theta_i) = BCE_val,i(theta_i),      F = (1/m) sum_i f_i.

    ``blocks`` holds the ``m`` inner tensors (``65`` values each: weights and bias); the
    closures :meth:`inner_loss` / :meth:`outer_loss` take the task index. The training split is
    deliberately small (``n_train``) so the regularisation matters. :meth:`inner_loss_all` /
    :meth:`outer_loss_all` pose the same problem as one block for single-block algorithms.
    """

    def __init__(
        self,
        *,
        m: int = 10,
        n_train: int = 200,
        n_val: int = 400,
        seed: int = 0,
        log_reg0: float = -3.0,
        dtype=torch.float64,
    ) -> None:
        from sklearn.datasets import load_digits

        if not 1 <= m <= 10:
            raise ValueError(f"m must be in 1..10 (one task per digit), got {m}")
        d = load_digits()
        X = torch.tensor(d.data / 16.0, dtype=dtype)
        labels = torch.tensor(d.target)
        n = len(labels)
        if n_train + n_val >= n:
            raise ValueError(f"n_train + n_val must be < {n}")
        g = torch.Generator().manual_seed(seed)
        perm = torch.randperm(n, generator=g)
        tr, va, te = perm[:n_train], perm[n_train : n_train + n_val], perm[n_train + n_val :]
        self.m = m
        self.X, self.Xv, self.Xt = X[tr], X[va], X[te]
        self.Y = [(labels[tr] == i).to(dtype) for i in range(m)]
        self.Yv = [(labels[va] == i).to(dtype) for i in range(m)]
        self.Yt = [(labels[te] == i).to(dtype) for i in range(m)]
        self.lam = torch.full((m,), float(log_reg0), dtype=dtype, requires_grad=True)
        self.blocks = [torch.zeros(65, dtype=dtype, requires_grad=True) for _ in range(m)]

    def _logits(self, i: int, X: torch.Tensor) -> torch.Tensor:
        return X @ self.blocks[i][:-1] + self.blocks[i][-1]

    def inner_loss(self, i: int) -> torch.Tensor:
        bce = TF.binary_cross_entropy_with_logits(self._logits(i, self.X), self.Y[i])
        return bce + 0.5 * self.lam[i].exp() * self.blocks[i][:-1].square().sum()

    def outer_loss(self, i: int) -> torch.Tensor:
        return TF.binary_cross_entropy_with_logits(self._logits(i, self.Xv), self.Yv[i])

    def inner_loss_all(self) -> torch.Tensor:
        return sum(self.inner_loss(i) for i in range(self.m))  # type: ignore[return-value]

    def outer_loss_all(self) -> torch.Tensor:
        return sum(self.outer_loss(i) for i in range(self.m)) / self.m  # type: ignore[return-value]

    @torch.no_grad()
    def test_loss(self) -> float:
        """Mean test BCE over the tasks."""
        total = sum(
            float(TF.binary_cross_entropy_with_logits(self._logits(i, self.Xt), self.Yt[i]))
            for i in range(self.m)
        )
        return total / self.m

    @torch.no_grad()
    def accuracy(self) -> float:
        """Test accuracy of the one-vs-rest classifier (argmax over the task logits)."""
        if self.m < 10:
            scores = [
                ((self._logits(i, self.Xt) > 0).to(self.Yt[i].dtype) == self.Yt[i]).double().mean()
                for i in range(self.m)
            ]
            return float(sum(scores) / self.m)
        logits = torch.stack([self._logits(i, self.Xt) for i in range(self.m)], 1)
        truth = torch.stack(self.Yt, 1).argmax(1)
        return float((logits.argmax(1) == truth).double().mean())

