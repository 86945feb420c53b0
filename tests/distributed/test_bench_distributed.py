"""``anyorder bench --distributed N`` end to end, and its errors."""

from __future__ import annotations

import json

from anyorder.cli import main


def test_bench_distributed_reports_bytes_and_throughput(tmp_path, capsys) -> None:
    out = tmp_path / "run"
    code = main(["bench", "--tasks", "breast-cancer-logreg", "--optimizers", "zo-sgd,sgd",
                 "--steps", "3", "--distributed", "2", "--out", str(out), "--no-progress"])  # fmt: skip
    assert code == 0
    data = json.loads((out / "results.json").read_text())
    assert data["distributed"] == 2 and data["skipped"] == ["breast-cancer-logreg/sgd"]
    (run,) = data["runs"]
    assert run["bytes_sent_per_step"] == 8 and run["world_size"] == 2 and run["steps"] == 3
    assert run["queries_per_second"] > 0 and run["ddp_bytes_per_step"] == 2 * 1 / 2 * 4 * 31
    assert "queries/s" in capsys.readouterr().out


def test_bench_distributed_without_a_zeroth_order_optimizer_is_a_usage_error(tmp_path, capsys):
    code = main(["bench", "--tasks", "digits-mlp", "--optimizers", "sgd", "--distributed", "2",
                 "--out", str(tmp_path / "x")])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "zo-sgd" in err[0]
    code = main(["bench", "--distributed", "0", "--out", str(tmp_path / "y")])
    assert code == 2
