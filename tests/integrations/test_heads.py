"""Task-aligned heads for encoders: each checked against a direct computation written here."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from anyorder.integrations import (
    CosineHead,
    PooledClassifier,
    embed_texts,
    label_text_head,
    label_texts,
    linear_probe_head,
    prototype_head,
    zero_shot_accuracy,
)

TEXTS = [
    "the movie was great",
    "boring plot and bad acting",
    "fun",
    "this is not a very good film of the story",
    "bad",
    "great acting and a fun story",
    "the plot is boring",
    "a very good film",
]
LABELS = torch.tensor([1, 0, 1, 0, 0, 1, 0, 1])
TEMPLATES = ["it was {} .", "a {} movie", "the film is {}"]


def _embed_alone(encoder, tok, text):
    """One text, unpadded, no special handling: the mean of its token states."""
    ids = torch.tensor([tok(text)["input_ids"]])
    return encoder(input_ids=ids).last_hidden_state[0].mean(0)


def test_label_text_head_zero_shot_accuracy_equals_direct_cosines(bert_tokenizer, build):
    tok = bert_tokenizer
    encoder = build["encoder"](len(tok), seed=3)
    groups = label_texts(["terrible", "great"], TEMPLATES)
    assert groups[1][0] == "it was great ."
    head = label_text_head(encoder, tok, groups, scale=10.0)
    with torch.no_grad():
        rows = torch.stack(
            [torch.stack([F.normalize(_embed_alone(encoder, tok, t), dim=0) for t in g]).mean(0)
             for g in groups]
        )
        x = torch.stack([_embed_alone(encoder, tok, t) for t in TEXTS])
        cos = F.normalize(x, dim=1) @ F.normalize(rows, dim=1).T
    torch.testing.assert_close(head.weight.detach(), rows, atol=1e-5, rtol=1e-5)
    clf = PooledClassifier(encoder, head).train()
    enc = tok(TEXTS, padding=True, return_tensors="pt")
    acc = zero_shot_accuracy(clf, enc["input_ids"], enc["attention_mask"], LABELS, batch_size=3)
    assert clf.training  # mode restored
    assert acc == float((cos.argmax(1) == LABELS).double().mean())
    with torch.no_grad():
        torch.testing.assert_close(clf(**enc), 10.0 * cos, atol=1e-4, rtol=1e-4)
    # The features the heads are built from are the classifier's own.
    with torch.no_grad():
        torch.testing.assert_close(embed_texts(encoder, tok, TEXTS, batch_size=3), x, atol=1e-5, rtol=1e-5)


def test_prototype_head_rows_are_the_class_means():
    gen = torch.Generator().manual_seed(0)
    feats = torch.randn(30, 5, generator=gen)
    labels = torch.arange(30) % 3
    means = torch.stack([feats[labels == c].mean(0) for c in range(3)])
    cos = prototype_head(feats, labels)
    assert isinstance(cos, CosineHead)
    torch.testing.assert_close(cos.weight.detach(), means, atol=1e-6, rtol=1e-6)
    euc = prototype_head(feats, labels, metric="euclidean")
    with torch.no_grad():
        logits = euc(feats)
    dist = torch.cdist(feats.double(), means.double()) ** 2  # nearest prototype, directly
    torch.testing.assert_close(logits.double() - logits.double()[:, :1], -(dist - dist[:, :1]), atol=1e-4, rtol=1e-4)
    assert torch.equal(logits.argmax(1), dist.argmin(1))


def test_linear_probe_is_the_ridge_solution():
    gen = torch.Generator().manual_seed(1)
    n, d, k, l2 = 40, 6, 3, 0.05
    feats = torch.randn(n, d, generator=gen) + 2.0
    labels = torch.randint(0, k, (n,), generator=gen)
    head = linear_probe_head(feats, labels, l2=l2)
    # Augmented least squares: [X 1; sqrt(l2 n) I 0] [W^T; b] ~ [Y; 0] (bias unpenalised).
    x = feats.double()
    a = torch.cat([torch.cat([x, torch.ones(n, 1, dtype=torch.float64)], 1),
                   torch.cat([(l2 * n) ** 0.5 * torch.eye(d, dtype=torch.float64),
                              torch.zeros(d, 1, dtype=torch.float64)], 1)])
    y = torch.cat([F.one_hot(labels, k).double(), torch.zeros(d, k, dtype=torch.float64)])
    sol = torch.linalg.lstsq(a, y, driver="gelsd").solution
    torch.testing.assert_close(head.weight.detach().double(), sol[:d].T, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(head.bias.detach().double(), sol[d], atol=1e-6, rtol=1e-5)
    again = linear_probe_head(feats, labels, l2=l2)  # deterministic
    assert torch.equal(again.weight, head.weight) and torch.equal(again.bias, head.bias)


def test_bad_input_is_refused():
    feats = torch.zeros(4, 3)
    with pytest.raises(ValueError, match=r"no labelled example for classes \[2\]"):
        prototype_head(feats, torch.tensor([0, 1, 0, 1]), num_classes=3)
    with pytest.raises(ValueError, match="l2 must be"):
        linear_probe_head(feats, torch.tensor([0, 1, 0, 1]), l2=0.0)
    with pytest.raises(TypeError, match="integer class indices"):
        linear_probe_head(feats, torch.tensor([0.0, 1.0, 0.0, 1.0]))
    with pytest.raises(ValueError, match="metric must be"):
        prototype_head(feats, torch.tensor([0, 1, 0, 1]), metric="manhattan")
    with pytest.raises(ValueError, match="non-finite"):
        CosineHead(torch.tensor([[float("nan")], [1.0]]))
    with pytest.raises(ValueError, match=r"'\{\}'"):
        label_texts(["bad", "good"], ["it was"])
