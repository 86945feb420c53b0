"""Shared plumbing for tasks on small in-memory tabular data sets (scikit-learn's)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

__all__ = ["split_indices", "minibatches"]


def split_indices(
    n: int, test_fraction: float = 0.2, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """A fixed train/test split (independent of the run's seed, so every run sees the same data)."""
    perm = np.random.default_rng(seed).permutation(n)
    n_test = int(round(n * test_fraction))
    return np.sort(perm[n_test:]), np.sort(perm[:n_test])


def minibatches(
    x: torch.Tensor, y: torch.Tensor, batch_size: int, generator: torch.Generator
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless epochs of shuffled mini-batches; the order depends only on ``generator``."""
    n = x.shape[0]
    if batch_size >= n:
        while True:
            yield x, y
    while True:
        perm = torch.randperm(n, generator=generator).to(x.device)
        for start in range(0, n - batch_size + 1, batch_size):
            idx = perm[start : start + batch_size]
            yield x[idx], y[idx]
