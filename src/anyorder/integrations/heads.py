"""Task-aligned classification heads for sentence encoders that ship without an LM head.

MeZO (Malladi et al. 2023, Table 5) shows zeroth-order fine-tuning works only from a start that
already solves the task a little; for a masked or causal LM that start is a prompt
(:mod:`anyorder.integrations.prompts`). An encoder such as all-MiniLM-L6-v2 has no LM head, so
the start is a head built from the encoder's own embeddings, without any training step:

* :func:`label_text_head`: a cosine head whose rows are embedded label texts ("It was great." /
  "It was terrible."), averaged over templates (the zero-shot classifier of sentence embeddings);
* :func:`prototype_head`: rows = the mean embedding of each class's labelled examples
  (prototypical networks, Snell et al. 2017);
* :func:`linear_probe_head`: ridge regression of one-hot labels on frozen features, solved in
  closed form in float64 (MeZO's Table 19 compares such a linear-probing start).

:func:`zero_shot_accuracy` scores any of them (or a :class:`~anyorder.integrations.prompts.PromptClassifier`)
before the first step. Nothing here draws random numbers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "CosineHead",
    "PooledClassifier",
    "embed_texts",
    "label_text_head",
    "label_texts",
    "linear_probe_head",
    "pool",
    "prototype_head",
    "zero_shot_accuracy",
]

Pooling = Literal["mean", "cls"]


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: Pooling = "mean") -> torch.Tensor:
    """Sentence embedding from token states: mean over non-padding tokens, or the first token."""
    if pooling == "cls":
        return hidden[:, 0]
    if pooling != "mean":
        raise ValueError(f"pooling must be 'mean' or 'cls', got {pooling!r}")
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)


class PooledClassifier(nn.Module):
    """``head(pool(encoder(input_ids, attention_mask)))``: a Hugging Face encoder plus a head.

    ``embed`` returns the pooled features the heads below are built from, so a head fitted on
    :func:`embed_texts` output sees the same features in training.
    """

    def __init__(self, encoder: nn.Module, head: nn.Module, *, pooling: Pooling = "mean") -> None:
        super().__init__()
        if pooling not in ("mean", "cls"):
            raise ValueError(f"pooling must be 'mean' or 'cls', got {pooling!r}")
        self.encoder = encoder
        self.head = head
        self.pooling = pooling

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return pool(hidden, attention_mask, self.pooling)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(input_ids, attention_mask))


def _chunks(n: int, attention_mask: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    order = torch.argsort(attention_mask.sum(1), stable=True)  # similar lengths per chunk
    return [order[i : i + batch_size] for i in range(0, n, batch_size)]


def _trimmed(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop the columns that are padding in every row (left or right); same logits up to rounding."""
    keep = mask.bool().any(0)
    if bool(keep.all()):
        return ids, mask
    return ids[:, keep], mask[:, keep]


@torch.no_grad()
def _map_batches(
    fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    module: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    batch_size: int,
) -> torch.Tensor:
    if input_ids.shape != attention_mask.shape or input_ids.dim() != 2:
        raise ValueError(
            f"input_ids {tuple(input_ids.shape)} and attention_mask {tuple(attention_mask.shape)} "
            "must both be [batch, length]"
        )
    device = next(iter(module.parameters())).device
    was_training = module.training
    module.eval()
    try:
        parts: list[tuple[torch.Tensor, torch.Tensor]] = []
        for idx in _chunks(len(input_ids), attention_mask, batch_size):
            ids, mask = _trimmed(input_ids[idx], attention_mask[idx])
            parts.append((idx, fn(ids.to(device), mask.to(device)).float().cpu()))
    finally:
        module.train(was_training)
    out = torch.empty(len(input_ids), *parts[0][1].shape[1:])
    for idx, value in parts:
        out[idx] = value
    return out


