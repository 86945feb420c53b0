"""Prompt-based classification: the class logits are the LM head's logits of the label words."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from anyorder.integrations import (
    PromptClassifier,
    encode_prompts,
    label_token_ids,
    zero_shot_accuracy,
)

TEXTS = [
    "the movie was great",
    "boring plot and bad acting",
    "fun",
    "this is not a very good film of the story",
    "bad",
]
LABELS = torch.tensor([1, 0, 1, 0, 0])
WORDS = ("terrible", "great")


def _direct_mlm(model, tok, template, texts):
    """Each prompt alone, unpadded; the logits read at the mask token's index found by hand."""
    out = []
    for text in texts:
        ids = tok(template.replace("{text}", text).replace("{mask}", tok.mask_token))["input_ids"]
        pos = ids.index(tok.mask_token_id)
        logits = model(input_ids=torch.tensor([ids])).logits[0, pos]
        out.append(logits[[tok.convert_tokens_to_ids(w) for w in WORDS]])
    return torch.stack(out)


def test_encode_prompts_fills_template_and_truncates_the_text_only(bert_tokenizer):
    tok = bert_tokenizer
    enc = encode_prompts(tok, TEXTS, "{text} it was {mask} .", padding_side="right")
    assert ((enc["input_ids"] == tok.mask_token_id).sum(1) == 1).all()
    first = tok.convert_ids_to_tokens(enc["input_ids"][0][enc["attention_mask"][0].bool()])
    assert first == ["[CLS]", "the", "movie", "was", "great", "it", "was", "[MASK]", ".", "[SEP]"]
    cut = encode_prompts(tok, TEXTS, "{text} it was {mask} .", max_length=8)
    assert cut["input_ids"].shape[1] == 8
    row = tok.convert_ids_to_tokens(cut["input_ids"][3])  # the long text: 3 words kept
    assert row == ["[CLS]", "this", "is", "it", "was", "[MASK]", ".", "[SEP]"]
    left = encode_prompts(tok, TEXTS, "{text} it was {mask} .", padding_side="left")
    assert left["attention_mask"][:, -1].all() and not left["attention_mask"][:, 0].all()
    with pytest.raises(ValueError, match="shorter than the template"):
        encode_prompts(tok, TEXTS, "{text} it was {mask} .", max_length=4)
    with pytest.raises(ValueError, match="exactly once"):
        encode_prompts(tok, TEXTS, "it was {mask} .")


@pytest.mark.parametrize("arch", ["bert", "roberta"])
def test_masked_lm_class_logits_are_the_label_words_lm_logits(bert_tokenizer, build, arch):
    tok = bert_tokenizer
    model = build["masked_lm"](arch, len(tok))
    clf = PromptClassifier(model, tok, WORDS)
    assert clf.kind == "masked" and clf.label_tokens == WORDS
    template = "{text} it was {mask} ."
    enc = encode_prompts(tok, TEXTS, template, padding_side="right")
    with torch.no_grad():
        got = clf(enc["input_ids"], enc["attention_mask"])
        # Same batch, read by hand: exactly the LM head's numbers.
        full = model(**enc).logits
        rows = [list(r).index(tok.mask_token_id) for r in enc["input_ids"].tolist()]
        want = torch.stack([full[i, p, clf.label_ids] for i, p in enumerate(rows)])
        alone = _direct_mlm(model, tok, template, TEXTS)
    assert got.shape == (len(TEXTS), 2)
    assert torch.equal(got, want)
    # Each prompt scored alone, unpadded: equal up to rounding (padding is masked out).
    torch.testing.assert_close(got, alone, atol=1e-5, rtol=1e-5)
    acc = zero_shot_accuracy(clf, enc["input_ids"], enc["attention_mask"], LABELS, batch_size=2)
    assert acc == float((alone.argmax(-1) == LABELS).double().mean())
    left = encode_prompts(tok, TEXTS, template, padding_side="left")
    with pytest.raises(ValueError, match="right-padded"):
        clf(left["input_ids"], left["attention_mask"])


@pytest.mark.parametrize("side", ["right", "left"])
def test_causal_lm_class_logits_are_the_next_token_logits(plain_tokenizer, build, side):
    tok = plain_tokenizer
    model = build["gpt2"](len(tok))
    clf = PromptClassifier(model, tok, WORDS)
    assert clf.kind == "causal"
    template = "{text} . it was"
    enc = encode_prompts(tok, TEXTS, template, padding_side=side)
    assert not enc["attention_mask"].all()  # the batch really is padded
    want = []
    with torch.no_grad():
        got = clf(enc["input_ids"], enc["attention_mask"])
        for text in TEXTS:  # each prompt alone: the logits after its last token
            ids = tok(template.replace("{text}", text))["input_ids"]
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
            want.append(logits[[tok.convert_tokens_to_ids(w) for w in WORDS]])
    torch.testing.assert_close(got, torch.stack(want), atol=1e-5, rtol=1e-5)
    # A fully real batch (no padding) is read at the last column (only it is computed).
    one = encode_prompts(tok, TEXTS[:1], template)
    with torch.no_grad():
        last = model(**one).logits[:, -1][:, clf.label_ids]
        torch.testing.assert_close(clf(**one), last, rtol=0, atol=1e-6)
    acc = zero_shot_accuracy(clf, enc["input_ids"], enc["attention_mask"], LABELS, batch_size=2)
    assert acc == float((torch.stack(want).argmax(-1) == LABELS).double().mean())


def test_gradients_reach_the_language_model(bert_tokenizer, build):
    tok = bert_tokenizer
    model = build["masked_lm"]("bert", len(tok))
    clf = PromptClassifier(model, tok, WORDS)
    enc = encode_prompts(tok, TEXTS, "{text} it was {mask} .")
    F.cross_entropy(clf(enc["input_ids"], enc["attention_mask"]), LABELS).backward()
    emb = model.get_input_embeddings().weight.grad
    assert emb is not None and emb.abs().sum() > 0
    assert list(clf.parameters()) == list(model.parameters())  # the wrapper adds nothing


def test_bad_input_is_refused(bert_tokenizer, plain_tokenizer, build):
    tok = bert_tokenizer
    model = build["masked_lm"]("bert", len(tok))
    with pytest.raises(ValueError, match="share a first token"):
        label_token_ids(tok, ["great", "great"])
    with pytest.raises(ValueError, match="one word per class"):
        PromptClassifier(model, tok, ["great"])
    with pytest.raises(ValueError, match="kind must be"):
        PromptClassifier(model, tok, WORDS, kind="seq2seq")
    clf = PromptClassifier(model, tok, WORDS)
    no_mask = encode_prompts(tok, TEXTS, "{text} it was great .")
    with pytest.raises(ValueError, match="exactly one mask token"):
        clf(no_mask["input_ids"], no_mask["attention_mask"])
    with pytest.raises(ValueError, match="no mask token"):
        encode_prompts(plain_tokenizer, TEXTS, "{text} it was {mask}")
