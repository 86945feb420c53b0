"""Integrations with the stacks users fine-tune in. So far: task-aligned starts for zeroth-order
fine-tuning (MeZO, Malladi et al. 2023): prompt-based classification through a masked or causal
LM's own head (:mod:`~anyorder.integrations.prompts`) and heads built from a frozen encoder's
embeddings (:mod:`~anyorder.integrations.heads`); the fresh-parameter flags behind the
zeroth-order optimizers' :class:`FreshHeadWarning` (:mod:`anyorder.core.fresh`,
:func:`from_pretrained`); training loops users already run:
:class:`ClosureTrainer` (a ``transformers.Trainer`` for closure optimizers, ``anyorder[hf]``) and
:func:`~anyorder.integrations.lightning.closure_step` (Lightning manual optimization,
``anyorder[lightning]``), both imported on first use so the library needs neither."""

from anyorder.core.fresh import (
    FreshHeadWarning,
    mark_fresh,
    mark_fresh_from_loading_info,
    mark_task_aligned,
)
from anyorder.integrations.heads import (
    CosineHead,
    PooledClassifier,
    embed_texts,
    label_text_head,
    label_texts,
    linear_probe_head,
    pool,
    prototype_head,
    zero_shot_accuracy,
)
from anyorder.integrations.loading import from_pretrained
from anyorder.integrations.lora import add_lora, trainable_parameters
from anyorder.integrations.mezo import KeepBest, eval_mode, eval_mode_closure
from anyorder.integrations.prompts import PromptClassifier, encode_prompts, label_token_ids

__all__ = [
    "ClosureOptimizationCheck",
    "ClosureTrainer",
    "CosineHead",
    "FreshHeadWarning",
    "KeepBest",
    "PooledClassifier",
    "PromptClassifier",
    "add_lora",
    "closure_step",
    "embed_texts",
    "encode_prompts",
    "eval_mode",
    "eval_mode_closure",
    "from_pretrained",
    "label_text_head",
    "label_texts",
    "label_token_ids",
    "linear_probe_head",
    "mark_fresh",
    "mark_fresh_from_loading_info",
    "mark_task_aligned",
    "pool",
    "prototype_head",
    "trainable_parameters",
    "zero_shot_accuracy",
]


def __getattr__(name: str):
    # Optional extras, imported on first use (the library requires neither).
    if name == "ClosureTrainer":
        from anyorder.integrations.hf_trainer import ClosureTrainer

        return ClosureTrainer
    if name in ("closure_step", "ClosureOptimizationCheck"):
        from anyorder.integrations import lightning

        return getattr(lightning, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
