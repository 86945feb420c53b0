"""Writes a bench result: ``results.json``, ``results.csv``, ``summary.json`` (``summary``) and
``index.html`` with its figures (``html``); and formats the terminal table.

Files are written to a temporary name and renamed into place, so an interrupted write never
leaves a truncated file. :func:`prepare_out_dir` refuses to reuse a non-empty directory.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from anyorder.bench.checks import OutDirError, check_out_dir, json_safe
from anyorder.bench.html import write_html_report
from anyorder.bench.runner import HistoryPoint, RunResult, SuiteResult
from anyorder.bench.summary import summarise
from anyorder.bench.targets import DEFAULT_TARGET_QUANTILE
from anyorder.core.files import atomic_write

__all__ = [
    "TABLE_COLUMNS",
    "prepare_out_dir",
    "write_report",
    "format_table",
    "atomic_write",
    "OutDirExistsError",
    "OutDirError",
    "load_results",
]

TABLE_COLUMNS = (
    "task",
    "optimizer",
    "final_loss",
    "metric_name",
    "metric",
    "time_per_step_s",
    "peak_memory_bytes",
    "inference_peak_memory_bytes",
    "forward_evals",
    "backward_evals",
    "diverged",
)
CSV_COLUMNS = TABLE_COLUMNS + (
    "steps",
    "steps_requested",
    "time_budget_s",
    "seed",
    "total_time_s",
    "inference_time_s",
    "forward_evals_per_step",
    "backward_evals_per_step",
    "hyperparameters",
    "task_options",
    "error",
)


class OutDirExistsError(FileExistsError):
    """The output directory exists and is not empty."""


def prepare_out_dir(path: str | Path) -> Path:
    """Create ``path``; a non-empty existing directory (or a file) is never overwritten, and a
    folder that cannot receive files is refused (:class:`~anyorder.bench.checks.OutDirError`)."""
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise OutDirExistsError(
            f"output directory {str(path)!r} already exists and is not empty; "
            "choose another --out or remove it"
        )
    check_out_dir(path)  # under a file, on /proc or /sys, not writable: OutDirError
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutDirError(
            f"output directory {str(path)!r} cannot be created: {err.strerror or err}"
        ) from None
    return path


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:.4g}"
    return str(value)


def _fmt_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _table_rows(result: SuiteResult) -> tuple[list[str], list[list[str]]]:
    header = [
        "task",
        "optimizer",
        "final loss",
        "metric",
        "value",
        "ms/step",
        "peak mem",
        "infer mem",
        "fwd",
        "bwd",
        "diverged",
    ]
    rows = []
    for r in result.runs:
        rows.append(
            [
                r.task,
                r.optimizer,
                _fmt(r.final_loss),
                r.metric_name,
                _fmt(r.metric),
                _fmt(r.time_per_step_s * 1e3) if r.time_per_step_s is not None else "-",
                _fmt_bytes(r.peak_memory_bytes),
                _fmt_bytes(r.inference_peak_memory_bytes),
                str(r.forward_evals),
                str(r.backward_evals),
                _fmt(r.diverged),
            ]
        )
    return header, rows


def format_table(result: SuiteResult, markdown: bool = False) -> str:
    """The end-of-run table (plain text, or Markdown for BENCHMARKS.md)."""
    header, rows = _table_rows(result)
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        return "\n".join(lines)
    widths = [
        max(len(h), *(len(row[i]) for row in rows)) if rows else len(h)
        for i, h in enumerate(header)
    ]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def _csv_bytes(runs: list[RunResult]) -> bytes:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(CSV_COLUMNS), lineterminator="\n")
    writer.writeheader()
    for r in runs:
        d = json_safe(r.to_dict())
        row = {k: d[k] for k in CSV_COLUMNS}
        row["hyperparameters"] = json.dumps(d["hyperparameters"], sort_keys=True)
        row["task_options"] = json.dumps(d["task_options"], sort_keys=True)
        writer.writerow(row)
    return buf.getvalue().encode()


def write_report(
    result: SuiteResult,
    out_dir: str | Path,
    *,
    declared_targets: Mapping[str, float | None] | None = None,
    target_quantile: float = DEFAULT_TARGET_QUANTILE,
) -> dict[str, Path]:
    """Write every output file into ``out_dir`` (which must exist); returns their paths:
    ``results.json``, ``results.csv``, ``summary.json`` (``anyorder.bench.summary``) and the
    page with its figures (``anyorder.bench.html``). ``declared_targets`` maps a task to the
    ``target_loss`` it declares; ``target_quantile`` sets the others' targets."""
    out = Path(out_dir)
    paths = {"json": out / "results.json", "csv": out / "results.csv"}
    data = json_safe(result.to_dict())  # NaN/inf anywhere (hyperparameters, monitor) -> null
    atomic_write(paths["json"], json.dumps(data, indent=1, allow_nan=False).encode())
    atomic_write(paths["csv"], _csv_bytes(result.runs))
    summary = summarise(
        result, declared_targets=declared_targets, target_quantile=target_quantile
    )
    paths["summary"] = out / "summary.json"
    atomic_write(
        paths["summary"], json.dumps(json_safe(summary), indent=1, allow_nan=False).encode()
    )
    paths.update(write_html_report(result, summary, out))
    return paths


def load_results(path: str | Path) -> SuiteResult:
    """Read a ``results.json`` back into a :class:`SuiteResult`."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    runs = [run_from_dict(r) for r in data.pop("runs")]
    return SuiteResult(**data, runs=runs)


def run_from_dict(data: dict[str, Any]) -> RunResult:
    """A :class:`RunResult` from its ``to_dict()`` form (``TypeError``/``KeyError`` if not)."""
    history = [HistoryPoint(**h) for h in data["history"]]
    return RunResult(**{**data, "history": history})
