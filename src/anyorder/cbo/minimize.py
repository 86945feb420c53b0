"""``anyorder.cbo.minimize``: global, derivative-free minimisation with consensus-based optimization.

The dynamics are in :mod:`anyorder.cbo.dynamics` (Pinnau et al. 2017; Carrillo et al. 2021;
"Gradient is All You Need?", Riedl et al. 2023). This module runs them on a function of a batch of
points, with alpha annealing, random batches of interacting particles and a stopping rule on the
swarm's spread.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from anyorder.cbo._checks import optional_positive_int, positive_number
from anyorder.cbo.divergence import DivergenceMonitor, SwarmDivergedError
from anyorder.cbo.dynamics import (
    NOISE_TYPES,
    batch_consensus,
    cbo_update_,
    consensus,
    random_batch_step,
    sanitize_energies,
)

__all__ = ["minimize", "CBOResult", "SwarmDivergedError"]

#: ``alpha`` when none is given; it is then annealed by :data:`DEFAULT_ALPHA_FACTOR` per iteration.
DEFAULT_ALPHA = 10.0
DEFAULT_ALPHA_FACTOR = 1.01


@dataclass(frozen=True)
class CBOResult:
    """The outcome of :func:`minimize`.

    ``x`` is the final consensus point and ``fun`` its value (one extra evaluation, counted in
    ``nfev``); ``best_x``/``best_fun`` the lowest-energy particle seen during the run. ``history``
    holds one entry per recorded iteration (every ``record_every``-th and the last; ``iteration``
    gives their indices): ``consensus`` (an ``(k, d)`` array or tensor), ``energy`` (the
    weighted energy Σ wᵢ f(xᵢ) of the swarm, the consensus energy), ``best`` (the lowest particle
    energy), ``variance`` ((1/n) Σ ‖xᵢ − x̄‖²) and ``alpha``.
    """

    x: Any
    fun: float
    nfev: int
    nit: int
    success: bool
    message: str
    best_x: Any = None
    best_fun: float = math.inf
    history: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dictionary."""

        def plain(v: Any) -> Any:
            if isinstance(v, (torch.Tensor, np.ndarray)):
                return v.tolist()
            return v

        return {
            "x": plain(self.x),
            "fun": self.fun,
            "nfev": self.nfev,
            "nit": self.nit,
            "success": self.success,
            "message": self.message,
            "best_x": plain(self.best_x),
            "best_fun": self.best_fun,
            "history": {k: plain(v) for k, v in self.history.items()},
        }


