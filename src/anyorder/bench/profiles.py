"""Summaries across tasks: performance profiles and a ranking table with its spread.

**Performance profile** (Dolan & Moré, 2002; the summary of AlgoPerf, Dahl et al., 2023). For
each task ``t`` and optimizer ``o`` take the time to target ``T[t][o]`` (``inf`` when not
reached). The performance ratio is ``r[t][o] = T[t][o] / min_o' T[t][o']`` (``inf`` when the
optimizer missed, or when no optimizer reached the task's target), and the profile of ``o`` is

    rho_o(tau) = |{t : r[t][o] <= tau}| / |tasks o ran on|,

the fraction of tasks on which ``o`` was within a factor ``tau`` of the fastest. An optimizer
that does not apply to a task (a particle method on a language model) is left out of that
task's denominator rather than counted as a failure; the ranking table says on how many tasks
each one ran. The **profile score** is AlgoPerf's normalised area under the profile,
``(1 / (tau_max - 1)) * integral_1^tau_max rho_o(tau) dtau``, in closed form
``mean_t max(0, tau_max - max(r[t][o], 1)) / (tau_max - 1)`` (1 = fastest everywhere, 0 = never
within ``tau_max``); AlgoPerf uses ``tau_max = 4``, as we do.

**Ranking.** On every (task, seed), optimizers are ranked by time to target (fastest first);
those that missed follow, ordered by the best smoothed loss they reached; ties share the mean
rank. The table reports each optimizer's mean rank and its spread: the median and the
interquartile range of its ranks over all (task, seed) pairs, so a method that is first on some
problems and last on others shows a wide band.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from anyorder.bench.targets import quantile

__all__ = [
    "TAU_MAX",
    "performance_ratios",
    "performance_profile",
    "profile_score",
    "ranks",
    "RankRow",
    "ranking_table",
]

#: Upper end of the profile's tau axis and of the score's integral (AlgoPerf's value).
TAU_MAX = 4.0


def performance_ratios(
    times: Mapping[str, Mapping[str, float]],
) -> dict[str, dict[str, float]]:
    """``r[task][optimizer]`` from ``times[task][optimizer]`` (``inf`` = not reached)."""
    out: dict[str, dict[str, float]] = {}
    for task, row in times.items():
        for opt, t in row.items():
            if t is None or (isinstance(t, float) and math.isnan(t)) or t < 0:
                raise ValueError(
                    f"time to target of {opt!r} on {task!r} must be >= 0 or inf, got {t!r}"
                )
        best = min(row.values(), default=math.inf)
        out[task] = {opt: _ratio(t, best) for opt, t in row.items()}
    return out


def _ratio(t: float, best: float) -> float:
    if not (math.isfinite(t) and math.isfinite(best)):
        return math.inf
    if best == 0:
        return 1.0 if t == 0 else math.inf
    return t / best


def performance_profile(
    times: Mapping[str, Mapping[str, float]], taus: Sequence[float]
) -> dict[str, list[float]]:
    """``rho_o(tau)`` for every optimizer and every ``tau`` in ``taus``."""
    ratios = performance_ratios(times)
    optimizers = sorted({o for row in ratios.values() for o in row})
    profile: dict[str, list[float]] = {}
    for opt in optimizers:
        rs = [row[opt] for row in ratios.values() if opt in row]
        profile[opt] = [sum(r <= tau for r in rs) / len(rs) for tau in taus]
    return profile


def profile_score(
    times: Mapping[str, Mapping[str, float]], tau_max: float = TAU_MAX
) -> dict[str, float]:
    """AlgoPerf's normalised area under each optimizer's profile on ``[1, tau_max]``."""
    if not tau_max > 1:
        raise ValueError(f"tau_max must be > 1, got {tau_max!r}")
    ratios = performance_ratios(times)
    optimizers = sorted({o for row in ratios.values() for o in row})
    scores: dict[str, float] = {}
    for opt in optimizers:
        rs = [row[opt] for row in ratios.values() if opt in row]
        area = sum(max(0.0, tau_max - max(r, 1.0)) for r in rs if math.isfinite(r))
        scores[opt] = area / (len(rs) * (tau_max - 1))
    return scores


def ranks(keys: Mapping[str, tuple[float, float]]) -> dict[str, float]:
    """Ranks (1 = best) of optimizers by ``(time to target, best loss)``, ties sharing the mean
    rank. Pass ``inf`` as the time of a miss so misses follow, ordered by best loss."""
    order = sorted(keys, key=lambda o: keys[o])
    out: dict[str, float] = {}
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and keys[order[j + 1]] == keys[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return out


@dataclass(frozen=True)
class RankRow:
    """One optimizer's line in the ranking table."""

    optimizer: str
    mean_rank: float
    median_rank: float
    rank_q25: float
    rank_q75: float
    problems: int  # (task, seed) pairs ranked
    tasks: int
    profile_score: float | None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)


def ranking_table(
    per_problem: Mapping[tuple[str, int], Mapping[str, tuple[float, float]]],
    scores: Mapping[str, float] | None = None,
) -> list[RankRow]:
    """The ranking table from ``per_problem[(task, seed)][optimizer] = (time, best loss)``,
    sorted by mean rank (then profile score, then name)."""
    collected: dict[str, list[float]] = {}
    tasks: dict[str, set[str]] = {}
    for (task, _seed), keys in per_problem.items():
        for opt, rank in ranks(keys).items():
            collected.setdefault(opt, []).append(rank)
            tasks.setdefault(opt, set()).add(task)
    rows = [
        RankRow(
            optimizer=opt,
            mean_rank=sum(rs) / len(rs),
            median_rank=quantile(rs, 0.5),
            rank_q25=quantile(rs, 0.25),
            rank_q75=quantile(rs, 0.75),
            problems=len(rs),
            tasks=len(tasks[opt]),
            profile_score=None if scores is None else scores.get(opt),
        )
        for opt, rs in collected.items()
    ]
    rows.sort(key=lambda r: (r.mean_rank, -(r.profile_score or 0.0), r.optimizer))
    return rows
