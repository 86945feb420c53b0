"""User task files (`anyorder bench --task-file`), paired seeds, evaluation budgets, resume."""

import json
import math
import textwrap

import pytest
import torch

from anyorder.bench import runner as runner_mod
from anyorder.bench.registry import get_optimizer
from anyorder.bench.runner import PlannedRun, run_suite
from anyorder.bench.user_task import TaskFileError, load_task_file, model_task
from anyorder.cli import main

CNN_FILE = '''
import torch
from torch import nn
from anyorder.bench.user_task import model_task

g = torch.Generator().manual_seed(7)
x = torch.randn(96, 1, 8, 8, generator=g)
y = (x[:, 0, :4].mean(dim=(1, 2)) > x[:, 0, 4:].mean(dim=(1, 2))).long()   # top vs bottom


def cnn():
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(4 * 4 * 4, 2),
    )


def accuracy(logits, y):
    return (logits.argmax(-1) == y).float().mean()


task = model_task(
    "my-cnn", model=cnn, train=(x[:64], y[:64]), test=(x[64:], y[64:]),
    loss=nn.functional.cross_entropy, metric=accuracy, metric_name="accuracy",
    higher_is_better=True, batch_size=16, steps=6, logits=True,
)
'''

VECTOR_FILE = '''
import torch
from anyorder.bench.user_task import vector_task

scale = torch.tensor([1.0, 2.0, 3.0, 4.0])


def f(x):  # points of shape (..., 4)
    return 0.5 * (scale * (x - 1.0) ** 2).sum(-1)


tasks = [vector_task("my-quadratic", f=f, x0=torch.zeros(4), minimiser=torch.ones(4),
                     steps=5, target_loss=0.5)]
'''


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def _run_cli(args, capsys):
    code = main(["bench", "--no-progress", *args])
    return code, capsys.readouterr()


def test_model_task_file_runs_end_to_end_through_the_cli(tmp_path, capsys):
    task_file = _write(tmp_path, "my_task.py", CNN_FILE)
    out = tmp_path / "out"
    code, io = _run_cli(
        ["--task-file", str(task_file), "--optimizers", "sgd,adam,zo-sgd,sophia-g",
         "--seeds", "2", "--out", str(out)],
        capsys,
    )  # fmt: skip
    assert code == 0, io.err
    data = json.loads((out / "results.json").read_text())
    assert data["seeds"] == [0, 1]
    runs = {(r["optimizer"], r["seed"]): r for r in data["runs"]}
    assert set(runs) == {(o, s) for o in ("sgd", "adam", "zo-sgd", "sophia-g") for s in (0, 1)}
    for r in runs.values():
        assert r["task"] == "my-cnn" and r["steps"] == 6 and r["metric_name"] == "accuracy"
        assert 0.0 <= r["metric"] <= 1.0
        assert r["budget"]["kind"] == "steps" and r["budget"]["backward_cost"] == 2.0
    # paired seeds: same first loss (same weights, same first batch) across optimizers that
    # evaluate the plain loss first; different across seeds
    for seed in (0, 1):
        assert runs[("sgd", seed)]["history"][0]["loss"] == runs[("adam", seed)]["history"][0]["loss"]
    assert runs[("sgd", 0)]["history"][0]["loss"] != runs[("sgd", 1)]["history"][0]["loss"]
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["tasks"]["my-cnn"]["optimizers"]) == {"sgd", "adam", "zo-sgd", "sophia-g"}
    assert "ranking over" in io.out
    page = (out / "index.html").read_text()
    assert 'href="#task-my-cnn"' in page and 'id="task-my-cnn"' in page
    assert (out / "task-my-cnn.png").stat().st_size > 0


