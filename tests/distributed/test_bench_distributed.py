"""``anyorder bench --distributed N`` end to end, and its errors."""

from __future__ import annotations

import dataclasses
import json

from anyorder.bench.report import load_results
from anyorder.bench.runner import RunResult
from anyorder.cli import main


def test_bench_distributed_writes_runs_in_the_schema_of_every_run(tmp_path, capsys) -> None:
    out = tmp_path / "run"
    code = main(["bench", "--tasks", "breast-cancer-logreg", "--optimizers", "zo-sgd,sgd",
                 "--steps", "3", "--distributed", "2", "--out", str(out), "--no-progress"])  # fmt: skip
    assert code == 0
    captured = capsys.readouterr()
    assert "skipping sgd on breast-cancer-logreg" in captured.err and "queries/s" in captured.out
    data = json.loads((out / "results.json").read_text())
    (run,) = data["runs"]
    # one schema: every field a single-process run has, the distributed figures under one key
    assert list(run) == [f.name for f in dataclasses.fields(RunResult)]
    assert run["optimizer"] == "zo-sgd" and run["steps"] == 3 and run["diverged"] is False
    assert [h["step"] for h in run["history"]] == [0, 1, 2]
    assert [h["forward_evals"] for h in run["history"]] == [4, 8, 12]  # 2 evaluations x 2 ranks
    assert run["forward_evals"] == 12 and run["time_per_step_s"] > 0
    assert run["final_loss"] > 0 and run["peak_memory_bytes"] is None
    d = run["distributed"]
    assert d["bytes_sent_per_step"] == 8 and d["world_size"] == 2
    assert d["queries_per_second"] > 0 and d["ddp_bytes_per_step"] == 2 * 1 / 2 * 4 * 31
    assert {"anyorder_version", "machine", "suite", "device"} <= set(data)
    assert load_results(out / "results.json").runs[0].distributed == d
    assert {p.name for p in out.iterdir()} >= {"results.json", "results.csv", "index.html"}


def test_bench_distributed_without_a_zeroth_order_optimizer_is_a_usage_error(tmp_path, capsys):
    code = main(["bench", "--tasks", "digits-mlp", "--optimizers", "sgd", "--distributed", "2",
                 "--out", str(tmp_path / "x")])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "zo-sgd" in err[0]
    assert not (tmp_path / "x").exists()  # refused before the output folder is made
    code = main(["bench", "--distributed", "0", "--out", str(tmp_path / "y")])
    assert code == 2
