"""``digits-mlp``: scikit-learn's 8x8 handwritten digits (1,797 images, 10 classes), an MLP,
held-out accuracy."""

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
def load_digits_split() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Digits scaled to [0, 1], split 80/20 with a fixed permutation: (x_train, y_train, x_test,
    y_test)."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    train, test = split_indices(len(y))
    return x[train], y[train], x[test], y[test]


@register_task
class DigitsMLP(ModelTask):
    """A 64-hidden-64-10 ReLU MLP on the digits; cross-entropy loss; metric: test accuracy."""

    name = "digits-mlp"
    description = "sklearn digits 8x8, MLP 64-h-10, cross-entropy; metric: held-out accuracy"
    provides = frozenset({"values", "gradients", "model", "population", "logits"})
    metric_name = "test_accuracy"
    higher_is_better = True
    default_steps: ClassVar[dict[str, int]] = {"quick": 300, "full": 3000}

    @classmethod
    def option_defaults(cls) -> dict[str, Any]:
        return {"hidden": 64, "batch_size": 64}

    def _data(self) -> tuple[torch.Tensor, ...]:
        return tuple(t.to(self.device) for t in load_digits_split())

    def _build_model(self, seed: int) -> nn.Module:
        hidden = int(self.options["hidden"])
        return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))

    def batches(self, generator: torch.Generator) -> Iterator[Any]:
        x, y, _, _ = self._data()
        return minibatches(x, y, int(self.options["batch_size"]), generator)

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        return self.loss_and_logits(model, batch)[0]

    def loss_and_logits(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = batch
        logits = model(x)
        return F.cross_entropy(logits, y), logits

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> tuple[float, float]:
        x, y, x_test, y_test = self._data()
        objective = float(F.cross_entropy(model(x), y))
        accuracy = float((model(x_test).argmax(-1) == y_test).float().mean())
        return objective, accuracy
