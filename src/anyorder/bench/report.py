"""Writes a bench result: ``results.json``, ``results.csv``, one PNG per task and ``index.html``;
and formats the terminal table.

Files are written to a temporary name and renamed into place, so an interrupted write never
leaves a truncated file. :func:`prepare_out_dir` refuses to reuse a non-empty directory.
"""

from __future__ import annotations

import csv
import html
import io
import json
import math
from pathlib import Path
from typing import Any

from anyorder.bench.checks import OutDirError, check_out_dir, json_safe
from anyorder.bench.runner import HistoryPoint, RunResult, SuiteResult
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


def _plot_task(task: str, runs: list[RunResult], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), constrained_layout=True)
    xs = (
        ("step", "step"),
        ("wall_time_s", "wall time (s)"),
        ("forward_evals", "forward evaluations"),
    )
    positive = all(h.loss is None or h.loss > 0 for r in runs for h in r.history)
    for r in runs:
        pts = [h for h in r.history if h.loss is not None]
        if not pts:
            continue
        for ax, (key, _label) in zip(axes, xs):
            label = r.optimizer + (" (diverged)" if r.diverged else "")
            ax.plot([getattr(h, key) for h in pts], [h.loss for h in pts], label=label, lw=1.2)
    for ax, (_key, label) in zip(axes, xs):
        ax.set_xlabel(label)
        ax.set_ylabel("training loss")
        if positive:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{task}: loss against step, wall time and forward evaluations")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    atomic_write(path, buf.getvalue())


def _html(result: SuiteResult, plots: dict[str, str]) -> str:
    header, rows = _table_rows(result)
    esc = html.escape
    table = (
        "<table><thead><tr>"
        + "".join(f"<th>{esc(h)}</th>" for h in header)
        + "</tr></thead><tbody>"
    )
    for row, run in zip(rows, result.runs):
        cls = ' class="diverged"' if run.diverged else ""
        table += f"<tr{cls}>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>"
    table += "</tbody></table>"
    figures = "".join(
        f'<figure><img src="{esc(src)}" alt="loss curves for {esc(task)}">'
        f"<figcaption>{esc(task)}</figcaption></figure>"
        for task, src in plots.items()
    )
    machine = ", ".join(f"{esc(str(k))}: {esc(str(v))}" for k, v in result.machine.items())
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>anyorder bench ({esc(result.suite)})</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; }}
table {{ border-collapse: collapse; font-size: 0.9em; }}
th, td {{ border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: right; }}
td:nth-child(-n+2), th:nth-child(-n+2) {{ text-align: left; }}
tr.diverged {{ background: #fdd; }}
figure {{ margin: 1.5em 0; }} img {{ max-width: 100%; }}
</style></head><body>
<h1>anyorder bench: {esc(result.suite)} suite</h1>
<p>anyorder {esc(result.anyorder_version)}, created {esc(result.created)}, seed {result.seed},
device {esc(result.device)}.<br><small>{machine}</small></p>
<p>Time per step: median after warm-up. Peak memory: tensor bytes allocated during training steps
above those held before (see the README). Files: <a href="results.json">results.json</a>,
<a href="results.csv">results.csv</a>.</p>
{table}
{figures}
</body></html>
"""


def write_report(result: SuiteResult, out_dir: str | Path) -> dict[str, Path]:
    """Write every output file into ``out_dir`` (which must exist); returns their paths."""
    out = Path(out_dir)
    paths = {"json": out / "results.json", "csv": out / "results.csv", "html": out / "index.html"}
    data = json_safe(result.to_dict())  # NaN/inf anywhere (hyperparameters, monitor) -> null
    atomic_write(paths["json"], json.dumps(data, indent=1, allow_nan=False).encode())
    atomic_write(paths["csv"], _csv_bytes(result.runs))
    plots: dict[str, str] = {}
    by_task: dict[str, list[RunResult]] = {}
    for r in result.runs:
        by_task.setdefault(r.task, []).append(r)
    for task, runs in by_task.items():
        name = f"{task}.png"
        _plot_task(task, runs, out / name)
        plots[task] = name
        paths[f"plot:{task}"] = out / name
    atomic_write(paths["html"], _html(result, plots).encode())
    return paths


def load_results(path: str | Path) -> SuiteResult:
    """Read a ``results.json`` back into a :class:`SuiteResult`."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    runs = [
        RunResult(**{**r, "history": [HistoryPoint(**h) for h in r["history"]]})
        for r in data.pop("runs")
    ]
    return SuiteResult(**data, runs=runs)
