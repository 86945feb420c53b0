"""Sophia-G in the bench: classification tasks hand their logits to the Gauss-Newton-Bartlett
estimator through the runner's closure; other tasks skip it with a reason."""

import pytest
import torch
import torch.nn.functional as F

from anyorder.bench.registry import get_task
from anyorder.bench.runner import _task_closure, plan_suite, run_one
from anyorder.core.rng import generator_for
from anyorder.curvature import GaussNewtonBartlett
from anyorder.optim import Sophia


def _digits_batch(seed=0):
    task = get_task("digits-mlp")()
    return task, task.init_model(seed), next(task.batches(torch.Generator().manual_seed(seed)))


def test_runner_closure_returns_loss_and_logits_and_differentiates_the_loss():
    task, model, batch = _digits_batch()
    closure = _task_closure(task, model, batch, task.loss_and_logits, with_logits=True)
    loss, logits = closure(backward=True)
    x, y = batch
    assert torch.equal(logits, model(x))
    assert float(loss.detach()) == float(F.cross_entropy(model(x), y))
    expected = torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))
    for p, g in zip(model.parameters(), expected):
        assert torch.allclose(p.grad, g, atol=1e-7)


def test_gnb_estimate_through_the_bench_closure_equals_its_definition():
    # Algorithm 2 of the Sophia paper written out: labels ~ softmax(logits) keyed by
    # (seed, step), gradient g of the mean cross-entropy against them, estimate B * g * g.
    task, model, batch = _digits_batch()
    params = list(model.parameters())
    seed, step = 4, 7
    est = GaussNewtonBartlett(seed).estimate(
        _task_closure(task, model, batch, task.loss_and_logits, with_logits=True), params, step
    )
    x, y = batch
    logits = model(x)
    labels = torch.multinomial(
        torch.softmax(logits.detach(), -1), 1, generator=generator_for(seed, step)
    ).view(-1)
    g = torch.autograd.grad(F.cross_entropy(logits, labels), params)
    for d, gi in zip(est.diagonal, g):
        assert torch.allclose(d, len(labels) * gi * gi, rtol=1e-5, atol=1e-10)
    true = torch.autograd.grad(F.cross_entropy(model(x), y), params)
    for gi, ti in zip(est.grads, true):
        assert torch.allclose(gi, ti, atol=1e-7)
    assert float(est.loss) == pytest.approx(float(F.cross_entropy(model(x), y)))


def test_gnb_on_the_logistic_regression_averages_to_its_gauss_newton_diagonal():
    # The two-class logits (0, z) make GNB estimate the logistic loss's Gauss-Newton diagonal,
    # mean_b p_b (1 - p_b) x_b^2 (bias: x = 1), in expectation over the sampled labels.
    task = get_task("breast-cancer-logreg")()
    model = task.init_model(0)
    with torch.no_grad():
        model.weight.normal_(0, 0.3, generator=torch.Generator().manual_seed(1))
    batch = next(task.batches(torch.Generator().manual_seed(0)))
    x = batch[0]
    gnb = GaussNewtonBartlett(0)
    draws = 3000
    total = [torch.zeros_like(p) for p in model.parameters()]
    for step in range(draws):
        _, logits = task.loss_and_logits(model, batch)
        for t, d in zip(total, gnb.from_logits(logits, list(model.parameters()), step)):
            t += d / draws
    with torch.no_grad():
        p = torch.sigmoid(model(x).reshape(-1))
        w = p * (1 - p)
        expected_w = (w[:, None] * x * x).mean(0).view_as(model.weight)
        expected_b = w.mean().view_as(model.bias)
    assert torch.allclose(total[0], expected_w, rtol=0.15, atol=1e-4 * float(expected_w.max()))
    assert torch.allclose(total[1], expected_b, rtol=0.1)


def test_bench_sophia_g_run_equals_a_plain_loop():
    (run,) = plan_suite(tasks=["digits-mlp"], optimizers=["sophia-g"], steps=12)
    assert run.hyperparameters["estimator"] == "gnb"
    result = run_one(run, seed=2)
    task = run.task
    model = task.init_model(2)
    opt = Sophia(model.parameters(), **run.hyperparameters)
    batches = task.batches(torch.Generator().manual_seed(2))
    losses = []
    for _ in range(12):
        batch = next(batches)

        def closure(backward: bool = True, batch=batch):
            loss, logits = task.loss_and_logits(model, batch)
            if backward:
                model.zero_grad(set_to_none=True)
                loss.backward()
            return loss, logits

        losses.append(float(opt.step(closure)))
    assert [h.loss for h in result.history] == losses
    assert opt.global_state["hessian_refreshes"] == 2
    assert result.final_loss == task.evaluate(model)[0]
    assert result.forward_evals == 12  # one forward per step: GNB reuses the loss's logits


def test_sophia_g_is_skipped_with_a_reason_where_there_are_no_logits():
    lines = []
    plan = plan_suite(
        tasks=["rosenbrock", "breast-cancer-logreg"],
        optimizers=["sophia-g", "sgd"],
        steps=2,
        log=lines.append,
    )
    assert [(r.task.name, r.spec.name) for r in plan] == [
        ("rosenbrock", "sgd"),
        ("breast-cancer-logreg", "sophia-g"),
        ("breast-cancer-logreg", "sgd"),
    ]
    assert lines == [
        "skipping sophia-g on rosenbrock: it needs logits, which this task does not provide"
    ]
    with pytest.raises(ValueError, match="sophia-g on rastrigin: it needs logits"):
        plan_suite(tasks=["rastrigin"], optimizers=["sophia-g"], steps=2)
