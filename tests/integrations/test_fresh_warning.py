"""A zeroth-order optimizer warns when it is asked to train freshly initialised parameters."""

import warnings

import pytest
import torch
from torch import nn

from anyorder.core.fresh import fresh_names
from anyorder.integrations import (
    FreshHeadWarning,
    mark_fresh,
    mark_fresh_from_loading_info,
    mark_task_aligned,
)
from anyorder.optim import ZOSGD, HybridZO, ZOAdam


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.body = nn.Linear(4, 3)
        self.head = nn.Linear(3, 2)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g))

    def forward(self, x):
        return self.head(torch.tanh(self.body(x)))


def closure_for(model):
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1, 1, 0, 1])

    def closure(backward=True):
        loss = nn.functional.cross_entropy(model(x), y)
        if backward:
            model.zero_grad()
            loss.backward()
        return loss

    return closure


@pytest.mark.parametrize("cls", [ZOSGD, ZOAdam])
def test_fresh_head_warns_once_naming_it_and_the_remedy(cls):
    model = Net()
    mark_fresh(model.head, prefix="head.")
    opt = cls(model.parameters(), lr=1e-3)
    with pytest.warns(FreshHeadWarning, match=r"head\.weight, head\.bias.*label_text_head"):
        opt.step(closure_for(model))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step(closure_for(model))  # once per optimizer


def test_no_warning_without_evidence_nor_after_mark_task_aligned_nor_when_frozen():
    model = Net()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ZOSGD(model.parameters(), lr=1e-3).step(closure_for(model))
        mark_fresh(model.head)
        mark_task_aligned(model.head)
        assert fresh_names(model.parameters()) == []
        ZOSGD(model.parameters(), lr=1e-3).step(closure_for(model))
        mark_fresh(model.head)
        model.head.requires_grad_(False)  # frozen: never perturbed, nothing to warn about
        ZOSGD(model.parameters(), lr=1e-3).step(closure_for(model))


def test_hybrid_warns_only_for_a_fresh_head_trained_by_zeroth_order():
    model = Net()
    mark_fresh(model.head, prefix="head.")
    groups = [{"params": model.body.parameters()}, {"params": model.head.parameters(), "order": 1}]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        HybridZO(groups, lr=1e-3).step(closure_for(model))  # exact gradient on the fresh head
    swapped = [{"params": model.body.parameters(), "order": 1}, {"params": model.head.parameters()}]
    with pytest.warns(FreshHeadWarning):
        HybridZO(swapped, lr=1e-3).step(closure_for(model))


def test_bad_targets_are_refused():
    with pytest.raises(TypeError, match="parameters"):
        mark_fresh([1.0, 2.0])
    with pytest.raises(TypeError, match="missing_keys"):
        mark_fresh_from_loading_info(Net(), {"unexpected_keys": []})


def test_transformers_missing_keys_mark_exactly_the_new_classifier(tmp_path):
    transformers = pytest.importorskip("transformers")
    from anyorder.integrations import from_pretrained

    config = transformers.BertConfig(
        vocab_size=30, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=16, max_position_embeddings=16,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.BertModel(config).save_pretrained(tmp_path)  # a base checkpoint: no classifier
    model = from_pretrained(transformers.BertForSequenceClassification, str(tmp_path), num_labels=2)
    assert model.anyorder_fresh == ["classifier.bias", "classifier.weight"]
    assert fresh_names(model.parameters()) == ["classifier.weight", "classifier.bias"]
    ids = torch.tensor([[2, 5, 7, 3], [2, 6, 3, 0]])
    labels = torch.tensor([0, 1])

    def closure(backward=False):
        return model(input_ids=ids, labels=labels).loss

    with pytest.warns(FreshHeadWarning, match="classifier.weight"):
        ZOSGD(model.parameters(), lr=1e-3).step(closure)
    # Loading the whole classifier back: nothing is missing, nothing is flagged.
    model.save_pretrained(tmp_path / "full")
    again = from_pretrained(transformers.BertForSequenceClassification, str(tmp_path / "full"))
    assert again.anyorder_fresh == [] and fresh_names(again.parameters()) == []