def embed_texts(
    encoder: nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    *,
    pooling: Pooling = "mean",
    max_length: int = 128,
    batch_size: int = 64,
) -> torch.Tensor:
    """Pooled float32 embeddings ``[len(texts), hidden]`` (CPU) in eval mode, without gradients.

    The same features :meth:`PooledClassifier.embed` computes (mean pooling by default, as
    sentence-transformers' all-MiniLM-L6-v2; unnormalised).
    """
    if isinstance(texts, str) or len(texts) == 0:
        raise TypeError("texts must be a non-empty sequence of strings")
    enc = tokenizer(
        list(texts), max_length=max_length, truncation=True, padding=True, return_tensors="pt"
    )
    model = PooledClassifier(encoder, nn.Identity(), pooling=pooling)
    return _map_batches(model.embed, encoder, enc["input_ids"], enc["attention_mask"], batch_size)


class CosineHead(nn.Module):
    """Logits ``scale * cos(x, w_c)``: features and rows normalised, then scaled.

    The rows are the trainable parameter; ``scale`` (an inverse temperature) is a fixed buffer so
    that cross-entropy on the logits is neither flat (scale 1 bounds logits to [-1, 1]) nor
    saturated. No bias.
    """

    def __init__(self, weight: torch.Tensor, scale: float = 20.0) -> None:
        super().__init__()
        if weight.dim() != 2 or weight.shape[0] < 2:
            raise ValueError(f"weight must be [num_classes >= 2, dim], got {tuple(weight.shape)}")
        if not bool(torch.isfinite(weight).all()):
            raise ValueError("weight has non-finite entries")
        if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
            raise ValueError(f"scale must be a positive finite number, got {scale!r}")
        self.weight = nn.Parameter(weight.detach().clone().float())
        self.register_buffer("scale", torch.tensor(float(scale)))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        w = F.normalize(self.weight, dim=-1)
        return self.scale * F.normalize(features, dim=-1) @ w.to(features.dtype).T


def label_texts(words: Sequence[str], templates: Sequence[str]) -> list[list[str]]:
    """``[[template.format(word) for template in templates] for word in words]``: one list per class."""
    if isinstance(words, str) or len(words) < 2:
        raise ValueError(f"words needs one entry per class (at least 2), got {words!r}")
    if isinstance(templates, str) or len(templates) == 0:
        raise ValueError(f"templates must be a non-empty sequence of strings, got {templates!r}")
    for t in templates:
        if "{}" not in t:
            raise ValueError(f"each template needs a '{{}}' for the word, got {t!r}")
    return [[t.replace("{}", w) for t in templates] for w in words]


def label_text_head(
    encoder: nn.Module,
    tokenizer: Any,
    texts_per_class: Sequence[Sequence[str]],
    *,
    scale: float = 20.0,
    pooling: Pooling = "mean",
    max_length: int = 128,
) -> CosineHead:
    """A :class:`CosineHead` whose row ``c`` is the mean of the normalised embeddings of class
    ``c``'s label texts (e.g. ``label_texts(["terrible", "great"], ["It was {}.", "A {} movie."])``).

    Zero-shot classification by similarity to embedded class descriptions, as used for sentence
    encoders; averaging over several templates (prompt ensembling, Radford et al. 2021, CLIP)
    reduces the dependence on one wording.
    """
    if isinstance(texts_per_class, str) or len(texts_per_class) < 2:
        raise ValueError("texts_per_class needs a list of label texts for each of >= 2 classes")
    rows = []
    for c, texts in enumerate(texts_per_class):
        if isinstance(texts, str) or len(texts) == 0:
            raise ValueError(f"class {c}: give a non-empty list of label texts, got {texts!r}")
        emb = embed_texts(encoder, tokenizer, list(texts), pooling=pooling, max_length=max_length)
        rows.append(F.normalize(emb, dim=-1).mean(0))
    return CosineHead(torch.stack(rows), scale=scale)


