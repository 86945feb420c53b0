"""Budgets that compare fairly: equal steps, equal wall-clock time or equal evaluations.

A run is given one budget kind, recorded in ``RunResult.budget``:

* ``steps``: every optimizer takes the same number of ``optimizer.step`` calls (the default);
* ``seconds`` (``--time-budget``): a run ends once its step time reaches the budget (steps cap);
* ``evaluations`` (``--eval-budget``): a run ends once its *evaluation cost* reaches the budget,
  where the cost of a run is ``forward + backward_cost * backward`` with ``forward`` the loss
  evaluations and ``backward`` the backward passes the runner counted (every particle of a
  population counts as one forward evaluation).

``backward_cost`` (``--backward-cost``, default :data:`DEFAULT_BACKWARD_COST` = 2) is the price of
one backward pass in forward evaluations. Reverse-mode differentiation costs a small constant
multiple of the function (Griewank & Walther, *Evaluating Derivatives*, 2008: at most about 3-4
times in operation counts); about 2 is what a backward pass of a dense network costs in practice
(two matrix products per layer against the forward pass's one), and it is what AlgoPerf-style
"one step = forward + backward = 3 forward" accounting assumes. The ratio is a convention: set it
to your own measurement (``time_per_step_s`` of SGD against ``inference_time_s`` gives 1 + ratio).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from anyorder.bench.runner import HistoryPoint, PlannedRun

__all__ = ["DEFAULT_BACKWARD_COST", "apply_budget", "budget_record", "evaluation_cost"]

#: One backward pass, in forward evaluations (see the module docstring).
DEFAULT_BACKWARD_COST = 2.0


def _check_cost(backward_cost: float) -> float:
    if (
        isinstance(backward_cost, bool)
        or not isinstance(backward_cost, (int, float))
        or not math.isfinite(backward_cost)
        or backward_cost < 0
    ):
        raise ValueError(
            f"backward cost must be a finite number >= 0 (forward evaluations per backward "
            f"pass), got {backward_cost!r}"
        )
    return float(backward_cost)


def apply_budget(
    plan: Sequence[PlannedRun],
    *,
    eval_budget: float | None = None,
    backward_cost: float = DEFAULT_BACKWARD_COST,
) -> list[PlannedRun]:
    """``plan`` with an evaluation budget (or none) and the backward:forward cost ratio set.

    Raises ``ValueError`` for a budget that is not a finite number > 0, a negative ratio, or an
    evaluation budget combined with a wall-clock budget (a run has one budget kind).
    """
    cost = _check_cost(backward_cost)
    if eval_budget is not None:
        if (
            isinstance(eval_budget, bool)
            or not isinstance(eval_budget, (int, float))
            or not math.isfinite(eval_budget)
            or eval_budget <= 0
        ):
            raise ValueError(
                f"evaluation budget must be a finite number > 0, got {eval_budget!r}"
            )
        if any(run.time_budget_s is not None for run in plan):
            raise ValueError(
                "choose one budget: an evaluation budget and a time budget cannot be combined"
            )
    return [
        dataclasses.replace(run, eval_budget=eval_budget, backward_cost=cost) for run in plan
    ]


def budget_record(run: PlannedRun) -> dict[str, Any]:
    """What ``RunResult.budget`` records: the kind, the step cap, the caps in seconds and
    evaluations (``None`` when not used) and the cost ratio."""
    if run.eval_budget is not None:
        kind = "evaluations"
    elif run.time_budget_s is not None:
        kind = "seconds"
    else:
        kind = "steps"
    return {
        "kind": kind,
        "steps": run.steps,
        "seconds": run.time_budget_s,
        "evaluations": run.eval_budget,
        "backward_cost": run.backward_cost,
    }


def evaluation_cost(point: HistoryPoint, backward_cost: float) -> float:
    """Evaluation cost spent up to and including ``point``'s step."""
    return point.forward_evals + backward_cost * point.backward_evals
