"""Time to target: how many steps, evaluations and seconds a run needs to reach a task's target.

**The curve.** A run's history holds the training loss of every step (a minibatch loss, so noisy).
It is smoothed by a trailing moving mean over :data:`SMOOTHING_WINDOW` steps (fewer at the
start): ``smooth[i] = mean(loss[max(0, i - w + 1) : i + 1])``. A step whose loss is ``null``
(non-finite) makes the rest of the curve unusable (the run diverged there).

**The target** of a task is, in order of precedence:

1. the ``target_loss`` the task declares (a class attribute; user task files can set it);
2. otherwise the ``quantile`` (default :data:`DEFAULT_TARGET_QUANTILE` = 0.5) over optimizers of
   each optimizer's median, over seeds, of the best smoothed loss its runs reached. With 0.5,
   about half the optimizers reach the target on a typical seed: hard enough to separate them,
   easy enough that the performance profile has several finite entries. (AlgoPerf fixes targets
   from tuned baselines; without those we take a quantile of what this bench reached, so the
   target depends on the set of optimizers run.)

**Time to target** of one run is the first step ``i`` with ``smooth[i] <= target``: ``i + 1``
steps, the evaluation cost spent up to it (``forward + backward_cost * backward``, see
``anyorder.bench.budgets``) and its cumulative step time in seconds. Per (task, optimizer) the
summary reports the fraction of seeds that reached the target, the median over seeds counting a
miss as infinite (so the median is "not reached" when half the seeds or more missed), and the
mean with a t interval over the seeds that reached it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from anyorder.bench.budgets import DEFAULT_BACKWARD_COST, evaluation_cost

if TYPE_CHECKING:
    from anyorder.bench.runner import HistoryPoint, RunResult

__all__ = [
    "SMOOTHING_WINDOW",
    "DEFAULT_TARGET_QUANTILE",
    "MEASURES",
    "TimeToTarget",
    "smoothed",
    "best_loss",
    "quantile",
    "task_target",
    "time_to_target",
    "median_with_misses",
]

#: Steps in the trailing moving mean of the loss curve.
SMOOTHING_WINDOW = 10
#: Default quantile, over optimizers, of the median best loss: the target.
DEFAULT_TARGET_QUANTILE = 0.5
#: The three ways to count time to target.
MEASURES = ("steps", "evaluations", "seconds")


@dataclass(frozen=True)
class TimeToTarget:
    """Steps, evaluation cost and seconds to the target; all ``None`` when not reached."""

    reached: bool
    steps: int | None
    evaluations: float | None
    seconds: float | None

    def get(self, measure: str) -> float:
        """The value for ``measure`` (one of :data:`MEASURES`); ``inf`` when not reached."""
        if measure not in MEASURES:
            raise ValueError(f"unknown measure {measure!r}; valid: {', '.join(MEASURES)}")
        value = getattr(self, measure)
        return math.inf if value is None else float(value)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)


def smoothed(losses: Sequence[float | None], window: int = SMOOTHING_WINDOW) -> list[float]:
    """Trailing moving mean of ``losses``, cut at the first ``None``/non-finite value."""
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window!r}")
    out: list[float] = []
    clean: list[float] = []
    for value in losses:
        if value is None or not math.isfinite(value):
            break
        clean.append(float(value))
        recent = clean[-window:]  # summed afresh: a running sum would drift over long runs
        out.append(math.fsum(recent) / len(recent))
    return out


def best_loss(history: Sequence[HistoryPoint], window: int = SMOOTHING_WINDOW) -> float | None:
    """The lowest smoothed loss of a run, ``None`` when it has no finite loss."""
    curve = smoothed([h.loss for h in history], window)
    return min(curve) if curve else None


def quantile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile with linear interpolation between order statistics (numpy's
    default)."""
    if not values:
        raise ValueError("quantile of no values")
    if not 0 <= q <= 1:
        raise ValueError(f"quantile must lie in [0, 1], got {q!r}")
    xs = sorted(values)
    pos = q * (len(xs) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (pos - lo) * (xs[hi] - xs[lo])


def median_with_misses(values: Sequence[float]) -> float:
    """The median of ``values`` where ``inf`` stands for a miss (a plain median of the sorted
    values; ``inf`` when half or more missed, the upper middle value counting for even ``n``)."""
    if not values:
        return math.inf
    xs = sorted(values)
    n = len(xs)
    if n % 2:
        return xs[n // 2]
    a, b = xs[n // 2 - 1], xs[n // 2]
    return math.inf if math.isinf(b) else (a + b) / 2


def task_target(
    runs: Sequence[RunResult],
    *,
    declared: float | None = None,
    q: float = DEFAULT_TARGET_QUANTILE,
    window: int = SMOOTHING_WINDOW,
) -> tuple[float | None, str]:
    """``(target, how it was set)`` for the runs of one task (see the module docstring);
    ``None`` when no run has a finite loss."""
    if declared is not None:
        return float(declared), "declared by the task (target_loss)"
    per_optimizer: dict[str, list[float]] = {}
    for r in runs:
        best = best_loss(r.history, window)
        if best is not None:
            per_optimizer.setdefault(r.optimizer, []).append(best)
    medians = [quantile(v, 0.5) for v in per_optimizer.values()]
    if not medians:
        return None, "no run reached a finite loss"
    return (
        quantile(medians, q),
        f"quantile {q:g} over optimizers of the median best smoothed loss over seeds",
    )


def time_to_target(
    history: Sequence[HistoryPoint],
    target: float | None,
    *,
    backward_cost: float = DEFAULT_BACKWARD_COST,
    window: int = SMOOTHING_WINDOW,
) -> TimeToTarget:
    """The first step whose smoothed loss is at or below ``target`` (see the module
    docstring)."""
    if target is None:
        return TimeToTarget(False, None, None, None)
    curve = smoothed([h.loss for h in history], window)
    for i, value in enumerate(curve):
        if value <= target:
            h = history[i]
            return TimeToTarget(True, i + 1, evaluation_cost(h, backward_cost), h.wall_time_s)
    return TimeToTarget(False, None, None, None)
