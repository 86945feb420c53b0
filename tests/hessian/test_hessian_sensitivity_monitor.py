"""Per-layer sensitivity, HAWQ-V2 bit allocation, the training monitor and the batch-size
advisor."""

import itertools
import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import make_data, make_mlp
from torch import nn

from anyorder.hessian import (
    Hessian,
    HessianMonitor,
    advise_lr,
    allocate_bits,
    batch_extremes,
    eigenvalues,
    fit_batch_curvature,
    layer_sensitivity,
    parameter_layers,
    quantization_error,
    quantize,
)


def test_layer_traces_match_the_diagonal_blocks(mlp_problem):
    model, batch, exact, _ = mlp_problem
    sens = layer_sensitivity(model, F.cross_entropy, batch, matvecs=45, seed=0)
    assert [s.name for s in sens] == ["0", "2", "4"]
    start = 0
    for s in sens:
        block = exact[start : start + s.n_params, start : start + s.n_params]
        start += s.n_params
        assert abs(s.trace.estimate - float(block.trace())) <= 3 * s.trace.stderr + 1e-9
        assert math.isclose(s.average_eigenvalue, s.trace.estimate / s.n_params, rel_tol=1e-12)
    assert start == exact.shape[0]
    json.dumps([s.to_dict() for s in sens], allow_nan=False)


def test_quantize_levels_and_error():
    w = torch.linspace(-1, 1, 101)
    q = quantize(w, 2)  # levels {-1, 0, 1} * max|w|
    assert set(q.unique().tolist()) == {-1.0, 0.0, 1.0}
    assert (quantize(w, 8) - w).abs().max() <= 1 / 127 / 2 + 1e-7
    lin = nn.Linear(4, 3)
    errs = [quantization_error(lin, b) for b in (2, 4, 8)]
    assert errs[0] > errs[1] > errs[2] > 0
    with pytest.raises(ValueError, match="bits must be an integer >= 2, got 1"):
        quantize(w, 1)


def test_allocate_bits_is_the_exact_optimum_under_the_budget():
    model = make_mlp()
    sens = {"0": 0.5, "2": 0.05, "4": 2.0}
    layers = dict(parameter_layers(model))
    sizes = {n: sum(p.numel() for p in layers[n].parameters()) for n in sens}
    errs = {(n, b): quantization_error(layers[n], b) for n in sens for b in (2, 4, 8)}
    budget = int(4.5 * sum(sizes.values()))
    alloc = allocate_bits(sens, model, budget_bits=budget)
    best = min(
        (sum(sens[n] * errs[n, b] for n, b in zip(sens, bits)), bits)
        for bits in itertools.product((2, 4, 8), repeat=3)
        if sum(sizes[n] * b for n, b in zip(sens, bits)) <= budget
    )
    assert math.isclose(alloc.perturbation, best[0], rel_tol=1e-12)
    assert alloc.bits == dict(zip(sens, best[1])) and alloc.size_bits <= budget
    # the frontier: sizes increase, perturbations decrease
    sizes_f = [p[0] for p in alloc.frontier]
    perts = [p[1] for p in alloc.frontier]
    assert sizes_f == sorted(sizes_f) and all(a > b for a, b in zip(perts, perts[1:]))
    # a larger budget never hurts; average_bits is the same budget per parameter
    assert allocate_bits(sens, model, average_bits=8).bits == {"0": 8, "2": 8, "4": 8}
    assert allocate_bits(sens, model, average_bits=6).perturbation <= alloc.perturbation
    with pytest.raises(ValueError, match="no bit configuration fits"):
        allocate_bits(sens, model, budget_bits=10)
    with pytest.raises(ValueError, match="exactly one of"):
        allocate_bits(sens, model)
    with pytest.raises(ValueError, match="unknown layer 'x'"):
        allocate_bits({"x": 1.0}, model, average_bits=4)


def _train(monitor=None, steps=12, lr=0.5):
    model = make_mlp(seed=3, dtype=torch.float32)
    x, y = make_data(n=64, dtype=torch.float32)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    if monitor is not None:
        monitor = HessianMonitor(model, F.cross_entropy, (x, y), every=5, **monitor)
        monitor.attach(opt)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model, monitor


def test_monitor_records_every_n_steps_without_changing_training():
    plain, _ = _train(steps=11)
    model, monitor = _train(monitor={}, steps=11)  # the last check follows the 11th step
    assert [r.step for r in monitor.records] == [0, 5, 10]
    assert all(torch.equal(p, q) for p, q in zip(plain.parameters(), model.parameters()))
    assert model.training
    rec = monitor.records[-1]
    assert rec.lr == 0.5 and rec.threshold == 4.0
    x, y = make_data(n=64, dtype=torch.float32)
    top = eigenvalues(Hessian(model, F.cross_entropy, (x, y)), 1, tol=1e-4).eigenvalues[0]
    assert math.isclose(rec.top_eigenvalue, top, rel_tol=0.05)  # the last check was at step 10
    json.dumps(monitor.to_dict(), allow_nan=False)


