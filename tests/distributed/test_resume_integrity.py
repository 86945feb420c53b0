"""Resume loses nothing silently: a damaged seed log or checkpoint is an error naming the file, the
line and what is wrong, and leaves every file and the model as they were; only a torn last log
line is dropped (with a warning)."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from torch import nn

from anyorder.core.files import CheckpointError, load_checkpoint
from anyorder.distributed import SeedLog, SeedLogError, TornLogLineWarning, ZOTrainer
from anyorder.distributed.trainer import CHECKPOINT, SEED_LOG
from anyorder.optim import ZOAdam

X = torch.linspace(-1, 1, 48).reshape(8, 6)
Y = torch.linspace(0, 2, 8).reshape(8, 1)


def _trainer(directory, checkpoint_every=4):
    model = nn.Linear(6, 1)
    with torch.no_grad():  # the same initial weights every time, without global seeding
        model.weight.copy_(torch.linspace(-0.5, 0.5, 6).reshape(1, 6))
        model.bias.fill_(0.1)
    opt = ZOAdam(model.parameters(), lr=0.05, seed=3)
    trainer = ZOTrainer(
        model, opt, check_every=0, checkpoint_dir=directory, checkpoint_every=checkpoint_every
    )

    def closure(backward: bool = False):
        return nn.functional.mse_loss(model(X), Y)

    return trainer, model, closure


def _train(directory, steps, start=0, checkpoint_every=4):
    trainer, model, closure = _trainer(directory, checkpoint_every)
    if start is None:
        start = trainer.resume()
    for _ in range(start, steps):
        trainer.step(closure)
    trainer.close()
    return [p.detach().clone() for p in model.parameters()]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("ref"), 11)


def _snapshot(directory):
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def _assert_refused(directory, error, match):
    """resume() raises ``error`` matching ``match``; files and the model stay as they were."""
    before = _snapshot(directory)
    trainer, model, _ = _trainer(directory)
    weights = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(error, match=match):
        trainer.resume()
    assert _snapshot(directory) == before
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters()))
    assert trainer.optimizer.global_state["step"] == 0


def _log_lines(directory):
    return (directory / SEED_LOG).read_text().splitlines(keepends=True)


def test_an_intact_run_resumes_bit_for_bit(tmp_path, reference):
    _train(tmp_path, 7)  # checkpoint at 4, log 4..6
    assert [e[0] for e in SeedLog(tmp_path / SEED_LOG).entries()] == [4, 5, 6]
    resumed = _train(tmp_path, 11, start=None)
    assert all(torch.equal(a, b) for a, b in zip(resumed, reference))


@pytest.mark.parametrize(
    "damage,match",
    [
        (lambda lines: lines[:1] + ["garbage\n"] + lines[1:], r"line 2: not a JSON entry"),
        (lambda lines: lines[:1] + [lines[1][:9] + "\n"] + lines[2:], r"line 2: not a JSON"),
        (lambda lines: lines[:1] + lines[2:], r"line 2: step 6 follows step 4 \(steps 5..5"),
        (lambda lines: [lines[1], lines[0]] + lines[2:], r"line 2: step 4 follows step 5"),
        (lambda lines: lines[:1] + ['{"step": 5, "q": [1], "g": []}\n'] + lines[2:], r"line 2"),
        (lambda lines: lines + ["\n"], r"line 4: not a JSON entry"),
    ],
    ids=["garbage", "cut-in-the-middle", "missing", "out-of-order", "bad-entry", "blank-last"],
)
def test_a_damaged_log_is_an_error_naming_file_and_line(tmp_path, damage, match) -> None:
    _train(tmp_path, 7)
    (tmp_path / SEED_LOG).write_text("".join(damage(_log_lines(tmp_path))))
    _assert_refused(tmp_path, SeedLogError, f"seeds.jsonl'?, {match}")
    # the next checkpoint of a live run does not rewrite it either
    with pytest.raises(SeedLogError):
        SeedLog(tmp_path / SEED_LOG).truncate_before(5)


def test_a_torn_last_line_is_dropped_with_a_warning_and_training_goes_on(tmp_path, reference):
    _train(tmp_path, 7)
    lines = _log_lines(tmp_path)
    (tmp_path / SEED_LOG).write_text("".join(lines[:-1]) + lines[-1][:12])  # step 6 cut off
    trainer, _, closure = _trainer(tmp_path)
    with pytest.warns(TornLogLineWarning, match=r"seeds.jsonl'?: line 3 is cut off"):
        assert trainer.resume() == 6
    assert (tmp_path / SEED_LOG).read_text() == "".join(lines[:-1])  # removed before appending
    for _ in range(6, 11):
        trainer.step(closure)
    trainer.close()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the log is clean again
        assert [e[0] for e in SeedLog(tmp_path / SEED_LOG).entries()] == [8, 9, 10]
    assert all(torch.equal(a, b) for a, b in zip(trainer.model.parameters(), reference))


def test_a_deleted_checkpoint_is_an_error_unless_the_log_starts_at_step_0(tmp_path, reference):
    _train(tmp_path, 7)  # the log holds steps 4..6 only
    (tmp_path / CHECKPOINT).unlink()
    _assert_refused(tmp_path, SeedLogError, r"starts at step 4 but there is no checkpoint")
    # a log from step 0 (no checkpoint written yet) is replayed in full: the same weights
    fresh = tmp_path / "fresh"
    _train(fresh, 7, checkpoint_every=0)
    assert [e[0] for e in SeedLog(fresh / SEED_LOG).entries()][0] == 0
    assert not (fresh / CHECKPOINT).exists()
    assert all(torch.equal(a, b) for a, b in zip(_train(fresh, 11, start=None), reference))


def test_a_gap_between_checkpoint_and_log_is_an_error(tmp_path) -> None:
    _train(tmp_path, 7)
    (tmp_path / SEED_LOG).write_text("".join(_log_lines(tmp_path)[1:]))  # 5, 6 after ckpt at 4
    _assert_refused(tmp_path, SeedLogError, r"starts at step 5 but the checkpoint .* at step 4")


class _Payload:
    """Unpickling this would create a file: the crafted checkpoint of the issue."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize(
    "content,match",
    [
        (lambda raw: b"", r"is empty \(0 bytes\)"),
        (lambda raw: raw[: len(raw) // 2], r"is truncated or corrupted"),
        (lambda raw: bytes(range(256)) * 3, r"is not a torch.save file"),
        (lambda raw: None, r"holds objects other than tensors"),
    ],
    ids=["empty", "truncated", "random-bytes", "crafted"],
)
def test_a_bad_checkpoint_is_an_error_naming_the_file(tmp_path, content, match) -> None:
    _train(tmp_path, 5)
    ckpt = tmp_path / CHECKPOINT
    marker = tmp_path.parent / f"{tmp_path.name}-code-ran"
    data = content(ckpt.read_bytes())
    if data is None:
        torch.save({"model": {}, "optimizer": {}, "codec": _Payload(marker), "step": 4}, ckpt)
    else:
        ckpt.write_bytes(data)
    _assert_refused(tmp_path, CheckpointError, f"checkpoint '.*{CHECKPOINT}' {match}")
    assert not marker.exists()  # weights_only=True: nothing in the file ran


def test_a_checkpoint_of_another_model_changes_nothing(tmp_path) -> None:
    _train(tmp_path, 5)
    state = load_checkpoint(tmp_path / CHECKPOINT)
    state["model"]["weight"] = torch.zeros(1, 7)
    torch.save(state, tmp_path / CHECKPOINT)
    _assert_refused(tmp_path, CheckpointError, r"does not fit this trainer's model")
    torch.save([1, 2], tmp_path / CHECKPOINT)
    _assert_refused(tmp_path, CheckpointError, r"is not a ZOTrainer checkpoint")


def test_the_checkpoint_loads_with_weights_only(tmp_path) -> None:
    _train(tmp_path, 5)
    state = torch.load(tmp_path / CHECKPOINT, weights_only=True)
    assert state["step"] == 4 and json.dumps(state["codec"])


def test_a_fresh_run_in_a_used_folder_is_refused_before_it_changes_anything(tmp_path) -> None:
    _train(tmp_path, 5)
    before = _snapshot(tmp_path)
    trainer, model, closure = _trainer(tmp_path)
    weights = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"holds a previous run \(checkpoint.pt, seeds.jsonl\)"):
        trainer.step(closure)  # without resume(): it would replace the checkpoint, mix the logs
    assert _snapshot(tmp_path) == before
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters()))
