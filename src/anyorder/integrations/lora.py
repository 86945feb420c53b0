"""Zeroth-order training of LoRA adapters through ``peft`` (optional extra ``anyorder[peft]``).

MeZO (Malladi et al. 2023, §3 and Table 4) combines its estimator with parameter-efficient
fine-tuning: only the adapters are perturbed and updated (LoRA with lr 1e-4 / 5e-5 and eps 1e-2 in
its grids). Every anyorder zeroth-order optimizer already trains exactly the parameters with
``requires_grad`` (frozen tensors are never perturbed nor updated), so LoRA-ZO is: inject the
adapters with ``peft``, leave only them (and, if wanted, the task head) trainable, pass the
trainable parameters to the optimizer. :func:`add_lora` does the first two in place.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["add_lora", "trainable_parameters"]


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters of ``model`` that require grad (what a ZO optimizer perturbs)."""
    return [p for p in model.parameters() if p.requires_grad]


def add_lora(
    model: nn.Module,
    *,
    target_modules: Sequence[str],
    r: int = 8,
    alpha: float = 16.0,
    dropout: float = 0.0,
    also_train: Sequence[str] = (),
    adapter_name: str = "default",
    seed: int = 0,
) -> list[nn.Parameter]:
    """Inject LoRA adapters (``peft.inject_adapter_in_model``) into the submodules of ``model``
    named by ``target_modules`` (peft's matching: e.g. ``["query", "value"]`` for BERT-style
    attention), in place; freeze every other parameter except those under the submodules named in
    ``also_train`` (e.g. ``["head"]``); return the trainable parameters.

    ``peft`` initialises ``B = 0``, so the model computes exactly what it did before; ``A`` is
    drawn as peft draws it (Kaiming-uniform), from a ``torch.Generator`` seeded with ``seed``
    (the global RNG is left as it was). Raises
    ``ImportError`` saying how to install peft when it is missing.
    """
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError as err:  # pragma: no cover - exercised only without the extra
        raise ImportError("add_lora needs peft: pip install 'anyorder[peft]'") from err
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(target_modules, str) or not target_modules:
        raise ValueError(f"target_modules must be a non-empty list of names, got {target_modules!r}")
    if isinstance(also_train, str):
        raise ValueError(f"also_train must be a list of submodule names, got {also_train!r}")
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"r must be an integer >= 1, got {r!r}")
    names = dict(model.named_modules())
    missing = [n for n in also_train if n not in names]
    if missing:
        raise ValueError(f"also_train names no submodule of the model: {missing}")
    config = LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules)
    )
    with torch.random.fork_rng(devices=[]):  # peft draws A from the global RNG: not ours
        inject_adapter_in_model(config, model, adapter_name=adapter_name)
    generator = torch.Generator().manual_seed(int(seed))
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "lora_A" in name:  # redrawn reproducibly, as peft's default init draws it
                drawn = torch.empty(p.shape, dtype=p.dtype)
                nn.init.kaiming_uniform_(drawn, a=math.sqrt(5), generator=generator)
                p.copy_(drawn)
    keep = tuple(f"{n}." for n in also_train)
    for name, p in model.named_parameters():
        p.requires_grad_(("lora_" in name) or name.startswith(keep))
    trainable = trainable_parameters(model)
    if not any("lora_" in n for n, _ in model.named_parameters()):
        raise ValueError(f"no module of the model matched target_modules={list(target_modules)}")
    return trainable