def test_vector_task_file_runs_and_follows_the_reference_rule(tmp_path, capsys):
    task_file = _write(tmp_path, "quad.py", VECTOR_FILE)
    out = tmp_path / "out"
    code, io = _run_cli(
        ["--task-file", str(task_file), "--optimizers", "sgd,zo-sgd,cbo", "--seeds", "1",
         "--out", str(out)],
        capsys,
    )  # fmt: skip
    assert code == 0, io.err
    data = json.loads((out / "results.json").read_text())
    assert {r["optimizer"] for r in data["runs"]} == {"sgd", "zo-sgd", "cbo"}
    sgd = next(r for r in data["runs"] if r["optimizer"] == "sgd")
    # the registry's SGD (heavy ball, momentum 0.9) on f(x) = 0.5 sum s_i (x_i - 1)^2 from 0,
    # written out: v <- 0.9 v + g, x <- x - lr v
    lr = sgd["hyperparameters"]["lr"]
    s = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    x = torch.zeros(4, dtype=torch.float64)
    v = torch.zeros(4, dtype=torch.float64)
    for k in range(5):
        g = s * (x - 1.0)
        v = g if k == 0 else 0.9 * v + g
        x = x - lr * v
    assert sgd["final_loss"] == pytest.approx(float(0.5 * (s * (x - 1) ** 2).sum()), rel=1e-5)
    assert sgd["metric"] == pytest.approx(float(torch.linalg.vector_norm(x - 1)), rel=1e-5)
    summary = json.loads((out / "summary.json").read_text())
    info = summary["tasks"]["my-quadratic"]
    assert info["target"] == 0.5 and "declared" in info["target_source"]


def test_bad_task_files_exit_2_with_one_line(tmp_path, capsys):
    cases = {
        "missing.py": None,
        "empty.py": "x = 1\n",
        "broken.py": "raise RuntimeError('boom')\n",
        "clash.py": VECTOR_FILE.replace('"my-quadratic"', '"rosenbrock"'),
    }
    for name, text in cases.items():
        path = tmp_path / name
        if text is not None:
            path.write_text(textwrap.dedent(text))
        out = tmp_path / f"out-{name}"
        code, io = _run_cli(["--task-file", str(path), "--out", str(out)], capsys)
        assert code == 2, name
        assert len(io.err.strip().splitlines()) == 1 and "task file" in io.err, io.err
        assert not out.exists()
    with pytest.raises(TaskFileError, match="must define"):
        load_task_file(tmp_path / "empty.py")
    with pytest.raises(ValueError, match="same number"):
        model_task("bad", model=lambda: torch.nn.Linear(2, 1), train=(torch.zeros(3, 2),
                   torch.zeros(2)), loss=torch.nn.functional.mse_loss)  # fmt: skip


class _Recording:
    """Wraps a task so the test sees the weights each run starts from and the batches it uses."""

    def __init__(self, task):
        self.task = task
        self.inits: list[torch.Tensor] = []
        self.streams: list[list[torch.Tensor]] = []

    def __getattr__(self, name):
        return getattr(self.task, name)

    def init_model(self, seed):
        model = self.task.init_model(seed)
        self.inits.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
        return model

    def batches(self, generator):
        seen: list[torch.Tensor] = []
        self.streams.append(seen)
        for batch in self.task.batches(generator):
            seen.append(batch[0].clone())
            yield batch


def test_paired_seeds_give_every_optimizer_the_same_init_and_data_order():
    x = torch.randn(40, 3, generator=torch.Generator().manual_seed(0))
    cls = model_task("paired-probe", model=lambda: torch.nn.Linear(3, 1),
                     train=(x, x.sum(1, keepdim=True)), loss=torch.nn.functional.mse_loss,
                     batch_size=8, steps=7)  # fmt: skip
    task = _Recording(cls())
    names = ("sgd", "adam", "zo-sgd")
    plan = [
        PlannedRun(task, get_optimizer(n), get_optimizer(n).hyperparameters("x"), 7)
        for n in names
    ]
    seen: list[tuple[str, int, torch.Tensor, list[torch.Tensor]]] = []

    def on_result(result):  # the timed run's init and stream are the last ones recorded
        seen.append((result.optimizer, result.seed, task.inits[-1], task.streams[-1]))

    result = run_suite(plan, seeds=[3, 4], progress=False, on_result=on_result)
    assert [(r.optimizer, r.seed) for r in result.runs] == [
        (n, s) for s in (3, 4) for n in names
    ]
    for seed in (3, 4):
        mine = [s for s in seen if s[1] == seed]
        assert len(mine) == 3
        for _, _, init, stream in mine[1:]:
            assert torch.equal(init, mine[0][2])
            assert len(stream) == 7 and all(
                torch.equal(a, b) for a, b in zip(stream, mine[0][3])
            )
    first3 = next(s for s in seen if s[1] == 3)
    first4 = next(s for s in seen if s[1] == 4)
    assert not torch.equal(first3[2], first4[2])
    assert not torch.equal(first3[3][0], first4[3][0])


