"""Value-only black-box minimisation in the shape of ``scipy.optimize.minimize``.

``fun`` may be any callable returning a number: an API, a NumPy model, a non-differentiable
metric ("How to Robustify Black-Box ML Models?", "BlackVIP"). Methods:

* ``"zo-sgd"``: :class:`anyorder.optim.ZOSGD` (options: lr, mu, momentum, weight_decay,
  n_queries, distribution, one_sided, seed);
* ``"zo-adam"``: :class:`anyorder.optim.ZOAdam` (options: lr, betas, eps, mu, weight_decay,
  n_queries, distribution, one_sided, seed);
* ``"coordinate"``: gradient descent on DeepZero's coordinate-wise estimate (options: lr, mu,
  central, mask).

The budget ``maxfev`` counts every call of ``fun``, including the final evaluation at the
returned ``x``; an iteration starts only if its evaluations fit in what is left.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from anyorder.estimators.coordinate import CoordinateWise
from anyorder.functional import sgd_
from anyorder.optim.zo import ZOSGD, ZOAdam

__all__ = ["minimize", "ZOResult", "METHODS"]

METHODS = ("zo-sgd", "zo-adam", "coordinate")


@dataclass(frozen=True)
class ZOResult:
    """The outcome of :func:`minimize` (fields as in ``scipy.optimize.OptimizeResult``).

    ``history`` lists, per iteration, ``{"nit", "nfev", "fun"}`` where ``fun`` is the mean of the
    values the iteration evaluated.
    """

    x: Any
    fun: float
    nfev: int
    nit: int
    success: bool
    message: str
    history: list[dict[str, float]] = field(default_factory=list)


def minimize(
    fun: Callable[[Any], float],
    x0: Any,
    method: str = "zo-sgd",
    maxfev: int = 1000,
    options: dict[str, Any] | None = None,
    callback: Callable[[Any], None] | None = None,
) -> ZOResult:
    """Minimise ``fun`` from ``x0`` with function values only.

    ``x0`` is a NumPy array (``fun`` then receives float64 NumPy arrays and ``x`` is returned as
    one) or a tensor (``fun`` receives float64 tensors). ``callback(x)`` runs after each
    iteration. Non-finite values stop the run with ``success=False``; the weights never take a
    step from a non-finite estimate.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if not isinstance(maxfev, int) or maxfev < 2:
        raise ValueError(f"maxfev must be an integer >= 2, got {maxfev!r}")
    if not callable(fun):
        raise TypeError(f"fun must be callable, got {type(fun).__name__}")
    options = dict(options or {})
    as_numpy = not isinstance(x0, torch.Tensor)
    start = torch.as_tensor(np.asarray(x0, dtype=np.float64) if as_numpy else x0.detach())
    x = torch.nn.Parameter(start.to(torch.float64).clone())
    nfev = 0

    def to_user(t: torch.Tensor) -> Any:
        t = t.detach().clone()
        return t.numpy() if as_numpy else t

    def value() -> float:
        nonlocal nfev
        nfev += 1
        v = fun(to_user(x))
        try:
            return float(v)
        except (TypeError, ValueError):
            raise TypeError(f"fun must return a number, got {type(v).__name__}") from None

    def closure(backward: bool = False) -> torch.Tensor:
        return torch.tensor(value(), dtype=torch.float64)

    history: list[dict[str, float]] = []
    nit, message, success = 0, "maximum number of function evaluations reached", True
    if method == "coordinate":
        lr = float(options.pop("lr", 1e-2))
        est = CoordinateWise(**options)
        per_iter = est.evaluations([x])

        def iterate() -> float:
            mean = est.estimate_([x], closure)
            if math.isfinite(mean) and torch.isfinite(x.grad).all():
                sgd_([x.data], [x.grad], [None], lr=lr)
            return mean
    else:
        cls = ZOSGD if method == "zo-sgd" else ZOAdam
        lr = options.pop("lr", 1e-3)
        try:
            opt = cls([x], lr=lr, **options)
        except TypeError as err:
            raise ValueError(f"bad options for method {method!r}: {err}") from err
        per_iter = opt.estimator.evaluations_per_step

        def iterate() -> float:
            return opt.step(closure)

    if per_iter + 1 > maxfev:
        raise ValueError(
            f"maxfev={maxfev} is too small: one {method} iteration costs {per_iter} evaluations, "
            "plus one for the final value"
        )
    while nfev + per_iter + 1 <= maxfev:
        mean = iterate()
        nit += 1
        history.append({"nit": nit, "nfev": nfev, "fun": mean})
        if callback is not None:
            callback(to_user(x))
        if not math.isfinite(mean):
            success, message = False, f"non-finite function value at iteration {nit}; stopped"
            break
    final = value()
    if not math.isfinite(final):
        success, message = False, "non-finite function value at the final point"
    return ZOResult(to_user(x), final, nfev, nit, success, message, history)