def _initial_particles(
    x0: Any,
    bounds: Sequence[Sequence[float]] | None,
    n_particles: int,
    init_std: float,
    generator: torch.Generator,
    dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor:
    box = None
    if bounds is not None:
        lb = getattr(bounds, "lb", None)
        if lb is not None:  # scipy.optimize.Bounds
            box = torch.as_tensor(np.stack([lb, bounds.ub], axis=-1), dtype=dtype)
        else:
            box = torch.as_tensor(np.asarray(bounds, dtype=np.float64), dtype=dtype)
        if box.ndim != 2 or box.shape[1] != 2:
            raise ValueError(
                "bounds must be a sequence of (low, high) pairs, one per coordinate, "
                f"got an array of shape {tuple(box.shape)}"
            )
        if not bool(torch.all(box[:, 0] < box[:, 1])) or not bool(torch.isfinite(box).all()):
            raise ValueError("bounds must be finite with low < high in every coordinate")
    if x0 is None:
        if box is None:
            raise ValueError("give x0 (a start point or the initial particles) or bounds")
        u = torch.rand((n_particles, box.shape[0]), generator=generator, dtype=dtype)
        return (box[:, 0] + (box[:, 1] - box[:, 0]) * u).to(device)
    start = torch.as_tensor(np.asarray(x0) if not isinstance(x0, torch.Tensor) else x0)
    start = start.detach().to(dtype=dtype, device="cpu")
    if start.ndim == 2:
        particles = start.clone()
    elif start.ndim == 1:
        noise = torch.randn((n_particles, start.shape[0]), generator=generator, dtype=dtype)
        particles = start + init_std * noise
    else:
        raise ValueError(
            f"x0 must be a point (d,) or initial particles (n, d), got shape {tuple(start.shape)}"
        )
    if box is not None:
        if box.shape[0] != particles.shape[1]:
            raise ValueError(
                f"bounds have {box.shape[0]} coordinates but x0 has {particles.shape[1]}"
            )
        particles = torch.maximum(torch.minimum(particles, box[:, 1]), box[:, 0])
    return particles.to(device)


def minimize(
    f: Callable[[Any], Any],
    x0: Any = None,
    bounds: Sequence[Sequence[float]] | None = None,
    *,
    n_particles: int = 200,
    alpha: float | None = None,
    lam: float = 1.0,
    sigma: float = 1.3,
    dt: float = 0.1,
    noise: str = "anisotropic",
    batch_size: int | None = 5,
    max_iters: int = 1000,
    maxfev: int | None = None,
    alpha_factor: float | None = None,
    alpha_max: float = 1e6,
    tol: float = 1e-12,
    ftol: float | None = None,
    patience: int = 50,
    record_every: int = 10,
    init_std: float = 1.0,
    vectorize: bool = True,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    device: str | torch.device = "cpu",
    callback: Callable[[torch.Tensor], bool | None] | None = None,
    progress: bool = False,
) -> CBOResult:
    """Minimise ``f`` with consensus-based optimization (CBO).

    ``f`` maps a batch of points ``(n, d)`` to ``n`` values (a tensor, array or list); with
    ``vectorize=False`` it maps one point ``(d,)`` to a number and is called once per particle.
    Points are given to ``f`` as NumPy arrays when ``x0`` is a NumPy array, as tensors otherwise.

    Start: ``x0`` of shape ``(d,)`` draws the particles from ``N(x0, init_std² I)``; ``x0`` of
    shape ``(n, d)`` gives the initial particles themselves; ``bounds`` (scipy-style ``(low, high)``
    pairs, one per coordinate) without ``x0`` draws them uniformly in the box, and with ``x0``
    clips them into it. The dynamics are unconstrained afterwards.

    Each iteration evaluates every particle once, moves the particles toward the consensus
    (``lam``, ``sigma``, ``dt``, ``noise``: see :mod:`anyorder.cbo.dynamics`; ``batch_size``: random
    batches of interacting particles, each with its own consensus) and anneals
    ``alpha ← min(alpha · alpha_factor, alpha_max)``. It stops after ``max_iters`` iterations,
    when the next iteration's evaluations would exceed ``maxfev``, when the spread
    ``(1/n) Σ ‖xᵢ − x̄‖²`` falls below ``tol``, when the consensus energy Σ wᵢ f(xᵢ) has changed by
    at most ``ftol * (1 + |energy|)`` over the last ``patience`` iterations (``ftol=None``: off),
    or when ``callback(x̄)`` returns true; as in
    :func:`anyorder.zo.minimize`, ``success`` is false only when the run failed (every particle's
    value non-finite, or a non-finite value at the consensus). All random draws come from one
    generator seeded by ``seed``.

    ``alpha``: ``None`` (default) starts at 10 and anneals it by ``alpha_factor`` (default 1.01)
    per iteration; an explicit ``alpha`` stays fixed unless ``alpha_factor`` is given too. A
    swarm that diverges (its typical spread 1,000 times wider than its reference without a better
    point found, or non-finite: :mod:`anyorder.cbo.divergence`) raises
    :class:`~anyorder.cbo.SwarmDivergedError` at the recorded iteration that sees it, naming the
    setting behind it (``sigma`` too large for ``lam`` and ``dt``, random batches); its ``result``
    holds the best particle seen. Values of ``+inf`` or NaN count as missing: such particles get
    weight zero.

    ``record_every``: the history, the best particle and the stopping rules (``tol``, ``ftol``,
    ``callback``, counted in recorded iterations) are computed every that many iterations and at
    the last one (default: every 10th). On small problems this bookkeeping costs about a third of
    an iteration (measured on Rastrigin, d = 10, 200 particles), and with random batches the
    global consensus is otherwise not needed; ``record_every=1`` records every iteration.

    The defaults (200 particles in random batches of 5, anisotropic noise, ``dt=0.1``,
    ``sigma=1.3``, ``alpha`` 10 growing 1% per step) come from a grid on Rastrigin and Ackley in
    d = 10 with their minimiser at the origin, at (2, ..., 2) and at a random point with rotated
    axes, started in [-3, 3]^d, and were checked on COCO/BBOB in d = 2 to 20 (BENCHMARKS.md:
    there ``n_particles=100`` or 50 solves a few percent more at a fixed ``maxfev``, but finds
    Rastrigin's minimiser in d = 10 far less often, so 200 stays). ``sigma=1.3`` keeps
    the swarm just inside mean-square contraction (``sigma² < 2 lam − lam² dt`` = 1.9): the earlier
    0.8 contracted onto the box's centre before it found a minimiser away from it. All particles
    interacting (``batch_size=None``) collapses early on Rastrigin. ``f`` must not modify its
    argument.
    """
    if not callable(f):
        raise TypeError(f"f must be callable, got {type(f).__name__}")
    if noise not in NOISE_TYPES:
        raise ValueError(f"noise must be one of {', '.join(NOISE_TYPES)}, got {noise!r}")
    for name, value in (("n_particles", n_particles), ("max_iters", max_iters)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    optional_positive_int("batch_size", batch_size)
    optional_positive_int("maxfev", maxfev)
    if alpha_factor is None:  # annealing belongs to the default alpha; a given alpha stays fixed
        alpha_factor = DEFAULT_ALPHA_FACTOR if alpha is None else 1.0
    alpha = positive_number("alpha", DEFAULT_ALPHA if alpha is None else alpha, allow_inf=True)
    lam = positive_number("lam", lam, allow_zero=True)
    sigma = positive_number("sigma", sigma, allow_zero=True)
    dt = positive_number("dt", dt)
    alpha_factor = positive_number("alpha_factor", alpha_factor)
    alpha_max = positive_number("alpha_max", alpha_max, allow_inf=True)
    tol = positive_number("tol", tol, allow_zero=True)
    if ftol is not None:
        ftol = positive_number("ftol", ftol, allow_zero=True)
    if not isinstance(record_every, int) or isinstance(record_every, bool) or record_every < 1:
        raise ValueError(f"record_every must be a positive integer, got {record_every!r}")
    if not isinstance(patience, int) or patience < 1:
        raise ValueError(f"patience must be a positive integer, got {patience!r}")
    init_std = positive_number("init_std", init_std, allow_zero=True)

    device = torch.device(device)
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    init_gen = torch.Generator()
    init_gen.manual_seed(seed)
    x = _initial_particles(x0, bounds, n_particles, init_std, init_gen, dtype, device)
    n = x.shape[0]
    if batch_size is not None and batch_size >= n:
        batch_size = None
    numpy_io = isinstance(x0, np.ndarray)

    def to_user(points: torch.Tensor) -> Any:
        return points.cpu().numpy().copy() if numpy_io else points.clone()

    def to_f(points: torch.Tensor) -> Any:  # no copy: f must not modify its argument
        return points.cpu().numpy() if numpy_io else points

    def evaluate(points: torch.Tensor) -> torch.Tensor:
        if vectorize:
            values = f(to_f(points))
        else:
            values = [f(to_f(p)) for p in points]
        if not isinstance(values, torch.Tensor):
            values = torch.as_tensor(np.asarray(values, dtype=np.float64))
        if values.dtype != dtype or values.device != device:
            values = values.to(device=device, dtype=dtype)
        values = values.reshape(-1)
        if values.shape[0] != points.shape[0]:
            raise ValueError(
                f"f returned {values.shape[0]} values for {points.shape[0]} points; with "
                "vectorize=True it must map (n, d) points to n values"
            )
        return values

    drift_coef = lam * dt
    noise_coef = sigma * math.sqrt(dt)
    history: dict[str, list[Any]] = {
        "iteration": [],
        "consensus": [],
        "energy": [],
        "best": [],
        "variance": [],
        "alpha": [],
    }
    nfev = 0
    nit = 0
    best_fun = math.inf
    best_x = x[0].clone()
    centre = x[0].clone()
    success = True
    message = f"reached max_iters={max_iters}"
    monitor = DivergenceMonitor(lam, sigma, dt, noise, x.shape[1], batch_size)
    diverged = False
    bar = tqdm(total=max_iters, disable=not progress, unit="it", dynamic_ncols=True)
    with torch.no_grad(), bar:
        for it in range(max_iters):
            if maxfev is not None and nfev + n + 1 > maxfev:
                message = f"reached maxfev={maxfev}"
                break
            last = it == max_iters - 1 or (maxfev is not None and nfev + 2 * n + 1 > maxfev)
            record = last or it % record_every == 0
            energies = sanitize_energies(evaluate(x))
            nfev += n
            if record:
                low, low_index = torch.min(energies, dim=0)
                low = float(low)
                if not math.isfinite(low):
                    success, message = False, "every particle's value is non-finite; stopped"
                    if not bool(torch.isfinite(x).all()):  # the positions overflowed
                        message, diverged = monitor.check(it, math.nan, False), True
                    break
                improved = low < best_fun
                if improved:
                    best_fun, best_x = low, x[low_index].clone()
            if record or batch_size is None:
                centre, weights = consensus(x, energies, alpha)
            if record:
                squared = (x - centre).square().sum(-1)
                variance = float(squared.mean())
                divergence = monitor.check(it, float(squared.median()), improved)
                if divergence is not None:
                    success, message, diverged = False, divergence, True
                    break
                energy = weights @ energies.nan_to_num(posinf=0.0)  # weight 0 for +inf
            if batch_size is None:
                cbo_update_(x, centre, drift_coef, noise_coef, noise, generator)
            elif n % batch_size == 0:
                x = random_batch_step(
                    x, energies, alpha, batch_size, drift_coef, noise_coef, noise, generator
                )
            else:
                target = batch_consensus(x, energies, alpha, batch_size, generator)
                cbo_update_(x, target, drift_coef, noise_coef, noise, generator)
            nit += 1
            bar.update(1)
            if record:
                history["iteration"].append(it)
                history["consensus"].append(centre)
                history["energy"].append(energy)
                history["best"].append(low)
                history["variance"].append(variance)
                history["alpha"].append(alpha)
            alpha = min(alpha * alpha_factor, alpha_max)
            if not record:
                continue
            if history["variance"][-1] < tol:
                message = f"the particles' spread fell below tol={tol:g}"
                break
            if ftol is not None and len(history["energy"]) > patience:
                now, before = float(energy), float(history["energy"][-1 - patience])
                if abs(now - before) <= ftol * (1.0 + abs(now)):
                    message = (
                        f"the consensus energy changed by less than ftol={ftol:g} (relative) "
                        f"over {patience} recorded iterations"
                    )
                    break
            if callback is not None and callback(centre.clone()):
                message = "stopped by the callback"
                break
    if diverged:  # the consensus is far out: report the best particle seen instead
        centre, fun = best_x, best_fun
    else:
        fun = float(evaluate(centre[None])[0])
        nfev += 1
    if not math.isfinite(fun):
        success, message = False, message + "; non-finite value at the consensus"
    recorded = history.pop("consensus")
    trajectory = torch.stack(recorded) if recorded else centre.new_empty((0, x.shape[1]))
    history["energy"] = torch.stack(history["energy"]).tolist() if recorded else []
    history = {"consensus": to_user(trajectory), **history}
    result = CBOResult(
        x=to_user(centre),
        fun=fun,
        nfev=nfev,
        nit=nit,
        success=success,
        message=message,
        best_x=to_user(best_x),
        best_fun=best_fun,
        history=history,
    )
    if diverged:
        raise SwarmDivergedError(message, result)
    return result
