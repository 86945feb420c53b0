"""Atomic checkpoints and the append-only seed log that make distributed zeroth-order runs resumable
with nothing lost.

A step of distributed zeroth-order training is fully described by its ``(query seed, g)`` pairs, so
the log of those pairs since the last checkpoint, replayed on the checkpoint's weights, rebuilds the
weights at the last logged step bit for bit. Checkpoints are written to a temporary file in the same
folder and renamed over the old one (``os.replace`` is atomic), so a crash leaves either the old or
the new checkpoint, never a torn one.

The log is read strictly: every line must be a complete entry and the steps must follow each other
without a gap. The one exception is a **torn last line** (no final newline: a crash while it was
being written; that step was applied by nobody, since the log is written before the update): it is
dropped with a :class:`TornLogLineWarning`, and :meth:`SeedLog.drop_torn_tail` removes it from the
file before anything is appended. Anything else (a garbage or cut line before the end, a missing
step, steps out of order) raises :class:`SeedLogError` naming the file, the line and what is wrong,
and the file is left exactly as it was.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from anyorder.core.files import atomic_write

__all__ = ["atomic_save", "SeedLog", "LogEntry", "SeedLogError", "TornLogLineWarning"]

LogEntry = tuple[int, list[int], list[float]]


class SeedLogError(ValueError):
    """The seed log is damaged where it cannot be repaired without losing steps; the message names
    the file, the line and what is wrong. Nothing was read into the model and nothing rewritten."""


class TornLogLineWarning(UserWarning):
    """The seed log's last line was cut off by a crash while it was written; it is ignored."""


def atomic_save(obj: Any, path: str | os.PathLike[str]) -> None:
    """``torch.save`` to ``path`` atomically: a temporary file in the same folder, flushed to disk,
    then renamed over ``path``."""
    atomic_write(path, lambda fh: torch.save(obj, fh))


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _parse_entry(line: str) -> LogEntry:
    """One log line as an entry; ``ValueError`` saying what is wrong with it."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"not a JSON entry ({err.msg} at column {err.colno})") from None
    if not isinstance(record, dict) or set(record) != {"step", "q", "g"}:
        keys = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise ValueError(f'expected an object with keys "step", "q", "g", got {keys}')
    step, queries, values = record["step"], record["q"], record["g"]
    if not _is_int(step) or step < 0:
        raise ValueError(f'"step" must be an integer >= 0, got {step!r}')
    if not isinstance(queries, list) or not all(_is_int(q) and q >= 0 for q in queries):
        raise ValueError(f'"q" must be a list of query seeds (integers >= 0), got {queries!r}')
    if not isinstance(values, list) or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values
    ):
        raise ValueError(f'"g" must be a list of finite numbers, got {values!r}')
    if len(queries) != len(values):
        raise ValueError(f'"q" has {len(queries)} seeds but "g" {len(values)} values')
    return step, list(queries), [float(v) for v in values]


class SeedLog:
    """One JSON line per step: ``{"step": s, "q": [query seeds], "g": [projected gradients]}``.

    Floats are written with Python's shortest round-trip repr, so values read back are the exact
    doubles that were applied. ``fsync=True`` forces each line to disk (slower; survives a power
    loss, not just a process crash). Reading is strict (see the module docstring).
    """

    def __init__(self, path: str | os.PathLike[str], fsync: bool = False) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fsync = fsync
        self._fh = None

    def append(self, step: int, queries: list[int], values: list[float]) -> None:
        if self._fh is None:
            self._fh = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - kept open
        line = json.dumps({"step": step, "q": [int(q) for q in queries], "g": list(values)})
        self._fh.write(line + "\n")
        self._fh.flush()
        if self.fsync:
            os.fsync(self._fh.fileno())

    def _read(self) -> tuple[list[LogEntry], bytes]:
        """Every complete entry, checked; and the file's bytes up to its last complete line
        (shorter than the file when the last line is torn)."""
        if not self.path.exists():
            return [], b""
        if self.path.is_dir():
            raise SeedLogError(f"seed log {str(self.path)!r} is a directory, not a file")
        data = self.path.read_bytes()
        lines = data.split(b"\n")
        if lines[-1]:  # no final newline: the last write was cut off
            warnings.warn(
                f"seed log {str(self.path)!r}: line {len(lines)} is cut off (a crash while it was "
                "written; that step was never applied); ignoring it",
                TornLogLineWarning,
                stacklevel=3,
            )
        entries: list[LogEntry] = []
        for number, raw in enumerate(lines[:-1], start=1):
            where = f"seed log {str(self.path)!r}, line {number}"
            try:
                entry = _parse_entry(raw.decode("utf-8"))
            except (UnicodeDecodeError, ValueError) as err:
                raise SeedLogError(
                    f"{where}: {err}; the log is damaged before its end, so steps after it would "
                    "be lost: restore the file (nothing was changed)"
                ) from None
            if entries and entry[0] != entries[-1][0] + 1:
                previous = entries[-1][0]
                what = (
                    f"steps {previous + 1}..{entry[0] - 1} are missing"
                    if entry[0] > previous + 1
                    else "steps out of order"
                )
                raise SeedLogError(
                    f"{where}: step {entry[0]} follows step {previous} ({what}); the log cannot "
                    "be replayed past the gap: restore the file (nothing was changed)"
                )
            entries.append(entry)
        return entries, data[: len(data) - len(lines[-1])]

    def entries(self, from_step: int = 0) -> Iterator[LogEntry]:
        """Entries with ``step >= from_step``, in order. The whole file is checked first: a
        damaged line or a gap raises :class:`SeedLogError` before anything is yielded; a torn
        last line is skipped with a :class:`TornLogLineWarning`."""
        entries, _ = self._read()
        yield from (e for e in entries if e[0] >= from_step)

    def drop_torn_tail(self) -> bool:
        """Remove a torn last line from the file (atomically) so that appends start on a fresh
        line; returns whether there was one. A damaged log raises and is left as it is."""
        if not self.path.exists():
            return False
        _, complete = self._read()
        if len(complete) == self.path.stat().st_size:
            return False
        self.close()
        atomic_write(self.path, complete)
        return True

    def truncate_before(self, step: int) -> None:
        """Drop entries older than ``step`` (after a checkpoint at ``step``), atomically. A
        damaged log raises :class:`SeedLogError` and is not rewritten."""
        kept = [json.dumps({"step": s, "q": q, "g": g}) + "\n" for s, q, g in self.entries(step)]
        self.close()
        atomic_write(self.path, "".join(kept).encode("utf-8"))

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
