"""``anyorder bench``: every applicable optimizer on every task, same seed, steps and data order.

Modules: ``registry`` (tasks and optimizers by name), ``tasks/`` (one file each), ``measure``
(time, memory, evaluation counts), ``runner`` (runs a suite over paired seeds), ``budgets``
(steps, seconds or evaluations), ``report`` (JSON, CSV), ``summary`` (intervals over seeds, time
to target, profiles, ranks: built on ``stats``, ``targets`` and ``profiles``), ``html`` (the page
and its figures), ``user_task`` (``--task-file``), ``resume`` (``--resume``), ``config``
(hyperparameters from YAML/TOML).
"""

from anyorder.bench.registry import (
    OPTIMIZERS,
    TASKS,
    OptimizerSpec,
    get_optimizer,
    get_task,
    register_optimizer,
    register_task,
)

__all__ = [
    "OPTIMIZERS",
    "TASKS",
    "OptimizerSpec",
    "get_optimizer",
    "get_task",
    "register_optimizer",
    "register_task",
]
