"""The top-eigenvalue stop rule (issue 13) on operators with a known spectrum shaped like a
network Hessian's: a few outliers above a bulk, with a wide or a tight top gap."""

from __future__ import annotations

import statistics

import pytest
import torch

from anyorder.hessian import eigenvalues
from anyorder.hessian.operators import MatrixOperator


def _operator(top: list[float], n: int = 400, bulk: float = 0.5) -> MatrixOperator:
    spectrum = torch.tensor(top + torch.linspace(-0.05, bulk, n - len(top)).tolist(),
                            dtype=torch.float64)  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return MatrixOperator((q * spectrum) @ q.T)


@pytest.mark.parametrize(
    ("top", "bulk", "tol"),
    [
        # top gap 8%: the rule before issue 13 stopped at up to 7.7 tol here (one small change)
        ([1.0, 0.92, 0.85, 0.8], 0.4, 1e-2),
        # top two 1.5% apart (like the GELU network's Hessian): up to 15 tol before
        ([1.0, 0.985, 0.97, 0.95, 0.9], 0.5, 1e-3),
    ],
    ids=["gap", "cluster"],
)
def test_top_eigenvalue_error_tracks_tol(top: list[float], bulk: float, tol: float) -> None:
    op = _operator(top, bulk=bulk)
    errors = []
    for seed in range(10):
        spec = eigenvalues(op, 1, tol=tol, seed=seed, start="random")
        assert spec.converged
        errors.append(abs(spec.eigenvalues[0] - 1.0) / tol)
    assert max(errors) <= 1.0, errors  # never above tol ...
    assert statistics.median(errors) >= 1 / 30, errors  # ... nor typically far below it


class _ResidualBNMLP(torch.nn.Module):
    """64-16 with BatchNorm, one residual 16-16 layer with BatchNorm, 16-10 (1,546 parameters): a
    network the stop rule was not chosen on (issue 13), analysed in eval mode."""

    def __init__(self) -> None:
        super().__init__()
        nn = torch.nn
        self.inp, self.n0 = nn.Linear(64, 16), nn.BatchNorm1d(16, momentum=None)
        self.a, self.n1 = nn.Linear(16, 16), nn.BatchNorm1d(16, momentum=None)
        self.out = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.n0(self.inp(x)))
        return self.out(torch.relu(h + self.n1(self.a(h))))


def test_top_eigenvalue_on_a_network_stops_within_two_products_of_tol() -> None:
    """On a residual BatchNorm network (digits, float64, the default gradient start), the error at
    the stop is below ``tol`` and the rule spends at most two products more than the first Lanczos
    step whose Ritz value is within ``tol`` (from the same start). Here one step cuts the error up
    to 100x (a wide top gap), so the error itself may land far below ``tol``; the products are
    what the rule can waste."""
    import torch.nn.functional as F

    from anyorder.hessian import Hessian

    datasets = pytest.importorskip("sklearn.datasets")
    digits = datasets.load_digits()
    idx = torch.randperm(len(digits.target), generator=torch.Generator().manual_seed(0))[:300]
    x = torch.tensor(digits.data, dtype=torch.float64)[idx] / 16
    y = torch.tensor(digits.target)[idx]
    torch.manual_seed(0)  # the network's initial weights (test only)
    model = _ResidualBNMLP().double()
    with torch.no_grad():
        model(x)  # BatchNorm running statistics over the batch (cumulative average)
    model.eval()

    def op() -> Hessian:
        return Hessian(model, F.cross_entropy, (x, y))

    top = eigenvalues(op(), 1, tol=1e-12).eigenvalues[0]
    for tol in (3e-2, 1e-2, 1e-3, 1e-4):
        for seed in range(2):
            spec = eigenvalues(op(), 1, tol=tol, seed=seed)
            assert spec.converged
            assert abs(spec.eigenvalues[0] - top) <= tol * top, (tol, seed)
            with pytest.warns(RuntimeWarning, match="did not reach"):
                early = [
                    eigenvalues(op(), 1, tol=1e-12, max_iter=m, seed=seed).eigenvalues[0]
                    for m in range(1, spec.matvecs)
                ]
            first = next(
                (m for m, v in enumerate(early, 1) if abs(v - top) <= tol * top), spec.matvecs
            )
            assert spec.matvecs <= first + 2, (tol, seed, spec.matvecs, first)