def test_evaluation_budget_stops_each_run_at_equal_cost(tmp_path, capsys):
    task_file = _write(tmp_path, "quad.py", VECTOR_FILE)
    out = tmp_path / "out"
    code, io = _run_cli(
        ["--task-file", str(task_file), "--optimizers", "sgd,zo-sgd", "--seeds", "1",
         "--steps", "50", "--eval-budget", "12", "--backward-cost", "2", "--out", str(out)],
        capsys,
    )  # fmt: skip
    assert code == 0, io.err
    runs = {r["optimizer"]: r for r in json.loads((out / "results.json").read_text())["runs"]}
    # SGD: 1 forward + 1 backward = cost 3 per step -> 4 steps; ZO-SGD: 2 forwards -> 6 steps
    assert runs["sgd"]["steps"] == 4 and runs["zo-sgd"]["steps"] == 6
    for r in runs.values():
        assert r["budget"] == {"kind": "evaluations", "steps": 50, "seconds": None,
                               "evaluations": 12.0, "backward_cost": 2.0}  # fmt: skip
    code, io = _run_cli(
        ["--task-file", str(task_file), "--eval-budget", "12", "--time-budget", "1",
         "--out", str(tmp_path / "o2")],
        capsys,
    )  # fmt: skip
    assert code == 2 and "one budget" in io.err


TIMING = {"time_per_step_s", "total_time_s", "inference_time_s"}


def _without_timings(data):
    data = dict(data)
    data.pop("created")
    runs = []
    for r in data.pop("runs"):
        r = {k: v for k, v in r.items() if k not in TIMING}
        r["history"] = [{k: v for k, v in h.items() if k != "wall_time_s"} for h in r["history"]]
        runs.append(r)
    return data, runs


def test_resume_skips_finished_runs_and_matches_an_uninterrupted_run(tmp_path, capsys,
                                                                      monkeypatch):
    task_file = _write(tmp_path, "quad.py", VECTOR_FILE)
    args = ["--task-file", str(task_file), "--optimizers", "sgd,adam,zo-sgd", "--seeds", "2"]
    full = tmp_path / "full"
    assert _run_cli([*args, "--out", str(full)], capsys)[0] == 0

    real_run_one = runner_mod.run_one
    calls: list[tuple[str, int]] = []

    def interrupting(run, seed, **kw):
        if len(calls) == 3:
            raise KeyboardInterrupt
        calls.append((run.spec.name, seed))
        return real_run_one(run, seed, **kw)

    part = tmp_path / "part"
    monkeypatch.setattr(runner_mod, "run_one", interrupting)
    code, io = _run_cli([*args, "--out", str(part)], capsys)
    assert code == 130 and "--resume" in io.err
    assert len(list((part / "runs").glob("*.json"))) == 3
    assert not (part / "results.json").exists()

    calls.clear()

    def counting(run, seed, **kw):
        calls.append((run.spec.name, seed))
        return real_run_one(run, seed, **kw)

    monkeypatch.setattr(runner_mod, "run_one", counting)
    code, io = _run_cli(["--resume", str(part), "--optimizers", "sgd"], capsys)
    assert code == 2 and "--optimizers" in io.err  # settings come from the directory
    code, io = _run_cli(["--resume", str(part)], capsys)
    assert code == 0, io.err
    assert sorted(calls) == sorted([("adam", 1), ("zo-sgd", 1), ("sgd", 1)])
    a = json.loads((full / "results.json").read_text())
    b = json.loads((part / "results.json").read_text())
    assert _without_timings(a) == _without_timings(b)
    # a resumed, finished directory does nothing more
    calls.clear()
    assert _run_cli(["--resume", str(part)], capsys)[0] == 0 and calls == []
    # an edited task file would make the remaining runs differ: refused
    task_file.write_text(task_file.read_text() + "\n# edited\n")
    code, io = _run_cli(["--resume", str(part)], capsys)
    assert code == 2 and "changed" in io.err
    task_file.write_text(task_file.read_text().replace("\n# edited\n", ""))
    # a damaged saved run is reported, never silently redone
    victim = next((part / "runs").glob("*.json"))
    victim.write_text("{")
    code, io = _run_cli(["--resume", str(part)], capsys)
    assert code == 2 and victim.name in io.err
    assert math.isfinite(b["runs"][0]["final_loss"])
