"""Argument checks shared by :func:`anyorder.cbo.minimize` and :class:`anyorder.optim.CBO`: one
wording of each error, naming the bad value and what is allowed."""

from __future__ import annotations

import math
from typing import Any


def positive_number(
    name: str, value: Any, *, allow_zero: bool = False, allow_inf: bool = False
) -> float:
    """``value`` as a float if it is a (finite unless ``allow_inf``) number > 0 (>= 0 with
    ``allow_zero``); else a ``ValueError`` naming it."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok:
        ok = (value >= 0 if allow_zero else value > 0) and not math.isnan(value)
        ok = ok and (allow_inf or math.isfinite(value))
    if not ok:
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(
            f"{name} must be a {'' if allow_inf else 'finite '}number {bound}, got {value!r}"
        )
    return float(value)


def optional_positive_int(name: str, value: Any) -> int | None:
    """``None`` or an integer >= 1; else a ``ValueError`` naming it."""
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
    return value
