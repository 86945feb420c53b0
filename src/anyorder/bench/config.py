"""Bench configuration files (YAML or TOML): per-optimizer hyperparameters and task options.

Layout (TOML shown; YAML has the same nesting)::

    [optimizers.sgd]              # hyperparameters for every task
    lr = 0.1
    momentum = 0.9

    [optimizers.sgd.tasks.rosenbrock]   # ... and for one task
    lr = 1e-4

    [optimizers."adam-lr3e-3"]    # a named variant of a registered optimizer
    base = "adam"
    lr = 3e-3

    [tasks.rastrigin]             # task options
    dim = 30

Precedence, lowest first: the registry's defaults, the registry's per-task defaults, the config's
table for the optimizer, the config's table for the optimizer on that task.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from anyorder.bench.registry import OptimizerSpec, get_optimizer

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = ["load_config", "resolve_optimizer", "ConfigError"]

_TOP_LEVEL = {"optimizers", "tasks"}


class ConfigError(ValueError):
    """A malformed configuration file; the message names the file and the problem."""


def load_config(path: str | Path) -> dict[str, Any]:
    """Read and check a ``.toml``, ``.yaml`` or ``.yml`` config file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    suffix = path.suffix.lower()
    try:
        if suffix == ".toml":
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        elif suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        else:
            raise ConfigError(
                f"config file {str(path)!r}: unknown format {suffix!r}; use .toml, .yaml or .yml"
            )
    except ConfigError:
        raise
    except Exception as err:  # parser errors differ by library; report them uniformly
        raise ConfigError(f"config file {str(path)!r} could not be parsed: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a table/mapping at the top level")
    unknown = set(data) - _TOP_LEVEL
    if unknown:
        raise ConfigError(
            f"config file {str(path)!r}: unknown section(s) {sorted(unknown)}; "
            f"allowed: {sorted(_TOP_LEVEL)}"
        )
    for section in _TOP_LEVEL:
        table = data.get(section, {})
        if not isinstance(table, dict) or not all(isinstance(v, dict) for v in table.values()):
            raise ConfigError(
                f"config file {str(path)!r}: [{section}] must map names to tables of settings"
            )
    return data


def resolve_optimizer(
    name: str, config: Mapping[str, Any]
) -> tuple[OptimizerSpec, dict[str, Any], dict[str, dict[str, Any]]]:
    """``(spec, hyperparameters for every task, hyperparameters per task)`` for ``name``.

    ``name`` is a registered optimizer or a variant defined in the config with ``base``.
    """
    table = dict(config.get("optimizers", {}).get(name, {}))
    base = table.pop("base", None)
    per_task = table.pop("tasks", {}) or {}
    if base is not None:
        spec = dataclasses.replace(get_optimizer(str(base)), name=name)
    else:
        spec = get_optimizer(name)
    return spec, table, {k: dict(v) for k, v in per_task.items()}
