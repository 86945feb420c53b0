"""Input checks of ``anyorder bench`` that run before anything is trained or written: the config
file's names and values, the output folder, and the JSON form of results (non-finite numbers as
``null``).

Each check raises ``ValueError`` (or a subclass) whose one-line message names the file, the table
and key, or the folder, and says what is allowed; the command line turns it into exit code 2.
"""

from __future__ import annotations

import inspect
import math
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from anyorder.core.files import json_safe  # the one conversion, re-exported for the bench

__all__ = ["check_config", "check_out_dir", "json_safe", "OutDirError"]

#: Folders whose files are the kernel's, not a disk's: never an output folder.
VIRTUAL_FILE_SYSTEMS = ("/proc", "/sys", "/dev")


class OutDirError(ValueError):
    """``--out`` cannot receive the results (under a file, on /proc or /sys, not writable)."""


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _describe(value: Any) -> str:
    return f"{value!r} (a {type(value).__name__})"


def _check_finite(value: Any, where: str) -> None:
    """Every number in ``value`` (nested lists and tables too) must be finite."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{where} = {value!r}: must be a finite number")
    if isinstance(value, Mapping):
        for key, item in value.items():
            _check_finite(item, f"{where}.{key}")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_finite(item, f"{where}[{i}]")


def _numeric_keys(spec: Any) -> set[str]:
    """Hyperparameters of ``spec`` known to be numbers: the registry's defaults and the
    optimizer's own keyword defaults."""
    known: dict[str, Any] = dict(spec.defaults)
    for table in spec.task_defaults.values():
        known.update(table)
    try:
        for name, param in inspect.signature(spec.factory).parameters.items():
            if param.default is not inspect.Parameter.empty:
                known.setdefault(name, param.default)
    except (TypeError, ValueError):  # a factory without a signature: the registry's keys only
        pass
    return {k for k, v in known.items() if _is_number(v)}


def _check_values(table: Mapping[str, Any], numeric: set[str], where: str) -> None:
    for key, value in table.items():
        _check_finite(value, f"{where} {key}")
        if key in numeric and not _is_number(value):
            raise ValueError(f"{where} {key} = {_describe(value)}: must be a number")


def check_config(data: Mapping[str, Any], path: str | Path) -> None:
    """Check a parsed config before anything runs: every optimizer table names a registered
    optimizer (or a variant with ``base`` naming one), every task table and per-task table a
    registered task, and every value is finite and, where the optimizer or task takes a number,
    a number. Raises ``ValueError`` naming the file, the table and the key."""
    from anyorder.bench.registry import UnknownNameError, get_optimizer, get_task

    file = f"config file {str(path)!r}"

    def lookup(getter: Any, name: str, where: str) -> Any:
        try:
            return getter(name)
        except UnknownNameError as err:
            raise ValueError(f"{file}: {where}: {err}") from None

    for name, table in data.get("optimizers", {}).items():
        where = f"[optimizers.{name}]"
        base = table.get("base")
        if base is not None and not isinstance(base, str):
            raise ValueError(f"{file}: {where} base = {_describe(base)}: must be an optimizer name")
        if base is None:
            where += ' (a variant of a registered optimizer needs base = "<name>")'
        spec = lookup(get_optimizer, base if base is not None else name, where)
        where = f"[optimizers.{name}]"
        per_task = table.get("tasks", {})
        if not isinstance(per_task, Mapping) or not all(
            isinstance(v, Mapping) for v in per_task.values()
        ):
            raise ValueError(f"{file}: {where} tasks must map task names to tables of settings")
        numeric = _numeric_keys(spec)
        try:
            _check_values(
                {k: v for k, v in table.items() if k not in ("base", "tasks")}, numeric, where
            )
            for task_name, settings in per_task.items():
                lookup(get_task, task_name, f"[optimizers.{name}.tasks.{task_name}]")
                _check_values(settings, numeric, f"[optimizers.{name}.tasks.{task_name}]")
        except ValueError as err:
            if str(err).startswith(file):
                raise
            raise ValueError(f"{file}: {err}") from None
    for name, options in data.get("tasks", {}).items():
        task_cls = lookup(get_task, name, f"[tasks.{name}]")
        numeric = {k for k, v in task_cls.option_defaults().items() if _is_number(v)}
        try:
            _check_values(options, numeric, f"[tasks.{name}]")
        except ValueError as err:
            raise ValueError(f"{file}: {err}") from None


def check_out_dir(path: str | Path) -> None:
    """Refuse an output folder that cannot receive files, before anything runs: one under a file,
    on a virtual file system (/proc, /sys, /dev), or in a folder this process cannot write to.
    Creates nothing."""
    path = Path(path)
    resolved = path.resolve()
    for root in VIRTUAL_FILE_SYSTEMS:
        if resolved == Path(root) or Path(root) in resolved.parents:
            raise OutDirError(
                f"output directory {str(path)!r} is under {root}, the kernel's virtual file "
                "system: choose a folder on disk"
            )
    existing = resolved
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise OutDirError(
            f"output directory {str(path)!r} cannot be created: {str(existing)!r} is a file"
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutDirError(
            f"output directory {str(path)!r} cannot be created: {str(existing)!r} is not "
            "writable by this user"
        )
    try:  # permissions can lie (read-only mounts, ACLs): try a file, and remove it
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        raise OutDirError(
            f"output directory {str(path)!r} cannot be created in {str(existing)!r}: "
            f"{err.strerror or err}"
        ) from None
