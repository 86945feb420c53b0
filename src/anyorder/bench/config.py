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
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from anyorder.bench.checks import check_config
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
    """Read and check a ``.toml``, ``.yaml`` or ``.yml`` config file: its layout, then its names
    and values (:func:`anyorder.bench.checks.check_config`), all before anything runs.
    Raises :class:`ConfigError` with a one-line message naming the file (and the line, the table
    or the key)."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config file {str(path)!r} is a directory, not a file")
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    suffix = path.suffix.lower()
    if suffix not in (".toml", ".yaml", ".yml"):
        raise ConfigError(
            f"config file {str(path)!r}: unknown format {suffix!r}; use .toml, .yaml or .yml"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"config file {str(path)!r} cannot be read: {err}") from err
    try:
        if suffix == ".toml":
            data = tomllib.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text) or {}
    except Exception as err:  # parser errors differ by library; report them in one line
        raise ConfigError(f"config file {str(path)!r}{_parse_error(err)}") from err
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
    try:
        check_config(data, path)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    return data


def _parse_error(err: Exception) -> str:
    """``", line N: what"`` from a YAML or TOML parser's error, on one line."""
    mark = getattr(err, "problem_mark", None)  # yaml.MarkedYAMLError
    if mark is not None:
        problem = " ".join(str(getattr(err, "problem", None) or err).split())
        context = getattr(err, "context", None)
        what = f"{problem} ({' '.join(str(context).split())})" if context else problem
        return f", line {mark.line + 1}, column {mark.column + 1}: {what}"
    text = " ".join(str(err).split())
    found = re.search(r"\(at line (\d+), column (\d+)\)", text)  # tomllib.TOMLDecodeError
    if found:
        what = text.replace(found.group(0), "").strip()
        return f", line {found.group(1)}, column {found.group(2)}: {what}"
    return f" could not be parsed: {text}"


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
