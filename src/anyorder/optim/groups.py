"""Param-group recipes: weight decay without biases and norms, and the ASAM authors' scaling."""

from __future__ import annotations

from typing import Any

from torch import nn

__all__ = ["asam_groups", "decay_groups"]


def decay_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two param groups of ``model``'s trainable parameters: matrices and kernels (``dim >= 2``)
    with ``weight_decay``, and everything else (biases, LayerNorm/BatchNorm weights, ...) with
    ``weight_decay=0``, the split MeZO's code and most fine-tuning code use. Pass the result as
    ``params`` of any optimizer (the ZO optimizers apply weight decay to every tensor of a group
    otherwise). Groups that would be empty are left out."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    rest = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def asam_groups(model: nn.Module) -> list[dict[str, Any]]:
    """Param groups for :class:`anyorder.optim.SAM` with ``adaptive=True`` that reproduce the
    ASAM authors' code (``SamsungLabs/ASAM``, ``asam.py``): the scale ``T = |w| + eta`` applies to
    parameters whose name contains ``"weight"`` (normalisation weights included) and ``T = 1`` to
    all others (biases), which go in a group with ``adaptive=False``. The norm ``||T g||`` is still
    taken over all groups together, as in their code. Groups that would be empty are left out."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    scaled = [p for n, p in named if "weight" in n]
    plain = [p for n, p in named if "weight" not in n]
    groups = [{"params": scaled, "adaptive": True}, {"params": plain, "adaptive": False}]
    return [g for g in groups if g["params"]]
