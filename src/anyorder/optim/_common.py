"""Shared argument checks and parameter bookkeeping of the optimizers in :mod:`anyorder.optim`."""

from __future__ import annotations

import math
from typing import Any

import torch

__all__ = [
    "check_betas",
    "check_nonnegative",
    "check_positive_int",
    "indexed_params",
]


def check_betas(betas: Any, name: str = "betas") -> tuple[float, float]:
    """``betas`` must be a pair of numbers in [0, 1)."""
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"{name} must be a pair (beta1, beta2), got {betas!r}")
    for i, b in enumerate(betas):
        if not isinstance(b, (int, float)) or isinstance(b, bool) or not 0.0 <= b < 1.0:
            raise ValueError(f"{name}[{i}] must be a number in [0, 1), got {b!r}")
    return float(betas[0]), float(betas[1])


def check_nonnegative(value: Any, name: str) -> float:
    """``value`` must be a finite number >= 0."""
    if (
        not isinstance(value, (int, float))
        or isinstance(value, bool)
        or not math.isfinite(value)
        or value < 0
    ):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def check_positive_int(value: Any, name: str) -> int:
    """``value`` must be an integer >= 1."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return value


def indexed_params(
    param_groups: list[dict[str, Any]],
) -> list[tuple[int, torch.Tensor, dict[str, Any]]]:
    """``(index, param, group)`` of every parameter that requires grad. Indices are positions
    over all groups (frozen tensors included), so a tensor keeps its key when others freeze."""
    out, index = [], 0
    for group in param_groups:
        for p in group["params"]:
            if p.requires_grad:
                out.append((index, p, group))
            index += 1
    return out
