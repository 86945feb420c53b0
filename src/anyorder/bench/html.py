"""The bench report as a static page: ``index.html`` with the ranking table, performance profiles
(``profiles.png``, ``ranking.png``) and one section per task (linked from the summary) whose
table highlights the best optimizer and whose figure (``task-<name>.png``) draws the loss curves
as small multiples: one panel per optimizer, its median over seeds with the interquartile band,
the other optimizers' medians in grey behind it and the task's target as a dashed line. Every
file is local (no network); images that fail to load are flagged on the page by a small script.
"""

from __future__ import annotations

import html
import io
import math
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from anyorder.bench.budgets import DEFAULT_BACKWARD_COST, evaluation_cost
from anyorder.bench.targets import MEASURES, SMOOTHING_WINDOW, smoothed
from anyorder.core.files import atomic_write

if TYPE_CHECKING:
    from anyorder.bench.runner import RunResult, SuiteResult

__all__ = ["write_html_report", "task_anchor"]

_MEASURE_LABEL = {
    "steps": "steps",
    "evaluations": "evaluation cost (forward + r x backward)",
    "seconds": "seconds",
}


def task_anchor(task: str) -> str:
    """The element id of a task's section."""
    return "task-" + re.sub(r"[^A-Za-z0-9_-]", "-", task)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    _pyplot().close(fig)
    return buf.getvalue()


def _band(
    runs: list[RunResult], measure: str
) -> tuple[list[float], list[float], list[float], list[float]]:
    """x (median over seeds of the measure at each step), median, q25, q75 of the smoothed loss
    over seeds, step by step while at least half the seeds still have a value."""
    import numpy as np

    curves, xs = [], []
    for r in runs:
        c = smoothed([h.loss for h in r.history])
        curves.append(c)
        cost = (r.budget or {}).get("backward_cost", DEFAULT_BACKWARD_COST)
        if measure == "evaluations":
            xs.append([evaluation_cost(h, cost) for h in r.history[: len(c)]])
        elif measure == "seconds":
            xs.append([h.wall_time_s for h in r.history[: len(c)]])
        else:
            xs.append([h.step + 1 for h in r.history[: len(c)]])
    n = max((len(c) for c in curves), default=0)
    out: tuple[list[float], list[float], list[float], list[float]] = ([], [], [], [])
    for i in range(n):
        ys = [c[i] for c in curves if len(c) > i]
        if 2 * len(ys) < len(curves):
            break
        q25, med, q75 = np.quantile(ys, [0.25, 0.5, 0.75])
        out[0].append(float(np.median([x[i] for x in xs if len(x) > i])))
        out[1].append(float(med))
        out[2].append(float(q25))
        out[3].append(float(q75))
    return out


def _plot_task(task: str, by_opt: dict[str, list[RunResult]], info: dict[str, Any],
               measure: str) -> bytes:
    plt = _pyplot()
    names = sorted(by_opt)
    ncols = min(4, len(names))
    nrows = math.ceil(len(names) / ncols)
    # a fixed layout (constrained layout measures every tick label: seconds per figure)
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(3.2 * ncols, 2.3 * nrows + 0.9), sharex=True, sharey=True,
        squeeze=False,
    )
    height = 2.3 * nrows + 0.9
    fig.subplots_adjust(left=0.08, right=0.99, bottom=0.5 / height, top=1 - 0.55 / height,
                        wspace=0.08, hspace=0.3)
    bands = {o: _band(by_opt[o], measure) for o in names}
    positive = all(v > 0 for b in bands.values() for v in b[2])
    best = info.get("best_optimizer")
    target = info.get("target")
    for ax, opt in zip(axes.flat, names):
        for other in names:
            if other != opt and bands[other][0]:
                ax.plot(bands[other][0], bands[other][1], color="0.82", lw=0.8, zorder=1)
        x, med, lo, hi = bands[opt]
        color = "#c0392b" if opt == best else "#1f5fa8"
        if x:
            ax.fill_between(x, lo, hi, color=color, alpha=0.25, lw=0, zorder=2)
            ax.plot(x, med, color=color, lw=1.6, zorder=3)
        if target is not None and (target > 0 or not positive):
            ax.axhline(target, color="k", ls="--", lw=0.8, zorder=4)
        o = info["optimizers"][opt]
        title = f"{opt}  ({o['reached_fraction']:.0%} reach)"
        ax.set_title(("★ " if opt == best else "") + title, fontsize=9,
                     color=color, fontweight="bold" if opt == best else "normal")
        if positive:
            ax.set_yscale("log")
        if measure != "steps":  # costs per step differ by orders of magnitude (particles)
            ax.set_xscale("log")
        ax.minorticks_off()
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(names):]:
        ax.set_visible(False)
    fig.supxlabel(_MEASURE_LABEL[measure], fontsize=9)
    fig.supylabel(f"training loss (moving mean of {SMOOTHING_WINDOW} steps)", fontsize=9)
    fig.suptitle(
        f"{task}: median over seeds and interquartile band; grey: the other optimizers; "
        "dashed: target", fontsize=10,
    )
    return _png(fig)


