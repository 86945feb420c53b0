"""``breast-cancer-logreg``: scikit-learn's breast cancer data (569 samples, 30 features),
L2-regularised logistic regression. The problem is strongly convex, so the metric is the
suboptimality gap f(w) - f* of the full training objective, with f* from a tight float64 L-BFGS
solve."""

from __future__ import annotations

from collections.abc import Iterator
from functools import lru_cache
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from anyorder.bench.registry import register_task
from anyorder.bench.tasks.base import ModelTask
from anyorder.bench.tasks.tabular import minibatches, split_indices


@lru_cache(maxsize=1)
def load_breast_cancer_split() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Features standardised with training statistics, labels in {0, 1}, fixed 80/20 split."""
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer()
    x = torch.tensor(data.data, dtype=torch.float64)
    y = torch.tensor(data.target, dtype=torch.float64)
    train, test = split_indices(len(y))
    mean, std = x[train].mean(0), x[train].std(0)
    x = (x - mean) / std
    return x[train], y[train], x[test], y[test]


def objective(
    weight: torch.Tensor, bias: torch.Tensor, x: torch.Tensor, y: torch.Tensor, l2: float
) -> torch.Tensor:
    """Mean logistic loss plus (l2 / 2) ||weight||^2 (the bias is not regularised)."""
    logits = x @ weight.reshape(-1) + bias.reshape(())
    return F.binary_cross_entropy_with_logits(logits, y) + 0.5 * l2 * weight.pow(2).sum()


@lru_cache(maxsize=4)
@torch.enable_grad()
def solve(l2: float) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(w*, b*, f*)`` of the training objective by float64 L-BFGS (strong Wolfe line search,
    restarted until the gradient norm is below 1e-9; an error there changes f* by about
    |grad|^2 / (2 l2) < 1e-16)."""
    x, y, _, _ = load_breast_cancer_split()
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS(
        [w, b],
        lr=1.0,
        max_iter=2000,
        tolerance_grad=1e-12,
        tolerance_change=1e-15,
        history_size=50,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = objective(w, b, x, y, l2)
        loss.backward()
        return loss

    for _ in range(20):
        opt.step(closure)
        closure()
        if float(torch.cat([w.grad, b.grad.reshape(1)]).norm()) < 1e-9:
            break
    with torch.no_grad():
        return w.detach(), b.detach(), float(objective(w, b, x, y, l2))


def optimum(l2: float) -> float:
    """f*, the minimum of the training objective."""
    return solve(l2)[2]


@register_task
class BreastCancerLogReg(ModelTask):
    """Logistic regression with L2 penalty ``l2`` (default 1e-2); metric: f(w) - f*."""

    name = "breast-cancer-logreg"
    description = (
        "sklearn breast cancer, L2 logistic regression (convex); metric: gap to L-BFGS optimum"
    )
    provides = frozenset({"values", "gradients", "model", "population", "logits"})
    metric_name = "suboptimality_gap"
    higher_is_better = False
    default_steps: ClassVar[dict[str, int]] = {"quick": 300, "full": 3000}

    @classmethod
    def option_defaults(cls) -> dict[str, Any]:
        return {"l2": 1e-2, "batch_size": 64}

    def _data(self) -> tuple[torch.Tensor, ...]:
        return tuple(t.to(self.device) for t in load_breast_cancer_split())

    def _build_model(self, seed: int) -> nn.Module:
        return nn.Linear(30, 1)

    def batches(self, generator: torch.Generator) -> Iterator[Any]:
        x, y, _, _ = self._data()
        return minibatches(x.float(), y.float(), int(self.options["batch_size"]), generator)

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        x, y = batch
        return objective(model.weight, model.bias, x, y, float(self.options["l2"]))

    def loss_and_logits(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """The objective and the two-class logits (0, z): their softmax is
        (1 - sigmoid(z), sigmoid(z)), so their cross-entropy is the logistic loss (the L2 term,
        whose curvature is the constant l2, is not part of it)."""
        z = model(batch[0]).reshape(-1)
        return self.loss(model, batch), torch.stack([torch.zeros_like(z), z], dim=-1)

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> tuple[float, float]:
        x, y, _, _ = self._data()
        value = float(
            objective(model.weight.double(), model.bias.double(), x, y, float(self.options["l2"]))
        )
        return value, value - optimum(float(self.options["l2"]))
