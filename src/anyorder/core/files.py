"""Atomic file writes (nothing a user had is lost if a write is interrupted) and checked,
code-free checkpoint loads."""

from __future__ import annotations

import json
import math
import os
import tempfile
import warnings
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import torch

__all__ = ["atomic_write", "load_checkpoint", "CheckpointError"]


def atomic_write(path: str | os.PathLike[str], data: bytes | Callable[[BinaryIO], None]) -> None:
    """Write ``data`` (bytes, or a function that writes to a binary file) to ``path`` through a
    temporary file in the same folder, flushed to disk, then renamed over ``path``: a reader sees
    the old file or the new one, never a partial one; the temporary file is removed on error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            if callable(data):
                data(fh)
            else:
                fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class CheckpointError(ValueError):
    """A file that should hold a ``torch.save`` checkpoint cannot be read; the message names the
    file and says what is wrong with it (missing, a folder, empty, truncated, not a checkpoint,
    or objects that only an unsafe load would read)."""


#: The first bytes of torch's legacy (pre-zip) format: pickle protocol 2 and torch's magic number.
_LEGACY_MAGIC = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19."
_ZIP_MAGIC = b"PK\x03\x04"


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__


def load_checkpoint(path: str | os.PathLike[str], *, what: str = "checkpoint") -> Any:
    """``torch.load(path, map_location="cpu", weights_only=True)`` with errors that say which file
    and what is wrong, as :class:`CheckpointError` (a ``ValueError``).

    Only tensors, plain containers, numbers and strings are loaded: a file holding other objects
    (whose unpickling could run code) is refused, never loaded with ``weights_only=False``.
    ``what`` names the file's role in the messages (``"checkpoint"``, ``"model file"``...).
    """
    path = Path(path)
    name = f"{what} {str(path)!r}"
    if not path.exists():
        raise CheckpointError(f"{name} does not exist")
    if path.is_dir():
        raise CheckpointError(f"{name} is a directory, not a file")
    try:
        with open(path, "rb") as fh:
            head = fh.read(len(_LEGACY_MAGIC))
        size = path.stat().st_size
    except OSError as err:
        raise CheckpointError(f"{name} cannot be read: {_first_line(err)}") from err
    if size == 0:
        raise CheckpointError(f"{name} is empty (0 bytes)")
    is_zip = head.startswith(_ZIP_MAGIC)
    if not is_zip and not head.startswith(_LEGACY_MAGIC):
        raise CheckpointError(
            f"{name} is not a torch.save file (neither torch's zip archive nor its legacy format)"
        )
    if is_zip:
        if not zipfile.is_zipfile(path):
            raise CheckpointError(
                f"{name} is truncated or corrupted: a torch.save archive of {size} bytes without "
                "its end (an interrupted copy or write?)"
            )
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        if "weights only load failed" in str(err).lower():
            raise CheckpointError(
                f"{name} holds objects other than tensors, containers, numbers and strings; it is "
                "not loaded, since unpickling them could run code (weights_only=True)"
            ) from err
        raise CheckpointError(f"{name} is truncated or corrupted: {_first_line(err)}") from err


def json_safe(value: Any) -> Any:
    """``value`` with every non-finite float (NaN, +-inf: a diverged run's figures, a monitor's
    records) replaced by ``None``, so that it serialises as strict JSON (``null``). Tuples
    become lists. The one conversion every JSON file anyorder writes goes through."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def strict_json_bytes(value: Any, **dumps_kwargs: Any) -> bytes:
    """``value`` as strict JSON bytes (non-finite floats as ``null``, see :func:`json_safe`)."""
    return json.dumps(json_safe(value), allow_nan=False, **dumps_kwargs).encode()
