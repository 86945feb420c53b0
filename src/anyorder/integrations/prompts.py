"""Prompt-based classification with a language model's own head (a template and label words).

MeZO (Malladi et al. 2023, "Fine-Tuning Language Models with Just Forward Passes", Appendix E and
Table 5) trains with zeroth-order steps only from a task-aligned start: the input is wrapped in a
template ("<S1> It was [MASK] ." for masked LMs, "<S1> It was" for causal LMs) and the class logits
are the LM head's scores of one label word per class ("terrible" / "great") at the mask position or
at the next-token position after the prompt. Cross-entropy over those logits is the objective the
model was pretrained on, so the untrained classifier already has signal.

Departures from MeZO's reference code (LM-BFF's data pipeline): one text per example (no sentence
pairs), the template is a string with ``{text}`` and ``{mask}`` placeholders, and when a prompt is
too long the text (never the template) is cut at a token boundary.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import nn

__all__ = ["PromptClassifier", "encode_prompts", "label_token_ids"]

TEXT = "{text}"
MASK = "{mask}"


def _check_template(template: str) -> None:
    if not isinstance(template, str) or template.count(TEXT) != 1:
        raise ValueError(f"template must contain {TEXT!r} exactly once, got {template!r}")
    if template.count(MASK) > 1:
        raise ValueError(f"template may contain {MASK!r} at most once, got {template!r}")


def _fill(template: str, text: str, mask_token: str | None) -> str:
    # str.replace, not str.format: review texts may contain braces.
    if MASK in template:
        if mask_token is None:
            raise ValueError(
                f"template {template!r} has {MASK} but the tokenizer has no mask token; "
                "causal-LM templates end where the label word would follow (no {mask})"
            )
        template = template.replace(MASK, mask_token)
    return template.replace(TEXT, text)


def _encode_one(tokenizer: Any, template: str, text: str, max_length: int | None) -> list[int]:
    mask_token = getattr(tokenizer, "mask_token", None)
    ids = tokenizer(_fill(template, text, mask_token))["input_ids"]
    if max_length is None or len(ids) <= max_length:
        return list(ids)
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError("truncating prompts needs a fast tokenizer (offset mappings)")
    pieces = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    offsets = pieces["offset_mapping"]
    keep = len(offsets) - (len(ids) - max_length)
    while keep > 0:  # cut the text at a token boundary; retry if tokens merge across the cut
        ids = tokenizer(_fill(template, text[: offsets[keep - 1][1]], mask_token))["input_ids"]
        if len(ids) <= max_length:
            return list(ids)
        keep -= 1
    ids = tokenizer(_fill(template, "", mask_token))["input_ids"]
    if len(ids) > max_length:
        raise ValueError(
            f"max_length={max_length} is shorter than the template alone ({len(ids)} tokens)"
        )
    return list(ids)


def encode_prompts(
    tokenizer: Any,
    texts: Sequence[str],
    template: str,
    *,
    max_length: int | None = None,
    padding_side: Literal["left", "right"] | None = None,
) -> dict[str, torch.Tensor]:
    """Wrap each text in ``template`` and tokenise: ``{"input_ids", "attention_mask"}`` tensors.

    ``template`` holds ``{text}`` once and, for masked LMs, ``{mask}`` once (replaced by the
    tokenizer's mask token), e.g. ``"{text} It was {mask} ."``; for causal LMs it ends where the
    label word would follow, e.g. ``"{text} It was"``. Special tokens are added as the tokenizer
    does for one sequence. When a prompt exceeds ``max_length`` tokens the text is cut at a token
    boundary so that the template, and with it the mask, survives (MeZO / LM-BFF truncate the
    sentence, not the template). Rows are padded with the tokenizer's pad token on
    ``padding_side`` (default: the tokenizer's own); :class:`PromptClassifier` reads either side.
    """
    if isinstance(texts, str) or not isinstance(texts, Sequence) or len(texts) == 0:
        raise TypeError("texts must be a non-empty sequence of strings")
    _check_template(template)
    if max_length is not None and (not isinstance(max_length, int) or max_length < 1):
        raise ValueError(f"max_length must be a positive int or None, got {max_length!r}")
    side = padding_side or getattr(tokenizer, "padding_side", "right")
    if side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    pad = tokenizer.pad_token_id
    if pad is None:
        raise ValueError("the tokenizer has no pad token; set tokenizer.pad_token first")
    rows = [_encode_one(tokenizer, template, str(t), max_length) for t in texts]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), int(pad), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        cols = slice(0, len(row)) if side == "right" else slice(width - len(row), width)
        ids[i, cols] = torch.tensor(row, dtype=torch.long)
        mask[i, cols] = 1
    return {"input_ids": ids, "attention_mask": mask}


def label_token_ids(tokenizer: Any, label_words: Sequence[str], *, space_prefix: bool = True) -> list[int]:
    """The first token of each label word as it appears after a space in running text.

    MeZO scores one token per class (RoBERTa's ``Ġgreat``, OPT's ``Ġgreat``); a word that the
    tokenizer splits is represented by its first token, as in MeZO. ``ValueError`` when two
    classes share that token.
    """
    if isinstance(label_words, str) or len(label_words) < 2:
        raise ValueError(f"label_words needs one word per class (at least 2), got {label_words!r}")
    ids = []
    for word in label_words:
        if not isinstance(word, str) or not word.strip():
            raise ValueError(f"label words must be non-empty strings, got {word!r}")
        toks = tokenizer((" " + word) if space_prefix else word, add_special_tokens=False)
        toks = toks["input_ids"]
        if not toks:
            raise ValueError(f"label word {word!r} tokenises to nothing")
        ids.append(int(toks[0]))
    if len(set(ids)) != len(ids):
        raise ValueError(f"label words {list(label_words)} share a first token: {ids}")
    return ids


def _kind_of(model: nn.Module) -> str:
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    name = type(model).__name__
    if name in set(MODEL_FOR_MASKED_LM_MAPPING_NAMES.values()):
        return "masked"
    if name in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()):
        return "causal"
    raise ValueError(f"cannot tell whether {name} is a masked or a causal LM; pass kind=")


class PromptClassifier(nn.Module):
    """Class logits = the LM head's logits of the label words at the prompt's answer position.

    MeZO's prompt-based fine-tuning (Malladi et al. 2023; LM-BFF's formulation, Gao et al. 2021):
    for a masked LM (``kind="masked"``) the position is the mask token's (exactly one per row);
    rows must be right-padded. For a causal LM (``kind="causal"``) it is the last non-padding
    token, left or right padding alike (position ids are taken from the attention mask where the model accepts them, so a
    left-padded row scores as it would alone). ``forward(input_ids, attention_mask)`` returns
    ``[batch, num_classes]`` logits; train with cross-entropy on them. Every parameter of ``model``
    stays trainable; the wrapper adds none.

    Departure: the full LM head runs at every position (as the Hugging Face model computes it),
    except for causal LMs on left-padded batches, where only the last position is computed
    (``logits_to_keep=1``) when the model supports it.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        label_words: Sequence[str],
        *,
        kind: Literal["auto", "masked", "causal"] = "auto",
        space_prefix: bool = True,
    ) -> None:
        super().__init__()
        if kind not in ("auto", "masked", "causal"):
            raise ValueError(f"kind must be 'auto', 'masked' or 'causal', got {kind!r}")
        self.model = model
        self.kind = _kind_of(model) if kind == "auto" else kind
        self.label_words = tuple(label_words)
        ids = label_token_ids(tokenizer, label_words, space_prefix=space_prefix)
        vocab = model.get_output_embeddings().weight.shape[0]
        if max(ids) >= vocab:
            raise ValueError(f"label token ids {ids} outside the LM head's {vocab} outputs")
        self.register_buffer("label_ids", torch.tensor(ids, dtype=torch.long), persistent=False)
        self.label_tokens = tuple(tokenizer.convert_ids_to_tokens(ids))
        self.mask_token_id: int | None = None
        if self.kind == "masked":
            if getattr(tokenizer, "mask_token_id", None) is None:
                raise ValueError("a masked-LM prompt needs a tokenizer with a mask token")
            self.mask_token_id = int(tokenizer.mask_token_id)
        params = inspect.signature(model.forward).parameters
        self._position_ids = "position_ids" in params
        self._logits_to_keep = "logits_to_keep" in params

    @property
    def num_classes(self) -> int:
        return int(self.label_ids.numel())

    def answer_positions(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The index in each row whose LM logits are read (mask token / last real token)."""
        if self.kind == "masked":
            hit = input_ids == self.mask_token_id
            if not bool((hit.sum(1) == 1).all()):
                raise ValueError("every row needs exactly one mask token (see encode_prompts)")
            return hit.int().argmax(1)
        if attention_mask is None:
            return torch.full_like(input_ids[:, 0], input_ids.shape[1] - 1)
        cols = torch.arange(input_ids.shape[1], device=input_ids.device)
        return (attention_mask.to(torch.long) * cols).argmax(1)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, length], got {tuple(input_ids.shape)}")
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)
        if self.kind == "masked":
            if attention_mask is not None and not bool(attention_mask[:, 0].all()):
                raise ValueError(
                    "masked LMs take right-padded batches (left padding shifts BERT's absolute "
                    "positions): encode_prompts(..., padding_side='right')"
                )
            pos = self.answer_positions(input_ids, attention_mask)
            logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits
            return logits[rows, pos][:, self.label_ids]
        kwargs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask}
        if attention_mask is not None and self._position_ids:
            kwargs["position_ids"] = (attention_mask.to(torch.long).cumsum(-1) - 1).clamp_min(0)
        left_padded = attention_mask is None or bool(attention_mask[:, -1].all())
        if left_padded and self._logits_to_keep:
            logits = self.model(**kwargs, logits_to_keep=1).logits
            return logits[:, -1][:, self.label_ids]
        pos = self.answer_positions(input_ids, attention_mask)
        logits = self.model(**kwargs).logits
        return logits[rows, pos][:, self.label_ids]
