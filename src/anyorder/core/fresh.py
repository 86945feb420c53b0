"""Which parameters are *fresh*: newly initialised rather than pretrained or task-aligned.

MeZO (Malladi et al. 2023, Table 5) trains with zeroth-order steps only from a task-aligned start:
RoBERTa-large with a prompt reaches 89.6 on SST-2, with a freshly initialised head 51.9 (chance).
The zeroth-order optimizers (:mod:`anyorder.optim.zo`) therefore warn once, with
:class:`FreshHeadWarning`, when they are asked to estimate the gradient of a fresh parameter.

"Fresh" is a flag on the ``Parameter`` object, set only on evidence, never guessed from values:

* :func:`mark_fresh` (the user, or the bench's ``text-finetune`` task with ``head="fresh"``) says
  so explicitly;
* :func:`mark_fresh_from_loading_info` reads the ``missing_keys`` that ``transformers`` reports
  when a model is loaded with ``from_pretrained(..., output_loading_info=True)``: those are the
  weights the checkpoint did not have and the library initialised at random (a
  ``*ForSequenceClassification`` head on top of a base checkpoint, for instance).
  :func:`anyorder.integrations.from_pretrained` loads and marks in one call.

:func:`mark_task_aligned` clears the flag (after the user has initialised the head from label
texts, prototypes or a probe in place). Checking costs one attribute read per tensor, once per
optimizer. The flag lives on the ``Parameter`` object: ``copy.deepcopy`` and a ``state_dict``
round trip do not carry it (mark the copy).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

__all__ = [
    "FreshHeadWarning",
    "fresh_names",
    "mark_fresh",
    "mark_fresh_from_loading_info",
    "mark_task_aligned",
    "warn_if_fresh",
]

_FLAG = "_anyorder_fresh"


class FreshHeadWarning(UserWarning):
    """A zeroth-order optimizer was asked to train freshly initialised parameters."""


def _named(target: nn.Module | nn.Parameter | Iterable[nn.Parameter]) -> list[tuple[str, Any]]:
    if isinstance(target, nn.Module):
        return list(target.named_parameters())
    if isinstance(target, torch.Tensor):
        return [("", target)]
    try:
        items = list(target)
    except TypeError:
        raise TypeError(
            f"expected a module, a parameter or an iterable of parameters, got {type(target).__name__}"
        ) from None
    for p in items:
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"expected parameters (tensors), got a {type(p).__name__}")
    return [("", p) for p in items]


def mark_fresh(target: nn.Module | nn.Parameter | Iterable[nn.Parameter], prefix: str = "") -> None:
    """Flag every parameter of ``target`` as freshly initialised (its name, for the warning,
    is ``prefix`` + its name in the module)."""
    for name, p in _named(target):
        setattr(p, _FLAG, (prefix + name) or "a parameter")


def mark_task_aligned(target: nn.Module | nn.Parameter | Iterable[nn.Parameter]) -> None:
    """Clear the fresh flag of every parameter of ``target`` (it now starts from the task)."""
    for _, p in _named(target):
        if hasattr(p, _FLAG):
            delattr(p, _FLAG)


def mark_fresh_from_loading_info(model: nn.Module, loading_info: Mapping[str, Any]) -> list[str]:
    """Flag the parameters ``transformers`` reported missing from the checkpoint (the
    ``loading_info["missing_keys"]`` of ``from_pretrained(..., output_loading_info=True)``), i.e.
    the ones it initialised at random. Returns the names flagged (missing buffers are ignored)."""
    if not isinstance(loading_info, Mapping) or "missing_keys" not in loading_info:
        raise TypeError(
            "loading_info must be the dict from from_pretrained(..., output_loading_info=True), "
            f"with 'missing_keys'; got {type(loading_info).__name__}"
        )
    params = dict(model.named_parameters())
    flagged = []
    for name in sorted(loading_info["missing_keys"]):
        if name in params:
            setattr(params[name], _FLAG, name)
            flagged.append(name)
    return flagged


def fresh_names(params: Iterable[torch.Tensor]) -> list[str]:
    """Names of the flagged parameters among ``params``."""
    return [str(getattr(p, _FLAG)) for p in params if getattr(p, _FLAG, None)]


def warn_if_fresh(params: Iterable[torch.Tensor], who: str) -> None:
    """Warn (:class:`FreshHeadWarning`) when any of ``params`` is flagged fresh."""
    names = fresh_names(params)
    if not names:
        return
    shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
    warnings.warn(
        f"{who} is asked to train freshly initialised parameters ({shown}) with zeroth-order "
        "estimates: from a random head zeroth-order fine-tuning stays near chance (MeZO, Table 5). "
        "Start from a task-aligned head instead (anyorder.integrations: label_text_head, "
        "prototype_head, linear_probe_head, or PromptClassifier for a model with its LM head), "
        "train the head with exact gradients (anyorder.optim.HybridZO), or, if these weights do "
        "start from the task, call anyorder.integrations.mark_task_aligned on them.",
        FreshHeadWarning,
        stacklevel=3,
    )
