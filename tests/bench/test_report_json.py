"""results.json is strict JSON whatever a run produced: NaN/inf anywhere (hyperparameters, a
monitor's records, a loss) is written as null, and the file loads back."""

from __future__ import annotations

import json

import pytest

from anyorder.bench.checks import json_safe
from anyorder.bench.report import load_results, write_report
from anyorder.bench.runner import HistoryPoint, RunResult, SuiteResult


def _strict(text: str):
    def refuse(name):
        raise AssertionError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


def test_non_finite_figures_are_written_as_null(tmp_path) -> None:
    nan, inf = float("nan"), float("inf")
    run = RunResult(
        task="rosenbrock", optimizer="sgd", hyperparameters={"lr": nan, "betas": (0.9, inf)},
        task_options={"dim": 2}, seed=0, steps=2, steps_requested=5, time_budget_s=None,
        final_loss=None, metric_name="distance", metric=None, higher_is_better=False,
        time_per_step_s=1e-3, total_time_s=2e-3, inference_time_s=1e-4, peak_memory_bytes=64,
        inference_peak_memory_bytes=32, forward_evals=2, backward_evals=2,
        forward_evals_per_step=1.0, backward_evals_per_step=1.0, diverged=True, error=None,
        history=[HistoryPoint(0, 3.5, 1e-3, 1), HistoryPoint(1, -inf, 2e-3, 2)],
        monitor={"records": [{"step": 0, "top_eigenvalue": nan}], "error": None},
    )  # fmt: skip
    result = SuiteResult("0", "now", {"cpu_count": 2}, "quick", 0, "cpu", [run])
    paths = write_report(result, tmp_path)
    data = _strict(paths["json"].read_text())
    (written,) = data["runs"]
    assert written["hyperparameters"] == {"lr": None, "betas": [0.9, None]}
    assert [h["loss"] for h in written["history"]] == [3.5, None]
    assert written["monitor"]["records"][0]["top_eigenvalue"] is None
    assert written["diverged"] is True and written["final_loss"] is None
    assert "nan" not in paths["csv"].read_text().lower()
    assert load_results(paths["json"]).runs[0].history[1].loss is None


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_json_safe_keeps_finite_numbers_and_nulls_the_rest(value) -> None:
    out = json_safe({"a": [1, 2.5, value, {"b": (value, "s", True)}], "c": value})
    assert out == {"a": [1, 2.5, None, {"b": [None, "s", True]}], "c": None}
