"""The command-line tool, run as a subprocess the way users run it."""

import json
import os
import subprocess
import sys

import pytest

from anyorder.bench.registry import all_optimizers, get_task
from anyorder.bench.report import TABLE_COLUMNS


def run_cli(*args, cwd=None):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run(
        [sys.executable, "-m", "anyorder", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=300,
    )


@pytest.fixture(scope="module")
def bench_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "run"
    proc = run_cli(
        "bench",
        "--tasks",
        "digits-mlp,rosenbrock",
        "--steps",
        "5",
        "--seed",
        "1",
        "--seeds",
        "1",
        "--out",
        str(out),
    )
    assert proc.returncode == 0, proc.stderr
    return out, proc


def test_bench_writes_every_output(bench_out):
    out, proc = bench_out
    names = sorted(p.name for p in out.iterdir())
    assert names == [
        "bench.json",
        "index.html",
        "profiles.png",
        "ranking.png",
        "results.csv",
        "results.json",
        "runs",
        "summary.json",
        "task-digits-mlp.png",
        "task-rosenbrock.png",
    ]
    assert (out / "task-digits-mlp.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    html = (out / "index.html").read_text()
    assert '<img src="task-digits-mlp.png"' in html and '<table id="ranking">' in html
    header = (out / "results.csv").read_text().splitlines()[0].split(",")
    assert list(TABLE_COLUMNS) == header[: len(TABLE_COLUMNS)]
    data = json.loads((out / "results.json").read_text())
    pairs = sum(  # every optimizer on each task that provides what it requires
        spec.applies_to(get_task(task))
        for task in ("digits-mlp", "rosenbrock")
        for spec in all_optimizers().values()
    )
    # every optimizer on digits-mlp except those needing an encoder and head (zo-lora,
    # hybrid-zo: text-finetune only); on rosenbrock also not sophia-g (it needs logits)
    needs_encoder = sum("encoder-head" in spec.requires for spec in all_optimizers().values())
    assert needs_encoder == 2
    assert pairs == 2 * (len(all_optimizers()) - needs_encoder) - 1
    assert data["seed"] == 1 and data["suite"] == "quick" and len(data["runs"]) == pairs
    assert "digits-mlp" in proc.stdout and "final loss" in proc.stdout


def test_same_command_same_losses(bench_out, tmp_path):
    out, _ = bench_out
    proc = run_cli(
        "bench",
        "--tasks",
        "digits-mlp,rosenbrock",
        "--steps",
        "5",
        "--seed",
        "1",
        "--seeds",
        "1",
        "--out",
        str(tmp_path / "again"),
    )
    assert proc.returncode == 0, proc.stderr

    def losses(path):
        runs = json.loads((path / "results.json").read_text())["runs"]
        return [(r["final_loss"], [h["loss"] for h in r["history"]]) for r in runs]

    assert losses(out) == losses(tmp_path / "again")


def test_config_file_sets_hyperparameters_and_variants(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "optimizers:\n  sgd:\n    lr: 0.002\n    tasks:\n      rastrigin: {lr: 0.0005}\n"
        "  fast-adam:\n    base: adam\n    lr: 0.05\ntasks:\n  rastrigin: {dim: 3}\n"
    )
    out = tmp_path / "o"
    proc = run_cli(
        "bench",
        "--tasks",
        "rastrigin,rosenbrock",
        "--optimizers",
        "sgd,fast-adam",
        "--steps",
        "2",
        "--config",
        str(cfg),
        "--out",
        str(out),
        "--no-progress",
    )
    assert proc.returncode == 0, proc.stderr
    runs = {
        (r["task"], r["optimizer"]): r
        for r in json.loads((out / "results.json").read_text())["runs"]
    }
    assert runs[("rastrigin", "sgd")]["hyperparameters"]["lr"] == 0.0005
    assert runs[("rosenbrock", "sgd")]["hyperparameters"]["lr"] == 0.002
    assert runs[("rosenbrock", "fast-adam")]["hyperparameters"]["lr"] == 0.05
    assert runs[("rastrigin", "sgd")]["task_options"] == {"dim": 3}
    toml = tmp_path / "c.toml"
    toml.write_text("[optimizers.sgd]\nlr = 0.01\n")
    proc = run_cli(
        "bench",
        "--tasks",
        "rosenbrock",
        "--optimizers",
        "sgd",
        "--steps",
        "1",
        "--config",
        str(toml),
        "--out",
        str(tmp_path / "t"),
        "--no-progress",
    )
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize(
    "args,message",
    [
        (["--tasks", "mnist"], "unknown task 'mnist'; valid tasks: breast-cancer-logreg, char-lm"),
        (
            ["--optimizers", "adamx"],
            "unknown optimizer 'adamx'; valid optimizers: adahessian, adam, adamw",
        ),
        (["--steps", "0"], "expected a positive integer, got '0'"),
        (["--seed", "-3"], "expected an integer >= 0, got '-3'"),
        (["--time-budget", "0"], "expected a number > 0, got '0'"),
        (["--suite", "huge"], "invalid choice: 'huge'"),
        (["--config", "missing.toml"], "config file 'missing.toml' does not exist"),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(args, message, tmp_path):
    proc = run_cli("bench", *args, "--out", str(tmp_path / "o"), cwd=tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert message in lines[0]
    assert not (tmp_path / "o").exists()


def test_bad_hyperparameter_and_config(tmp_path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[optimizers.sgd]\nlr = -1.0\n")
    proc = run_cli(
        "bench",
        "--tasks",
        "rosenbrock",
        "--optimizers",
        "sgd",
        "--config",
        str(cfg),
        "--out",
        str(tmp_path / "o"),
    )
    assert proc.returncode == 2
    assert "optimizer 'sgd': Invalid learning rate: -1.0" in proc.stderr
    cfg.write_text("[optimisers.sgd]\nlr = 1.0\n")
    proc = run_cli("bench", "--config", str(cfg), "--out", str(tmp_path / "o"))
    assert proc.returncode == 2 and "unknown section(s) ['optimisers']" in proc.stderr


def test_existing_out_dir_is_never_overwritten(tmp_path):
    out = tmp_path / "keep"
    out.mkdir()
    (out / "results.json").write_text("precious")
    proc = run_cli("bench", "--tasks", "rosenbrock", "--steps", "1", "--out", str(out))
    assert proc.returncode == 2
    assert "already exists and is not empty" in proc.stderr
    assert (out / "results.json").read_text() == "precious"


def test_list_and_version():
    proc = run_cli("list")
    assert proc.returncode == 0 and "char-lm" in proc.stdout and "adamw" in proc.stdout
    proc = run_cli("--version")
    assert proc.returncode == 0 and proc.stdout.startswith("anyorder ")


def test_results_json_loads_back_into_the_dataclasses(bench_out):
    from anyorder.bench.report import format_table, load_results

    out, _ = bench_out
    result = load_results(out / "results.json")
    assert result.to_dict() == json.loads((out / "results.json").read_text())
    table = format_table(result, markdown=True).splitlines()
    assert table[0].startswith("| task | optimizer | final loss")
    assert len(table) == 2 + len(result.runs)


def test_time_budget_flag_caps_each_run(tmp_path):
    out = tmp_path / "tb"
    proc = run_cli(
        "bench",
        "--tasks",
        "rosenbrock",
        "--optimizers",
        "sgd,zo-sgd",
        "--steps",
        "1000000",
        "--time-budget",
        "0.05",
        "--out",
        str(out),
        "--no-progress",
    )
    assert proc.returncode == 0, proc.stderr
    for run in json.loads((out / "results.json").read_text())["runs"]:
        assert run["time_budget_s"] == 0.05 and run["steps"] < 1000000


def test_hessian_command_writes_json_plots_and_summary(tmp_path):
    import torch

    from anyorder.bench.registry import get_task

    ckpt = tmp_path / "model.pt"
    torch.save(get_task("digits-mlp")().init_model(3).state_dict(), ckpt)
    out = tmp_path / "h"
    args = ["hessian", "--task", "digits-mlp", "--batches", "2", "--top-k", "2"]
    args += ["--matvecs", "12", "--checkpoint", str(ckpt), "--out", str(out)]
    proc = run_cli(*args)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["density.png", "hessian.json", "layers.png"]
    assert (out / "layers.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads((out / "hessian.json").read_text())
    assert data["task"] == "digits-mlp" and data["n_params"] == 4810 and data["samples"] == 128
    assert data["checkpoint"] == str(ckpt)
    top = data["top"]["eigenvalues"]
    assert len(top) == 2 and top[0] >= top[1] > data["bottom"]["eigenvalues"][0]
    assert [layer["name"] for layer in data["layers"]] == ["0", "2"]
    assert {a["optimizer"] for a in data["batch_size_advice"]} == {"sgd", "adam"}
    assert "top eigenvalues:" in proc.stdout and "HAWQ-V2 bits" in proc.stdout
    # the checkpoint is what was analysed: another seed without it gives other numbers
    proc2 = run_cli(*args[:-4], "--seed", "0", "--out", str(tmp_path / "h2"), "--no-progress")
    assert proc2.returncode == 0, proc2.stderr
    assert json.loads((tmp_path / "h2" / "hessian.json").read_text())["top"]["eigenvalues"] != top


@pytest.mark.parametrize(
    "args,message",
    [
        (["--task", "mnist"], "unknown task 'mnist'; valid tasks:"),
        (["--task", "digits-mlp", "--batches", "0"], "expected a positive integer, got '0'"),
        (
            ["--task", "digits-mlp", "--checkpoint", "nope.pt"],
            "checkpoint 'nope.pt' does not exist",
        ),
        ([], "the following arguments are required: --task"),
    ],
)
def test_hessian_bad_input_is_one_line_and_exit_code_2(args, message, tmp_path):
    proc = run_cli("hessian", *args, "--out", str(tmp_path / "o"), cwd=tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert not (tmp_path / "o").exists()


def test_hessian_checkpoint_that_does_not_fit_exits_2(tmp_path):
    import torch

    bad = tmp_path / "bad.pt"
    torch.save({"weight": torch.zeros(2)}, bad)
    proc = run_cli(
        "hessian", "--task", "digits-mlp", "--checkpoint", str(bad), "--out", str(tmp_path / "o")
    )
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "does not fit the task's model" in proc.stderr


def test_bench_monitor_records_curvature_per_run(tmp_path):
    out = tmp_path / "m"
    proc = run_cli(
        "bench",
        "--tasks",
        "digits-mlp",
        "--optimizers",
        "sgd",
        "--steps",
        "5",
        "--monitor-every",
        "2",
        "--seeds",
        "1",
        "--out",
        str(out),
        "--no-progress",
    )
    assert proc.returncode == 0, proc.stderr
    (run,) = json.loads((out / "results.json").read_text())["runs"]
    mon = run["monitor"]
    assert mon["every"] == 2 and mon["error"] is None
    assert [r["step"] for r in mon["records"]] == [0, 2, 4]
    rec = mon["records"][0]
    assert rec["lr"] == run["hyperparameters"]["lr"] and rec["threshold"] == 2 / rec["lr"]
    assert rec["top_eigenvalue"] > 0 and rec["eigenvalue_above"] == (
        rec["top_eigenvalue"] > rec["threshold"]
    )
    assert run["forward_evals"] == 5  # the monitor's evaluations are not the optimizer's
