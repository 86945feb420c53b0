"""The summary of a seeded bench: per task, per optimizer, means with 95% intervals over seeds,
time to target and paired differences against the best; across tasks, performance profiles and
the ranking table. Written to ``summary.json`` and shown by the HTML report.

Statistics are in ``stats`` (t intervals), targets in ``targets``, profiles and ranks in
``profiles``; this module only groups the runs and assembles the figures.

**Best optimizer** of a task: the lowest mean ``final_loss`` over seeds (quality at the equal
budget); **fastest**: the lowest median time to target in the primary measure (evaluation cost
under an evaluation or step budget, seconds under a wall-clock budget). Paired differences are
taken against the best: ``final_loss`` and ``metric`` of the optimizer minus the best's, seed by
seed.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from anyorder.bench import profiles, stats, targets
from anyorder.bench.budgets import DEFAULT_BACKWARD_COST

if TYPE_CHECKING:
    from anyorder.bench.runner import RunResult, SuiteResult

__all__ = ["PROFILE_TAUS", "summarise", "primary_measure", "format_summary"]

#: The tau grid the profile is tabulated on (1 to :data:`profiles.TAU_MAX`).
PROFILE_TAUS = [1.0 + 0.05 * i for i in range(61)]


def primary_measure(result: SuiteResult) -> str:
    """``seconds`` when the runs had a wall-clock budget, else ``evaluations``."""
    kinds = {(r.budget or {}).get("kind") for r in result.runs}
    return "seconds" if kinds == {"seconds"} else "evaluations"


def _by_task(runs: Sequence[RunResult]) -> dict[str, dict[str, list[RunResult]]]:
    out: dict[str, dict[str, list[RunResult]]] = {}
    for r in runs:
        out.setdefault(r.task, {}).setdefault(r.optimizer, []).append(r)
    return out


def _cost(r: RunResult) -> float:
    return float((r.budget or {}).get("backward_cost", DEFAULT_BACKWARD_COST))


def _inf_to_none(x: float) -> float | None:
    return x if math.isfinite(x) else None


def summarise(
    result: SuiteResult,
    *,
    declared_targets: Mapping[str, float | None] | None = None,
    target_quantile: float = targets.DEFAULT_TARGET_QUANTILE,
    level: float = 0.95,
) -> dict[str, Any]:
    """The summary dict (strict JSON: misses and missing values are ``None``)."""
    declared_targets = declared_targets or {}
    measure = primary_measure(result)
    grouped = _by_task(result.runs)
    tasks_out: dict[str, Any] = {}
    times: dict[str, dict[str, dict[str, float]]] = {m: {} for m in targets.MEASURES}
    per_problem: dict[tuple[str, int], dict[str, tuple[float, float]]] = {}
    for task, by_opt in grouped.items():
        all_runs = [r for rs in by_opt.values() for r in rs]
        target, source = targets.task_target(
            all_runs, declared=declared_targets.get(task), q=target_quantile
        )
        opt_out: dict[str, Any] = {}
        finals: dict[str, dict[int, float | None]] = {}
        metrics: dict[str, dict[int, float | None]] = {}
        for opt, rs in by_opt.items():
            ttts = {r.seed: targets.time_to_target(r.history, target, backward_cost=_cost(r))
                    for r in rs}
            bests = {r.seed: targets.best_loss(r.history) for r in rs}
            finals[opt] = {r.seed: r.final_loss for r in rs}
            metrics[opt] = {r.seed: r.metric for r in rs}
            for r in rs:
                ttt = ttts[r.seed]
                best = bests[r.seed]
                per_problem.setdefault((task, r.seed), {})[opt] = (
                    ttt.get(measure),
                    best if best is not None else math.inf,
                )
            ttt_out: dict[str, Any] = {}
            for m in targets.MEASURES:
                values = [t.get(m) for t in ttts.values()]
                median = targets.median_with_misses(values)
                times[m].setdefault(task, {})[opt] = median
                ttt_out[m] = {
                    "median": _inf_to_none(median),
                    "reached_mean": stats.t_interval(
                        [v for v in values if math.isfinite(v)], level
                    ).to_dict(),
                }
            opt_out[opt] = {
                "seeds": sorted(r.seed for r in rs),
                "diverged": sum(r.diverged for r in rs),
                "final_loss": stats.t_interval(list(finals[opt].values()), level).to_dict(),
                "metric": stats.t_interval(list(metrics[opt].values()), level).to_dict(),
                "best_loss": stats.t_interval(list(bests.values()), level).to_dict(),
                "evaluation_cost": stats.t_interval(
                    [
                        (r.forward_evals + _cost(r) * r.backward_evals) if r.history else None
                        for r in rs
                    ],
                    level,
                ).to_dict(),
                "reached_fraction": sum(t.reached for t in ttts.values()) / len(rs),
                "time_to_target": ttt_out,
                "time_to_target_by_seed": {
                    str(s): t.to_dict() for s, t in sorted(ttts.items())
                },
            }
        means = {
            opt: o["final_loss"]["mean"]
            for opt, o in opt_out.items()
            if o["final_loss"]["mean"] is not None
        }
        best = min(means, key=lambda o: (means[o], o)) if means else None
        fast_times = {o: t for o, t in times[measure][task].items() if math.isfinite(t)}
        fastest = min(fast_times, key=lambda o: (fast_times[o], o)) if fast_times else None
        if best is not None:
            for opt in opt_out:
                opt_out[opt]["paired_vs_best"] = {
                    "final_loss": stats.paired_difference(
                        finals[opt], finals[best], level
                    ).to_dict(),
                    "metric": stats.paired_difference(
                        metrics[opt], metrics[best], level
                    ).to_dict(),
                }
        first = all_runs[0]
        tasks_out[task] = {
            "target": target,
            "target_source": source,
            "metric_name": first.metric_name,
            "higher_is_better": first.higher_is_better,
            "best_optimizer": best,
            "fastest_optimizer": fastest,
            "optimizers": opt_out,
        }
    profile_out: dict[str, Any] = {}
    for m in targets.MEASURES:
        profile_out[m] = {
            "taus": PROFILE_TAUS,
            "rho": profiles.performance_profile(times[m], PROFILE_TAUS),
            "score": profiles.profile_score(times[m]),
        }
    table = profiles.ranking_table(per_problem, profile_out[measure]["score"])
    return {
        "measure": measure,
        "level": level,
        "interval": "Student t over seeds (anyorder.bench.stats)",
        "smoothing_window": targets.SMOOTHING_WINDOW,
        "target_quantile": target_quantile,
        "tau_max": profiles.TAU_MAX,
        "seeds": list(result.seeds) or [result.seed],
        "tasks": tasks_out,
        "profiles": profile_out,
        "ranking": [row.to_dict() for row in table],
    }


def format_summary(path_or_summary: str | Path | Mapping[str, Any]) -> str:
    """The end-of-run text of a seeded bench: the ranking table, then per task its target, the
    best optimizer (mean final loss with its interval) and the fastest to target."""
    summary = (
        json.loads(Path(path_or_summary).read_text(encoding="utf-8"))
        if isinstance(path_or_summary, (str, Path))
        else path_or_summary
    )

    def num(x: float | None) -> str:
        return "-" if x is None else f"{x:.4g}"

    m = summary["measure"]
    lines = [
        f"ranking over (task, seed) by {m} to target; seeds {summary['seeds']}",
        f"{'optimizer':16s} {'mean rank':>9s} {'median':>6s} {'IQR':>11s} {'tasks':>5s} "
        f"{'profile':>7s}",
    ]
    for r in summary["ranking"]:
        iqr = f"{r['rank_q25']:g}-{r['rank_q75']:g}"
        lines.append(
            f"{r['optimizer']:16s} {r['mean_rank']:9.2f} {r['median_rank']:6g} {iqr:>11s} "
            f"{r['tasks']:5d} {num(r['profile_score']):>7s}"
        )
    lines.append("")
    for task, info in summary["tasks"].items():
        best = info["best_optimizer"]
        fl = info["optimizers"][best]["final_loss"] if best else None
        ci = (
            f" [{num(fl['low'])}, {num(fl['high'])}]" if fl and fl["low"] is not None else ""
        )
        lines.append(
            f"{task}: target {num(info['target'])}; best {best} (final loss "
            f"{num(fl['mean'] if fl else None)}{ci}); fastest to target "
            f"{info['fastest_optimizer']}"
        )
    return "\n".join(lines)
