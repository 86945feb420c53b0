"""Detecting a diverging swarm in :func:`anyorder.cbo.minimize`, and naming the setting behind it.

A CBO step multiplies each particle's offset from a fixed consensus by ``1 − λ dt + σ √dt ξ``
(anisotropic noise, per coordinate) or adds ``σ √dt ‖x − x̄‖ ξ`` (isotropic noise, ``ξ`` in ``d``
dimensions), so the mean square distance to the consensus is multiplied by

    g = (1 − λ dt)² + σ² dt            (anisotropic)
    g = (1 − λ dt)² + σ² dt · d        (isotropic)

per step: the swarm contracts in mean square only when ``g < 1``, i.e. ``σ² < 2λ − λ² dt`` (divided
by ``d`` for isotropic noise); this is the discrete form of the condition ``2λ > σ²`` (``2λ > dσ²``)
of Carrillo, Jin, Li & Zhu (2021) and Pinnau et al. (2017). With ``g ≥ 1`` a swarm whose particles
all interact can still find the minimiser (the consensus sits on the best particle, which does not
move, and each offset shrinks in log scale), but with random batches a group of particles far out
on a flat region follows its own consensus, and such groups drive each other further out (seen with
CBXpy's documented ``sigma=8``, ``dt=0.01`` on Ackley in d = 20: the spread grows by about 1e5 every
20 iterations).

:class:`DivergenceMonitor` flags the swarm when its typical spread, the median over particles of
``‖xᵢ − x̄‖²``, becomes non-finite or exceeds :data:`GROWTH_LIMIT` times a reference: the larger of
the initial one and the smallest one since the best value last improved (so a swarm that widens while it finds better
points, e.g. one started small far from the minimiser, is not flagged, while one that widens
without finding anything is). The median, not the mean: with ``g ≥ 1`` and every particle
interacting, a few particles wander far out (the mean square spread of a successful run on Ackley
in d = 20 with ``sigma=8`` reached 1e7 times its start) while the typical one contracts.
"""

from __future__ import annotations

import math

__all__ = ["SwarmDivergedError", "DivergenceMonitor", "GROWTH_LIMIT", "mean_square_growth"]

#: how far the spread (a mean square distance) may grow over its reference: 1e6, i.e. the swarm
#: 1,000 times wider than it started without having found a better point.
GROWTH_LIMIT = 1e6


class SwarmDivergedError(RuntimeError):
    """Raised by :func:`anyorder.cbo.minimize` when the swarm diverges. The message names the
    setting that caused it; ``result`` is the :class:`~anyorder.cbo.CBOResult` up to the moment it
    was detected (``success=False``; ``x``/``fun`` and ``best_x``/``best_fun`` the best particle
    seen)."""

    def __init__(self, message: str, result: object = None) -> None:
        super().__init__(message)
        self.result = result


def mean_square_growth(lam: float, sigma: float, dt: float, noise: str, dim: int) -> float:
    """``g``: the factor by which one step multiplies the mean square distance to a fixed
    consensus (module docstring); the swarm contracts in mean square when it is below 1."""
    spread = sigma * sigma * dt * (dim if noise == "isotropic" else 1)
    return (1.0 - lam * dt) ** 2 + spread


def _cause(lam: float, sigma: float, dt: float, noise: str, dim: int, batch_size: int | None) -> str:
    g = mean_square_growth(lam, sigma, dt, noise, dim)
    reasons = []
    if g >= 1.0:
        per = "" if noise == "anisotropic" else f" * d (d = {dim})"
        limit = 2.0 * lam - lam * lam * dt
        if noise == "isotropic":
            limit /= dim
        bound = f"sigma < {math.sqrt(limit):.3g}" if limit > 0 else "a larger lam or smaller dt"
        reasons.append(
            f"sigma={sigma:g} is too large for lam={lam:g} and dt={dt:g} with {noise} noise: each "
            f"step multiplies the mean square distance to the consensus by (1 - lam*dt)^2 + "
            f"sigma^2*dt{per} = {g:.3g} >= 1 (contraction needs {bound})"
        )
    if batch_size is not None:
        reasons.append(
            f"random batches (batch_size={batch_size}) give each group of {batch_size} particles "
            "its own consensus, so groups far out on a flat region push each other further out; "
            "batch_size=None makes every particle follow one consensus"
        )
    if not reasons:
        return (
            "the dynamics contract in mean square with these settings (lam, sigma, dt), so look at "
            "f: it may decrease without bound or reward points far away"
        )
    fix = "lower sigma or dt" if g >= 1.0 else ""
    if batch_size is not None:
        fix = (fix + ", or " if fix else "") + "set batch_size=None"
    return "; ".join(reasons) + f". Fix: {fix}"


class DivergenceMonitor:
    """Watches the typical spread at recorded iterations (module docstring); :meth:`check` takes
    the median of ``‖xᵢ − x̄‖²`` and returns an error message when the swarm has diverged, else
    ``None``."""

    def __init__(
        self, lam: float, sigma: float, dt: float, noise: str, dim: int, batch_size: int | None
    ) -> None:
        self._settings = (lam, sigma, dt, noise, dim, batch_size)
        self._initial: float | None = None
        self._since_improvement = math.inf

    def check(self, iteration: int, variance: float, improved: bool) -> str | None:
        if self._initial is None:
            self._initial = variance if math.isfinite(variance) else math.inf
        if improved or variance < self._since_improvement:
            self._since_improvement = variance
        reference = max(self._initial, self._since_improvement)
        if math.isfinite(variance) and variance <= GROWTH_LIMIT * reference:
            return None
        grew = (
            f"grew from {reference:.3g} to {variance:.3g}"
            if math.isfinite(variance)
            else "became non-finite"
        )
        return (
            f"the swarm diverged by iteration {iteration}: the median of |x_i - consensus|^2 "
            f"{grew} without a better point being found. Cause: {_cause(*self._settings)}"
        )
