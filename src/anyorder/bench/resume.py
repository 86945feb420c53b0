"""Resuming an interrupted bench (``anyorder bench --resume DIR``).

While a suite runs, every finished run is saved at once to ``DIR/runs/`` (one JSON file per
(task, optimizer, seed), written atomically), and the settings of the invocation to
``DIR/bench.json`` before the first run starts (the config file's *content*, not its path, so
an edited config cannot change a resumed suite). ``--resume DIR`` reads the settings back, plans
the same suite, loads the finished runs (each validated: a file that does not parse into a run
of the planned suite is an error naming it, never silently redone or dropped) and runs only the
rest. The final ``results.json`` then holds the runs in the same order as an uninterrupted run's
and the same numbers, apart from the timings: ``created``, ``time_per_step_s``,
``total_time_s``, ``inference_time_s``, ``history[].wall_time_s``, the monitor's seconds, and
with them the seconds to target in ``summary.json``. (Under ``--time-budget`` the number of
steps a run completes depends on timing too, so those runs are not reproducible anyway.)
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from anyorder.bench.report import run_from_dict
from anyorder.bench.runner import RunResult
from anyorder.core.files import atomic_write, strict_json_bytes

__all__ = ["SETTINGS_FILE", "RUNS_DIR", "RunStore", "save_settings", "load_settings", "ResumeError"]

SETTINGS_FILE = "bench.json"
RUNS_DIR = "runs"
_SETTINGS_VERSION = 1


class ResumeError(ValueError):
    """A directory that cannot be resumed; the message says why."""


def save_settings(out_dir: Path, settings: dict[str, Any]) -> Path:
    """Write the invocation's settings (JSON-ready values) to ``out_dir/bench.json``."""
    path = Path(out_dir) / SETTINGS_FILE
    data = {"version": _SETTINGS_VERSION, "settings": settings}
    try:
        text = json.dumps(data, indent=1, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as err:  # e.g. a TOML date in the config
        raise ValueError(
            f"the settings cannot be saved for --resume: {err} (use plain numbers, strings, "
            "lists and tables in the config)"
        ) from err
    atomic_write(path, text.encode())
    return path


def load_settings(out_dir: str | Path) -> dict[str, Any]:
    """The settings saved in ``out_dir/bench.json``; :class:`ResumeError` when absent or bad."""
    path = Path(out_dir) / SETTINGS_FILE
    if not Path(out_dir).is_dir():
        raise ResumeError(f"cannot resume {str(out_dir)!r}: no such directory")
    if not path.is_file():
        raise ResumeError(
            f"cannot resume {str(out_dir)!r}: it has no {SETTINGS_FILE} (not an anyorder bench "
            "directory, or from a version without --resume)"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ResumeError(f"cannot resume: {str(path)!r} is not valid JSON ({err})") from err
    if (
        not isinstance(data, dict)
        or data.get("version") != _SETTINGS_VERSION
        or not isinstance(data.get("settings"), dict)
    ):
        raise ResumeError(f"cannot resume: {str(path)!r} is not a bench settings file")
    return data["settings"]


def _file_name(task: str, optimizer: str, seed: int) -> str:
    def clean(s: str) -> str:
        return re.sub(r"[^A-Za-z0-9_.-]", "_", s)

    # the clean names keep files readable; the JSON inside is what is matched on load
    return f"{clean(task)}__{clean(optimizer)}__seed{seed}.json"


class RunStore:
    """The finished runs of one bench directory."""

    def __init__(self, out_dir: str | Path) -> None:
        self.dir = Path(out_dir) / RUNS_DIR

    def save(self, result: RunResult) -> Path:
        """Save one finished run (atomically)."""
        self.dir.mkdir(exist_ok=True)
        path = self.dir / _file_name(result.task, result.optimizer, result.seed)
        atomic_write(path, strict_json_bytes(result.to_dict()))
        return path

    def load(self) -> dict[tuple[str, str, int], RunResult]:
        """Every saved run keyed by ``(task, optimizer, seed)``; :class:`ResumeError` names a
        file that is not a saved run."""
        found: dict[tuple[str, str, int], RunResult] = {}
        if not self.dir.is_dir():
            return found
        for path in sorted(self.dir.glob("*.json")):
            try:
                run = run_from_dict(json.loads(path.read_text(encoding="utf-8")))
            except (OSError, ValueError, TypeError, KeyError) as err:
                raise ResumeError(
                    f"cannot resume: {str(path)!r} is not a saved run ({type(err).__name__}: "
                    f"{str(err).splitlines()[0] if str(err) else ''}); move it away to redo "
                    "that run"
                ) from err
            if path.name != _file_name(run.task, run.optimizer, run.seed):
                raise ResumeError(
                    f"cannot resume: {str(path)!r} holds the run of {run.task} / "
                    f"{run.optimizer} / seed {run.seed}, which belongs in another file"
                )
            found[(run.task, run.optimizer, run.seed)] = run
        return found
