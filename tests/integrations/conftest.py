"""Tiny tokenizers and randomly initialised transformers built offline for the integration tests."""

from __future__ import annotations

import pytest
import torch

WORDS = (
    "it was great terrible good bad movie the a film plot acting is boring fun and not very "
    "story of this ."
).split()


def word_tokenizer(*, specials: str = "bert"):
    """A word-level fast tokenizer over WORDS (built in memory, no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = {w: i for i, w in enumerate(special + list(WORDS))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    kwargs = {"unk_token": "[UNK]", "pad_token": "[PAD]"}
    if specials == "bert":
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
        )
        kwargs.update(cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    return PreTrainedTokenizerFast(tokenizer_object=tok, **kwargs)


@pytest.fixture(scope="module")
def bert_tokenizer():
    return word_tokenizer(specials="bert")


@pytest.fixture(scope="module")
def plain_tokenizer():
    return word_tokenizer(specials="none")


def tiny_masked_lm(kind: str, vocab_size: int, seed: int = 0):
    from transformers import BertConfig, BertForMaskedLM, RobertaConfig, RobertaForMaskedLM

    common = dict(
        vocab_size=vocab_size,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        pad_token_id=0,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if kind == "bert":
            return BertForMaskedLM(BertConfig(max_position_embeddings=64, **common)).eval()
        return RobertaForMaskedLM(RobertaConfig(max_position_embeddings=66, **common)).eval()


def tiny_gpt2(vocab_size: int, seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        vocab_size=vocab_size, n_positions=64, n_embd=16, n_layer=2, n_head=2,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, pad_token_id=0, bos_token_id=2, eos_token_id=3,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return GPT2LMHeadModel(cfg).eval()


def tiny_encoder(vocab_size: int, seed: int = 0):
    from transformers import BertConfig, BertModel

    cfg = BertConfig(
        vocab_size=vocab_size, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=64, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, pad_token_id=0,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return BertModel(cfg, add_pooling_layer=False).eval()


@pytest.fixture(scope="module")
def build():
    """The builders above, for tests that need several models (conftest is not importable)."""
    return {"masked_lm": tiny_masked_lm, "gpt2": tiny_gpt2, "encoder": tiny_encoder}
