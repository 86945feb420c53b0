"""Loading a Hugging Face model with its newly initialised weights flagged as fresh.

``transformers`` reports the weights a checkpoint lacked (and that it initialised at random) in
``from_pretrained(..., output_loading_info=True)``'s ``missing_keys``; :func:`from_pretrained`
flags exactly those parameters (:func:`anyorder.core.fresh.mark_fresh_from_loading_info`), so
that a zeroth-order optimizer asked to train them warns (MeZO, Malladi et al. 2023, Table 5: from
a random head zeroth-order fine-tuning stays at chance).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from anyorder.core.fresh import mark_fresh_from_loading_info

__all__ = ["from_pretrained"]


def from_pretrained(model_class: Any, *args: Any, **kwargs: Any) -> nn.Module:
    """``model_class.from_pretrained(*args, **kwargs)`` with the parameters that the checkpoint
    did not provide flagged as fresh; returns the model (the loading info is also kept as
    ``model.anyorder_fresh``, the list of names flagged)."""
    if not hasattr(model_class, "from_pretrained"):
        raise TypeError(f"{model_class!r} has no from_pretrained (a transformers model class?)")
    if kwargs.pop("output_loading_info", True) is False:
        raise ValueError("from_pretrained needs the loading info; do not pass output_loading_info=False")
    model, info = model_class.from_pretrained(*args, output_loading_info=True, **kwargs)
    model.anyorder_fresh = mark_fresh_from_loading_info(model, info)
    return model