def test_monitor_warm_starts_lanczos_from_the_previous_top_eigenvector():
    model = make_mlp(seed=3, dtype=torch.float32)
    x, y = make_data(n=64, dtype=torch.float32)
    monitor = HessianMonitor(model, F.cross_entropy, (x, y), tol=1e-4, max_iter=60)
    first, second = monitor.check(), monitor.check()  # same weights, same trace budget
    assert second.matvecs <= first.matvecs - 3
    assert math.isclose(first.top_eigenvalue, second.top_eigenvalue, rel_tol=1e-4)


def test_monitor_flags_crossing_two_over_lr():
    model = make_mlp(seed=3, dtype=torch.float32)
    batch = make_data(n=64, dtype=torch.float32)
    top = eigenvalues(Hessian(model, F.cross_entropy, batch), 1, tol=1e-4).eigenvalues[0]
    flagged = []
    lr_above = 2.0 / (0.5 * top)  # threshold half the top eigenvalue: above
    monitor = HessianMonitor(
        model, F.cross_entropy, batch, every=1, lr=lr_above, on_flag=flagged.append
    )
    rec = monitor.step()
    assert rec.eigenvalue_above and flagged == [rec] and monitor.crossings == [rec]
    monitor.lr = 2.0 / (2.0 * top)  # threshold twice the top eigenvalue: below
    rec2 = monitor.step()
    assert rec2.eigenvalue_above is False and len(flagged) == 1
    assert (rec2.trace_above is True) == (rec2.trace > rec2.threshold)
    no_lr = HessianMonitor(model, F.cross_entropy, batch).check()
    assert no_lr.threshold is None and no_lr.eigenvalue_above is None


def test_monitor_rejects_bad_settings():
    model = make_mlp()
    with pytest.raises(ValueError, match="every must be a positive integer, got 0"):
        HessianMonitor(model, F.cross_entropy, None, every=0)
    with pytest.raises(ValueError, match="lr must be a number > 0"):
        HessianMonitor(model, F.cross_entropy, None, lr=-1.0)
    with pytest.raises(ValueError, match="no data"):
        HessianMonitor(model, F.cross_entropy).check()


def test_fit_and_advice_follow_the_rules():
    # lambda(B) = 2 + 400 / B exactly: the fit recovers it
    measured = {b: 2 + 400 / b for b in (16, 64, 256)}
    curvature, noise = fit_batch_curvature(measured)
    assert math.isclose(curvature, 2, rel_tol=1e-9) and math.isclose(noise, 400, rel_tol=1e-9)
    sgd = advise_lr(measured, base_batch_size=32, base_lr=0.1, new_batch_size=128, optimizer="sgd")
    ratio = (2 + 400 / 32) / (2 + 400 / 128)
    assert math.isclose(sgd.lr, 0.1 * ratio, rel_tol=1e-9)
    adam = advise_lr(
        measured, base_batch_size=32, base_lr=1e-3, new_batch_size=128, optimizer="adam"
    )
    assert math.isclose(adam.lr, 1e-3 * math.sqrt(ratio), rel_tol=1e-9)
    assert math.isclose(sgd.stability_lr, 2 / (2 + 400 / 128), rel_tol=1e-9)
    # pure noise: the linear rule for SGD and the square-root rule for Adam
    noise_only = {b: 100 / b for b in (8, 32)}
    assert math.isclose(
        advise_lr(noise_only, base_batch_size=8, base_lr=0.1, new_batch_size=32).lr, 0.4
    )
    assert math.isclose(
        advise_lr(
            noise_only, base_batch_size=8, base_lr=0.1, new_batch_size=32, optimizer="adam"
        ).lr,
        0.2,
    )
    with pytest.raises(ValueError, match="two or more batch sizes"):
        fit_batch_curvature({8: 1.0})
    with pytest.raises(ValueError, match="optimizer must be one of sgd, adam, got 'lion'"):
        advise_lr(measured, base_batch_size=8, base_lr=0.1, new_batch_size=32, optimizer="lion")


def test_batch_extremes_measure_the_batch_hessian():
    model = make_mlp(seed=1)
    x, y = make_data(n=120, seed=2)
    ext = batch_extremes(model, F.cross_entropy, (x, y), [120, 30], repeats=2, seed=0, tol=1e-5)
    full = Hessian(model, F.cross_entropy, (x, y))
    assert math.isclose(ext[120][0], eigenvalues(full, 1, tol=1e-8).eigenvalues[0], rel_tol=1e-4)
    low = eigenvalues(full, 1, which="smallest", tol=1e-8).eigenvalues[0]
    assert math.isclose(ext[120][1], low, rel_tol=1e-4)
    assert ext[30][0] > ext[120][0]  # smaller batches: sharper extremes (noise)
    advice = advise_lr(ext, base_batch_size=30, base_lr=0.1, new_batch_size=120)
    assert advice.lr > 0.1
    with pytest.raises(ValueError, match="exceed the data set's 120 samples"):
        batch_extremes(model, F.cross_entropy, (x, y), [500])