def _styles(names: list[str]) -> dict[str, dict[str, Any]]:
    plt = _pyplot()
    cmap = plt.get_cmap("tab20")
    dashes = ["-", "--", ":", "-."]
    # ten distinct hues first (tab20's even entries), then their light partners dashed
    return {
        n: {"color": cmap((2 * (i % 10) + (i // 10)) % 20), "ls": dashes[(i // 10) % 4]}
        for i, n in enumerate(names)
    }


def _plot_profiles(summary: dict[str, Any]) -> bytes:
    plt = _pyplot()
    names = sorted({o for m in MEASURES for o in summary["profiles"][m]["rho"]})
    style = _styles(names)
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2), sharey=True, constrained_layout=True)
    for ax, m in zip(axes, MEASURES):
        prof = summary["profiles"][m]
        for opt in names:
            if opt in prof["rho"]:
                ax.step(prof["taus"], prof["rho"][opt], where="post", lw=1.5, label=opt,
                        **style[opt])
        ax.set_title(f"time to target in {m}", fontsize=10)
        ax.set_xlabel("tau (factor of the fastest)")
        ax.set_xlim(1, summary["tau_max"])
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("fraction of tasks within tau")
    axes[0].set_ylim(-0.02, 1.02)
    axes[-1].legend(fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5), frameon=False)
    fig.suptitle("Performance profiles (higher and further left is better)", fontsize=11)
    return _png(fig)


def _plot_ranking(summary: dict[str, Any]) -> bytes:
    plt = _pyplot()
    rows = summary["ranking"]
    fig, ax = plt.subplots(figsize=(7, 0.32 * len(rows) + 1.2), constrained_layout=True)
    for i, row in enumerate(rows):
        ax.plot([row["rank_q25"], row["rank_q75"]], [i, i], color="#1f5fa8", lw=5, alpha=0.35)
        ax.plot(row["mean_rank"], i, "o", color="#1f5fa8")
        ax.plot(row["median_rank"], i, "|", color="k", ms=10)
    ax.set_yticks(range(len(rows)), [r["optimizer"] for r in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("rank over (task, seed): dot mean, bar median, band interquartile range")
    ax.grid(axis="x", alpha=0.3)
    return _png(fig)


def _num(x: Any, digits: int = 4) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.{digits}g}"
    return str(x)


def _ci(iv: dict[str, Any]) -> str:
    if iv["mean"] is None:
        return "–"
    if iv["low"] is None:
        return _num(iv["mean"])
    return (f"{_num(iv['mean'])} <span class=ci>[{_num(iv['low'], 3)}, "
            f"{_num(iv['high'], 3)}]</span>")


def _diff(iv: dict[str, Any]) -> str:
    if iv["mean"] is None:
        return "–"
    text = _ci(iv)
    if iv["low"] is not None and (iv["low"] > 0 or iv["high"] < 0):
        return f'<span class="sig">{text}</span>'
    return text


def _task_section(task: str, info: dict[str, Any], measure: str, image: str) -> str:
    esc = html.escape
    best, fastest = info["best_optimizer"], info["fastest_optimizer"]
    rows = []
    order = sorted(
        info["optimizers"],
        key=lambda o: (info["optimizers"][o]["final_loss"]["mean"] is None,
                       info["optimizers"][o]["final_loss"]["mean"] or 0.0, o),
    )
    for opt in order:
        o = info["optimizers"][opt]
        t = o["time_to_target"]
        cls = ' class="best"' if opt == best else ""
        paired = o.get("paired_vs_best", {})
        cells = [
            esc(opt) + (" ★" if opt == best else "") + (" ⚡" if opt == fastest else ""),
            _ci(o["final_loss"]),
            _diff(paired["final_loss"]) if paired and opt != best else "–",
            _ci(o["metric"]),
            _diff(paired["metric"]) if paired and opt != best else "–",
            f"{o['reached_fraction']:.0%}",
            *(_num(t[m]["median"]) for m in MEASURES),
            str(o["diverged"]),
        ]
        rows.append(f"<tr{cls}>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    header = ["optimizer", "final loss", "Δ vs best (paired)",
              f"{esc(info['metric_name'])}", "Δ vs best (paired)", "reached target",
              "steps to target", "evaluations to target", "seconds to target", "diverged"]
    target = _num(info["target"])
    return f"""
<section id="{task_anchor(task)}">
<h2>{esc(task)}</h2>
<p>Target loss {target} ({esc(info['target_source'])}). Best final loss:
<b>{esc(str(best))}</b> ★; fastest to target ({esc(measure)}): <b>{esc(str(fastest))}</b> ⚡.
{esc(info['metric_name'])}: {'higher' if info['higher_is_better'] else 'lower'} is better.</p>
<table class="task"><thead><tr>{''.join(f'<th>{h}</th>' for h in header)}</tr></thead>
<tbody>{''.join(rows)}</tbody></table>
<figure><img src="{esc(image)}" alt="loss curves for {esc(task)}"></figure>
<p><a href="#top">back to the summary</a></p>
</section>"""


def _page(result: SuiteResult, summary: dict[str, Any], images: dict[str, str]) -> str:
    esc = html.escape
    measure = summary["measure"]
    rank_rows = "".join(
        "<tr>" + "".join(f"<td>{c}</td>" for c in (
            f"{i + 1}", esc(r["optimizer"]), f"{r['mean_rank']:.2f}", f"{r['median_rank']:g}",
            f"{r['rank_q25']:g}–{r['rank_q75']:g}", str(r["tasks"]), str(r["problems"]),
            _num(r["profile_score"], 3),
        )) + "</tr>"
        for i, r in enumerate(summary["ranking"])
    )
    task_rows = "".join(
        f'<tr><td><a href="#{task_anchor(t)}">{esc(t)}</a></td><td>{_num(info["target"])}</td>'
        f"<td>{esc(str(info['best_optimizer']))}</td>"
        f"<td>{esc(str(info['fastest_optimizer']))}</td></tr>"
        for t, info in summary["tasks"].items()
    )
    sections = "".join(
        _task_section(t, info, measure, images[t]) for t, info in summary["tasks"].items()
    )
    seeds = ", ".join(str(s) for s in summary["seeds"])
    machine = ", ".join(f"{esc(str(k))}: {esc(str(v))}" for k, v in result.machine.items())
    budgets = sorted({(r.budget or {}).get("kind", "steps") for r in result.runs})
    cost = sorted({(r.budget or {}).get("backward_cost", DEFAULT_BACKWARD_COST)
                   for r in result.runs})
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>anyorder bench ({esc(result.suite)})</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; max-width: 1400px; color: #222; }}
table {{ border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0 1em; }}
th, td {{ border: 1px solid #ccc; padding: 0.25em 0.55em; text-align: right; }}
td:first-child, th:first-child {{ text-align: left; }}
table#ranking td:nth-child(2) {{ text-align: left; font-weight: 600; }}
tr.best {{ background: #fdecea; font-weight: 600; }}
.ci {{ color: #777; font-size: 0.9em; }}
.sig {{ color: #a61b1b; }}
figure {{ margin: 1em 0; }} img {{ max-width: 100%; }}
#broken {{ display: none; background: #fdd; padding: 0.5em; }}
section {{ border-top: 2px solid #eee; margin-top: 2em; }}
</style></head><body id="top">
<h1>anyorder bench: {esc(result.suite)} suite</h1>
<p id="broken">Some figures did not load: keep the PNG files beside index.html.</p>
<p>anyorder {esc(result.anyorder_version)}, created {esc(result.created)}, paired seeds
{esc(seeds)}, device {esc(result.device)}, budget {esc(', '.join(budgets))}, backward cost
{esc(', '.join(f'{c:g}' for c in cost))} forward evaluations.<br><small>{machine}</small></p>
<p>Figures are means over seeds with 95% Student-t intervals in brackets; Δ vs best is the paired
difference (seed by seed) to the task's best optimizer, red where its interval excludes 0.
Time to target: first step whose loss, averaged over the last {summary['smoothing_window']}
steps, reaches the task's target; the median over seeds counts a miss as never. Rankings and
profiles use the {esc(measure)} to target. Files: <a href="results.json">results.json</a>,
<a href="summary.json">summary.json</a>, <a href="results.csv">results.csv</a>.</p>
<h2>Ranking</h2>
<table id="ranking"><thead><tr><th>#</th><th>optimizer</th><th>mean rank</th>
<th>median rank</th><th>interquartile range</th><th>tasks</th><th>(task, seed) pairs</th>
<th>profile score</th></tr></thead><tbody>{rank_rows}</tbody></table>
<figure><img src="ranking.png" alt="ranks with their spread"></figure>
<h2>Performance profiles</h2>
<figure><img src="profiles.png" alt="performance profiles"></figure>
<h2>Tasks</h2>
<table id="tasks"><thead><tr><th>task</th><th>target loss</th><th>best final loss</th>
<th>fastest to target</th></tr></thead><tbody>{task_rows}</tbody></table>
{sections}
<script>
window.addEventListener("load", function () {{
  var bad = Array.prototype.filter.call(document.images, function (im) {{
    return !(im.complete && im.naturalWidth > 0);
  }});
  document.body.setAttribute("data-images-ok", bad.length === 0 ? "yes" : "no");
  if (bad.length) {{ document.getElementById("broken").style.display = "block"; }}
}});
</script>
</body></html>
"""


def write_html_report(result: SuiteResult, summary: dict[str, Any], out_dir: str | Path
                      ) -> dict[str, Path]:
    """Write ``index.html``, ``profiles.png``, ``ranking.png`` and ``task-<name>.png`` into
    ``out_dir``; returns their paths."""
    out = Path(out_dir)
    paths: dict[str, Path] = {}
    by_task: dict[str, dict[str, list[RunResult]]] = {}
    for r in result.runs:
        by_task.setdefault(r.task, {}).setdefault(r.optimizer, []).append(r)
    images: dict[str, str] = {}
    for task, info in summary["tasks"].items():
        name = f"{task_anchor(task)}.png"
        atomic_write(out / name, _plot_task(task, by_task[task], info, summary["measure"]))
        images[task] = name
        paths[f"plot:{task}"] = out / name
    for name, fig in (("profiles.png", _plot_profiles), ("ranking.png", _plot_ranking)):
        atomic_write(out / name, fig(summary))
        paths[name] = out / name
    atomic_write(out / "index.html", _page(result, summary, images).encode())
    paths["html"] = out / "index.html"
    return paths
