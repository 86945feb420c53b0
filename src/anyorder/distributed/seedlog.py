"""Atomic checkpoints and the append-only seed log that make distributed zeroth-order runs resumable
with nothing lost.

A step of distributed zeroth-order training is fully described by its ``(query seed, g)`` pairs, so
the log of those pairs since the last checkpoint, replayed on the checkpoint's weights, rebuilds the
weights at the last logged step bit for bit. Checkpoints are written to a temporary file in the same
folder and renamed over the old one (``os.replace`` is atomic), so a crash leaves either the old or
the new checkpoint, never a torn one. A torn last log line (a crash mid-write) is ignored.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from anyorder.core.files import atomic_write

__all__ = ["atomic_save", "SeedLog", "LogEntry"]

LogEntry = tuple[int, list[int], list[float]]


def atomic_save(obj: Any, path: str | os.PathLike[str]) -> None:
    """``torch.save`` to ``path`` atomically: a temporary file in the same folder, flushed to disk,
    then renamed over ``path``."""
    atomic_write(path, lambda fh: torch.save(obj, fh))


class SeedLog:
    """One JSON line per step: ``{"step": s, "q": [query seeds], "g": [projected gradients]}``.

    Floats are written with Python's shortest round-trip repr, so values read back are the exact
    doubles that were applied. ``fsync=True`` forces each line to disk (slower; survives a power
    loss, not just a process crash).
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

    def entries(self, from_step: int = 0) -> Iterator[LogEntry]:
        """Complete entries with ``step >= from_step``, in order (a torn last line is skipped)."""
        if not self.path.exists():
            return
        with open(self.path, encoding="utf-8") as fh:
            for line in fh:
                if not line.endswith("\n"):
                    break  # torn write at a crash: the step was never applied by anyone's log
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    break
                if record["step"] >= from_step:
                    yield int(record["step"]), list(record["q"]), [float(g) for g in record["g"]]

    def truncate_before(self, step: int) -> None:
        """Drop entries older than ``step`` (after a checkpoint at ``step``), atomically."""
        kept = [json.dumps({"step": s, "q": q, "g": g}) + "\n" for s, q, g in self.entries(step)]
        self.close()
        atomic_write(self.path, "".join(kept).encode("utf-8"))

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
