"""Zeroth-order training of a parameter subset and of LoRA adapters; MeZO's evaluation policy."""

import copy

import pytest
import torch
from torch import nn

from anyorder.core.rng import direction
from anyorder.integrations import (
    CosineHead,
    KeepBest,
    PooledClassifier,
    eval_mode,
    eval_mode_closure,
)
from anyorder.optim import ZOSGD

pytest.importorskip("transformers")


def _classifier(build):
    encoder = build["encoder"](30)
    g = torch.Generator().manual_seed(5)
    return PooledClassifier(encoder, CosineHead(torch.randn(2, 16, generator=g))).train()


def _batch():
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(5, 30, (6, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[:2, 5:] = 0
    return ids, mask, torch.tensor([0, 1, 1, 0, 1, 0])


def _closure(model, batch):
    ids, mask, y = batch

    def closure(backward=False):
        return nn.functional.cross_entropy(model(ids, mask), y)

    return closure


def test_zo_on_a_parameter_subset_moves_only_it_along_its_own_directions(build):
    model = _classifier(build).double()
    names = [n for n, _ in model.named_parameters()]
    train = {n for n in names if n.startswith("encoder.encoder.layer.1.attention") or n == "head.weight"}
    for n, p in model.named_parameters():
        p.requires_grad_(n in train)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = ZOSGD(model.parameters(), lr=0.05, mu=1e-3, seed=4)
    opt.step(_closure(model, _batch()))
    g = opt.last_sample.projected[0]
    for index, (n, p) in enumerate(model.named_parameters()):
        if n in train:  # w - lr g z, z keyed by the tensor's position among all parameters
            z = direction(p.shape, 4, 0, 0, index, distribution="rademacher", dtype=torch.float64)
            assert torch.allclose(p, before[n] - 0.05 * g * z, rtol=0, atol=1e-12), n
        else:
            assert torch.equal(p, before[n]), n


def test_lora_zo_updates_only_the_adapters_and_the_head(build):
    pytest.importorskip("peft")
    from anyorder.integrations import add_lora

    model = _classifier(build)
    batch = _batch()
    with torch.no_grad():
        reference = model(*batch[:2])
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    rng_before = torch.get_rng_state()
    params = add_lora(model, target_modules=["query", "value"], r=4, also_train=["head"], seed=1)
    assert torch.equal(torch.get_rng_state(), rng_before)  # the global RNG is not ours to move
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    adapters = {n for n in names if "lora_" in n}
    assert names == adapters | {"head.weight"} and len(adapters) == 2 * 2 * 2  # 2 layers, q/v, A/B
    assert len(params) == len(names)
    with torch.no_grad():  # B = 0: the adapted model computes what the model did
        assert torch.allclose(model(*batch[:2]), reference, atol=1e-6)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = ZOSGD(params, lr=0.05, mu=1e-2, seed=0)
    for _ in range(3):
        opt.step(_closure(model, batch))
    for n, p in model.named_parameters():
        if n in names:
            assert not torch.equal(p, start[n]), n
        else:
            assert torch.equal(p, start[n]), n  # every frozen weight bit-identical
            assert torch.equal(p, base[n.replace(".base_layer", "")]), n
    # Reproducible: the same seed draws the same A.
    again = _classifier(build)
    add_lora(again, target_modules=["query", "value"], r=4, also_train=["head"], seed=1)
    for n, a in again.named_parameters():
        if "lora_A" in n:
            assert torch.equal(a, start[n])
    with pytest.raises(ValueError, match="also_train"):
        add_lora(_classifier(build), target_modules=["query"], also_train=["nothing"])
    with pytest.raises(ValueError, match="target_modules"):
        add_lora(_classifier(build), target_modules="query")


def test_eval_mode_restores_each_submodules_mode_and_removes_dropout():
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5), nn.Linear(4, 1))
    model.train()
    model[2].eval()  # mixed modes come back as they were
    x = torch.ones(3, 4)
    with eval_mode(model):
        assert not any(m.training for m in model.modules())
        expected = model(x)
    assert model.training and model[1].training and not model[2].training
    closure = eval_mode_closure(model, lambda backward=False: model(x).sum())
    assert float(closure(backward=False).detach()) == pytest.approx(float(expected.sum().detach()))
    assert model.training and closure.model is model
    with pytest.raises(RuntimeError), eval_mode(model):
        raise RuntimeError
    assert model.training and not model[2].training


def test_keep_best_keeps_the_best_weights_and_ignores_nan():
    model = nn.Linear(3, 2)
    keep = KeepBest(model)
    with pytest.raises(RuntimeError, match="no score"):
        keep.restore()
    first = copy.deepcopy(model.state_dict())
    assert keep.update(0.6, step=0)
    with torch.no_grad():
        model.weight.add_(1.0)
    assert not keep.update(0.5, step=1) and not keep.update(float("nan"), step=2)
    with torch.no_grad():
        model.bias.add_(1.0)
    restore_to = copy.deepcopy(model.state_dict())
    assert keep.update(0.7, step=3) and keep.best_step == 3 and keep.best_score == 0.7
    with torch.no_grad():
        model.weight.zero_()
    keep.restore()
    assert all(torch.equal(model.state_dict()[k], restore_to[k]) for k in restore_to)
    assert not torch.equal(model.weight, first["weight"])
    low = KeepBest(model, higher_is_better=False)
    assert low.update(2.0) and low.update(1.0) and not low.update(1.5)