def _check_features(features: torch.Tensor, labels: torch.Tensor, num_classes: int | None) -> int:
    if not isinstance(features, torch.Tensor) or features.dim() != 2:
        raise TypeError("features must be a [n, dim] tensor")
    if not isinstance(labels, torch.Tensor) or labels.shape != (features.shape[0],):
        raise TypeError(f"labels must be a tensor of shape ({features.shape[0]},)")
    if labels.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise TypeError(f"labels must be integer class indices, got {labels.dtype}")
    if not bool(torch.isfinite(features).all()):
        raise ValueError("features have non-finite entries")
    k = int(labels.max()) + 1 if num_classes is None else int(num_classes)
    if k < 2 or int(labels.min()) < 0 or int(labels.max()) >= k:
        raise ValueError(f"labels must lie in [0, {k}) with num_classes >= 2")
    missing = sorted(set(range(k)) - set(labels.tolist()))
    if missing:
        raise ValueError(f"no labelled example for classes {missing}")
    return k


def prototype_head(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int | None = None,
    *,
    metric: Literal["cosine", "euclidean"] = "cosine",
    scale: float = 20.0,
) -> nn.Module:
    """A head from class prototypes, the mean feature vector of each class's examples.

    ``metric="cosine"``: a :class:`CosineHead` with the prototypes as rows. ``"euclidean"``:
    prototypical networks' ``-||x - p_c||^2`` (Snell et al. 2017) written as the linear layer
    ``2 p_c . x - ||p_c||^2`` (the ``||x||^2`` term is the same for every class).
    """
    k = _check_features(features, labels, num_classes)
    f = features.double()
    one_hot = F.one_hot(labels.long(), k).double()
    protos = (one_hot.T @ f) / one_hot.sum(0).unsqueeze(1)
    if metric == "cosine":
        return CosineHead(protos.float(), scale=scale)
    if metric != "euclidean":
        raise ValueError(f"metric must be 'cosine' or 'euclidean', got {metric!r}")
    head = nn.Linear(f.shape[1], k)
    with torch.no_grad():
        head.weight.copy_(2.0 * protos)
        head.bias.copy_(-(protos * protos).sum(1))
    return head


def linear_probe_head(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int | None = None,
    *,
    l2: float = 1e-3,
) -> nn.Linear:
    """A linear head fitted in closed form: ridge regression of one-hot labels on frozen features.

    Minimises ``||X W^T + b - Y||^2 + l2 * n * ||W||^2`` (bias unpenalised) exactly, in float64:
    the features are centred, ``W^T = (Xc^T Xc + l2 n I)^{-1} Xc^T Yc`` by a Cholesky solve, and
    ``b = mean(Y) - mean(X) W^T``. Deterministic (no random draws, no iterations). Departs from
    MeZO's linear probing (logistic regression by an iterative solver) for an exact, reproducible
    solution.
    """
    k = _check_features(features, labels, num_classes)
    if not (isinstance(l2, (int, float)) and math.isfinite(l2) and l2 > 0):
        raise ValueError(f"l2 must be a positive finite number, got {l2!r}")
    x = features.double()
    y = F.one_hot(labels.long(), k).double()
    n, d = x.shape
    x_mean, y_mean = x.mean(0), y.mean(0)
    xc, yc = x - x_mean, y - y_mean
    gram = xc.T @ xc + (l2 * n) * torch.eye(d, dtype=torch.float64)
    w_t = torch.cholesky_solve(xc.T @ yc, torch.linalg.cholesky(gram))
    head = nn.Linear(d, k)
    with torch.no_grad():
        head.weight.copy_(w_t.T)
        head.bias.copy_(y_mean - x_mean @ w_t)
    return head


def zero_shot_accuracy(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor,
    *,
    batch_size: int = 64,
) -> float:
    """Accuracy of ``model(input_ids, attention_mask).argmax(-1)`` against ``labels``.

    Runs in eval mode without gradients (the mode is restored), in chunks of similar length with
    all-padding columns dropped; works before any training step on a :class:`PooledClassifier`
    or a :class:`~anyorder.integrations.prompts.PromptClassifier`.
    """
    if not isinstance(labels, torch.Tensor) or labels.shape != (input_ids.shape[0],):
        raise TypeError(f"labels must be a tensor of shape ({input_ids.shape[0]},)")
    logits = _map_batches(model, model, input_ids, attention_mask, batch_size)
    return float((logits.argmax(-1) == labels.cpu()).double().mean())
