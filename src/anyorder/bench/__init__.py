"""``anyorder bench``: every applicable optimizer on every task, same seed, steps and data order.

Modules: ``registry`` (tasks and optimizers by name), ``tasks/`` (one file each), ``measure``
(time, memory, evaluation counts), ``runner`` (runs a suite), ``report`` (JSON, CSV, plots, HTML),
``config`` (hyperparameters from YAML/TOML).
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
