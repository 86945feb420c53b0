"""Every bad input of the command line: exit code 2, one line on stderr naming the file, table,
key or folder, and nothing written. Checked in-process (cheap: nothing runs), plus one subprocess
run of representative cases the way users meet them."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from anyorder.cli import main

VALID_OPTIMIZERS = "valid optimizers: adahessian, adam"
VALID_TASKS = "valid tasks: breast-cancer-logreg, char-lm"

CONFIGS = [
    ("nan.toml", "[optimizers.sgd]\nlr = nan\n", "'nan.toml': [optimizers.sgd] lr = nan: must be a finite number"),
    ("inf.yaml", "optimizers:\n  sgd: {lr: .inf}\n", "[optimizers.sgd] lr = inf: must be a finite"),
    ("betas.toml", "[optimizers.adam]\nbetas = [0.9, -inf]\n", "[optimizers.adam] betas[1] = -inf"),
    ("str.toml", '[optimizers.sgd]\nlr = "0.1"\n', "[optimizers.sgd] lr = '0.1' (a str): must be a number"),
    ("per.toml", "[optimizers.sgd.tasks.rosenbrock]\nlr = nan\n", "[optimizers.sgd.tasks.rosenbrock] lr = nan"),
    ("sgdd.toml", "[optimizers.sgdd]\nlr = 0.1\n", f"[optimizers.sgdd] (a variant of a registered optimizer needs base = \"<name>\"): unknown optimizer 'sgdd'; {VALID_OPTIMIZERS}"),
    ("base.toml", '[optimizers.fast]\nbase = "adamm"\n', f"[optimizers.fast]: unknown optimizer 'adamm'; {VALID_OPTIMIZERS}"),
    ("rosen.toml", "[optimizers.sgd.tasks.rosenbrok]\nlr = 0.1\n", f"[optimizers.sgd.tasks.rosenbrok]: unknown task 'rosenbrok'; {VALID_TASKS}"),
    ("task.toml", "[tasks.rastrigen]\ndim = 3\n", f"[tasks.rastrigen]: unknown task 'rastrigen'; {VALID_TASKS}"),
    ("dim.yaml", "tasks:\n  rastrigin: {dim: three}\n", "[tasks.rastrigin] dim = 'three' (a str): must be a number"),
    ("bad.yaml", "optimizers:\n  sgd:\n    lr: [1, 2\n", "'bad.yaml', line 4, column 1: expected ',' or ']'"),
    ("bad2.yaml", "optimizers:\n  sgd:\n   lr: 1\n  x: : :\n", "'bad2.yaml', line 4, column 6: mapping values are not allowed here"),
    ("bad.toml", "[optimizers.sgd]\nlr = \n", "'bad.toml', line 2, column 6: Invalid value"),
]  # fmt: skip


def _bad(capsys, *args) -> str:
    code = main(list(args))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    return err[0]


@pytest.mark.parametrize("name,text,message", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_a_bad_config_is_refused_before_anything_runs(
    tmp_path, capsys, monkeypatch, name, text, message
):
    monkeypatch.chdir(tmp_path)
    (tmp_path / name).write_text(text)
    out = tmp_path / "out"
    cheap = ["--tasks", "rosenbrock", "--steps", "1"]  # were a check missing: seconds, not a suite
    line = _bad(capsys, "bench", *cheap, "--config", name, "--out", str(out))
    assert message in line
    assert not out.exists()


def test_a_config_that_is_a_directory_says_so(tmp_path, capsys):
    (tmp_path / "c.toml").mkdir()
    line = _bad(capsys, "bench", "--config", str(tmp_path / "c.toml"), "--out", str(tmp_path / "o"))
    assert "is a directory, not a file" in line and not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "out,message",
    [
        ("{file}/run", "cannot be created: '{file}' is a file"),
        ("{file}/a/b", "cannot be created: '{file}' is a file"),
        ("/proc/anyorder-test/run", "is under /proc, the kernel's virtual file system"),
        ("/proc/self", "already exists and is not empty"),
        ("/sys/anyorder-test", "is under /sys, the kernel's virtual file system"),
    ],
)
def test_an_out_dir_that_cannot_take_files_exits_2(tmp_path, capsys, out, message):
    file = tmp_path / "results.json"
    file.write_text("precious")
    args = ["--tasks", "rosenbrock", "--optimizers", "sgd", "--steps", "1"]
    line = _bad(capsys, "bench", *args, "--out", out.format(file=file))
    assert message.format(file=file) in line
    assert file.read_text() == "precious" and sorted(tmp_path.iterdir()) == [file]


def test_an_unwritable_out_dir_exits_2(tmp_path, capsys, monkeypatch):
    import anyorder.bench.checks as checks

    parent = tmp_path / "ro"
    parent.mkdir()
    if os.geteuid() != 0:  # a real read-only folder where permissions bind
        parent.chmod(0o500)
    else:  # root writes anywhere: stand in for the permission check
        monkeypatch.setattr(checks.os, "access", lambda *a, **k: False)
    try:
        line = _bad(capsys, "bench", "--tasks", "rosenbrock", "--out", str(parent / "run"))
    finally:
        parent.chmod(0o700)
    assert f"'{parent}' is not writable by this user" in line
    assert list(parent.iterdir()) == []


def _checkpoint_files(tmp_path):
    from anyorder.bench.registry import get_task

    good = tmp_path / "good.pt"
    torch.save(get_task("digits-mlp")().init_model(0).state_dict(), good)
    raw = good.read_bytes()
    files = {
        "empty.pt": b"",
        "random.pt": bytes((i * 97 + 13) % 256 for i in range(4096)),
        "truncated.pt": raw[: len(raw) // 3],
        "truncated-end.pt": raw[:-7],
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    torch.save({"f": print}, tmp_path / "crafted.pt")  # loadable only with weights_only=False
    (tmp_path / "dir.pt").mkdir()


@pytest.mark.parametrize(
    "name,message",
    [
        ("empty.pt", "is empty (0 bytes)"),
        ("random.pt", "is not a torch.save file (neither torch's zip archive nor its legacy"),
        ("truncated.pt", "is truncated or corrupted: a torch.save archive of"),
        ("truncated-end.pt", "is truncated or corrupted"),
        ("crafted.pt", "holds objects other than tensors, containers, numbers and strings"),
        ("dir.pt", "is a directory, not a file"),
    ],
)
def test_hessian_checkpoint_that_is_not_one_exits_2_with_one_line(tmp_path, capsys, name, message):
    _checkpoint_files(tmp_path)
    out = tmp_path / "o"
    line = _bad(capsys, "hessian", "--task", "digits-mlp", "--checkpoint", str(tmp_path / name),
                "--out", str(out))  # fmt: skip
    assert f"checkpoint '{tmp_path / name}' {message}" in line
    assert not out.exists()


def test_bad_input_as_users_meet_it_in_a_subprocess(tmp_path):
    """One interpreter (one torch import) running three cases, each with its own stderr: what a
    user sees, warnings included."""
    (tmp_path / "nan.toml").write_text("[optimizers.sgd]\nlr = nan\n")
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "file").write_text("x")
    cases = [
        ["bench", "--tasks", "rosenbrock", "--steps", "1", "--config", "nan.toml", "--out", "o"],
        ["bench", "--tasks", "rosenbrock", "--out", "file/o"],
        ["hessian", "--task", "digits-mlp", "--checkpoint", "empty.pt", "--out", "o"],
    ]
    script = (
        "import contextlib, io, json\nfrom anyorder.cli import main\nresults = []\n"
        f"for args in {cases!r}:\n"
        "    err = io.StringIO()\n"
        "    with contextlib.redirect_stderr(err):\n"
        "        code = main(args)\n"
        "    results.append([code, err.getvalue()])\n"
        "print(json.dumps(results))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=tmp_path, timeout=120)  # fmt: skip
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    for code, err in json.loads(proc.stdout):
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("anyorder: error: "), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.pt", "file", "nan.toml"]
