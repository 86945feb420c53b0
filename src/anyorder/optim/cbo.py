"""``CBO``: train a model's parameters with consensus-based optimization (a particle method).

The swarm lives in the optimizer: ``n_particles`` copies of the (flattened) trainable parameters.
Each step evaluates every particle's loss on the current batch, moves the particles with the CBO
dynamics of :mod:`anyorder.cbo.dynamics` (Pinnau et al. 2017; anisotropic noise and random batches
of particles from Carrillo, Jin, Li & Zhu 2021, "A consensus-based global optimization method for
high dimensional machine learning problems"), and writes the consensus point into the parameters,
so the model always holds the swarm's current best guess.

Evaluating the population: when the closure was built by :func:`anyorder.core.make_closure` (it
carries ``closure.model``) or ``model=`` is given, all particles (and the current parameters) are
evaluated in **one** vectorised call, ``torch.func.vmap`` over ``torch.func.functional_call``. If
the model cannot be vmapped (e.g. BatchNorm in training mode updates its statistics in place) the
optimizer warns once and evaluates the particles one by one instead, writing each into the
parameters in turn; so does any plain closure without a model.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from anyorder.cbo._checks import optional_positive_int, positive_number
from anyorder.cbo.dynamics import (
    NOISE_TYPES,
    batch_consensus,
    cbo_update_,
    consensus,
    particle_variance,
    sanitize_energies,
)
from anyorder.core.base import AnyOrderOptimizer
from anyorder.core.closure import ClosureOutputError, ClosureOutputTypeError
from anyorder.core.rng import generator_for

__all__ = ["CBO"]


class _ClosureModule(nn.Module):
    """Wraps ``model`` so that ``functional_call`` can swap its parameters around a closure."""

    def __init__(self, model: nn.Module, evaluate: Callable[[], torch.Tensor]) -> None:
        super().__init__()
        self.model = model
        self._evaluate = evaluate

    def forward(self) -> torch.Tensor:
        return self._evaluate().reshape(())


class CBO(AnyOrderOptimizer):
    """Consensus-based optimization over a model's parameters (``torch.optim.Optimizer``).

    Hyperparameters per parameter group (so LR schedulers work): ``lr`` is the time step ``dt`` of
    the dynamics (drift ``lam * lr``, noise ``sigma * sqrt(lr)``), ``lam`` the drift rate and
    ``sigma`` the noise scale. Swarm-wide: ``n_particles``, ``alpha`` (the consensus temperature;
    annealed ``alpha ← min(alpha * alpha_factor, alpha_max)`` after every step), ``noise``
    (``"anisotropic"`` or ``"isotropic"``), ``batch_size`` (random batches of interacting
    particles; ``None``: all interact), ``init_std`` (particles start at the parameters plus
    ``N(0, init_std²)`` noise), ``seed``. ``eval_chunk_size`` bounds how many particles one
    vectorised call evaluates (memory).

    ``step(closure)`` calls ``closure(backward=False)`` — under ``torch.no_grad()``, vectorised
    over the particles when it can (module docstring) — and returns the loss of the parameters it
    was called with (the previous consensus), as a float. Per step: ``n_particles + 1`` function
    evaluations, counted in ``global_state["function_evaluations"]``. Telemetry after each step in
    ``global_state``: ``alpha``, ``consensus_loss`` (the returned loss), ``weighted_energy``
    (Σ wᵢ f(xᵢ)), ``best_energy`` and ``variance`` ((1/n) Σ ‖xᵢ − x̄‖²). Particles whose loss is
    non-finite get weight zero; if every particle's loss is non-finite the step is skipped (or
    raises, ``on_nonfinite="raise"``) and nothing moves. All random draws are keyed by
    ``(seed, step)``, so a resumed run continues exactly.

    An exception in the closure (``KeyboardInterrupt`` included) leaves the parameters, the swarm
    and the counters as they were. :meth:`add_param_group` works until the first step creates
    the swarm and is refused after it (the swarm's dimension is fixed then).
    """

    hyperparameter_ranges = {"lr": (0.0, False, math.inf, False)}

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 0.1,
        *,
        lam: float = 1.0,
        sigma: float = 0.8,
        n_particles: int = 32,
        alpha: float = 30.0,
        alpha_factor: float = 1.0,
        alpha_max: float = 1e6,
        noise: str = "anisotropic",
        batch_size: int | None = None,
        init_std: float = 0.1,
        seed: int = 0,
        model: nn.Module | None = None,
        vectorize: bool = True,
        eval_chunk_size: int | None = None,
        on_nonfinite: str = "skip",
    ) -> None:
        if not isinstance(lr, (int, float)) or not lr > 0 or not math.isfinite(lr):
            raise ValueError(f"invalid lr={lr!r}: the time step must be a finite number > 0")
        for name, value in (("lam", lam), ("sigma", sigma), ("init_std", init_std)):
            positive_number(name, value, allow_zero=True)
        for name, value in (("alpha", alpha), ("alpha_max", alpha_max)):
            positive_number(name, value, allow_inf=True)
        positive_number("alpha_factor", alpha_factor)
        if noise not in NOISE_TYPES:
            raise ValueError(f"noise must be one of {', '.join(NOISE_TYPES)}, got {noise!r}")
        if not isinstance(n_particles, int) or isinstance(n_particles, bool) or n_particles < 2:
            raise ValueError(f"n_particles must be an integer >= 2, got {n_particles!r}")
        optional_positive_int("batch_size", batch_size)
        optional_positive_int("eval_chunk_size", eval_chunk_size)
        if model is not None and not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module or None, got {type(model).__name__}")
        defaults = {"lr": lr, "lam": lam, "sigma": sigma}
        super().__init__(params, defaults, on_nonfinite=on_nonfinite)
        self.n_particles = n_particles
        self.alpha_factor = float(alpha_factor)
        self.alpha_max = float(alpha_max)
        self.noise = noise
        self.batch_size = batch_size if batch_size is None or batch_size < n_particles else None
        self.init_std = float(init_std)
        self.seed = int(seed)
        self.model = model
        self.vectorize = vectorize
        self.eval_chunk_size = eval_chunk_size
        self._vmap_failed = False
        self._batched_forwards = 0
        self.global_state.update(
            {"alpha": float(alpha), "function_evaluations": 0, "particles": None}
        )
        trainable = self._trainable()
        if not trainable:
            raise ValueError("CBO got no parameters that require gradients")
        dtypes = {p.dtype for p in trainable}
        devices = {p.device for p in trainable}
        if len(dtypes) > 1 or len(devices) > 1:
            raise ValueError(
                "CBO keeps the swarm in one tensor: all parameters must share a dtype and a device, "
                f"got {sorted(map(str, dtypes))} on {sorted(map(str, devices))}"
            )

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group before the first step (same dtype and device as the others); refused with
        ``ValueError`` once the swarm exists."""
        gs = getattr(self, "global_state", None)
        if gs is not None and gs.get("particles") is not None:
            raise ValueError(
                "CBO cannot add a param group after its first step: the swarm holds "
                f"{gs['particles'].shape[1]} coordinates (the parameters it started with); "
                "build a new CBO over all the parameters instead"
            )
        super().add_param_group(param_group)
        if gs is None:
            return  # the constructor checks dtypes and devices once all groups are in
        trainable = self._trainable()
        if len({p.dtype for p in trainable}) > 1 or len({p.device for p in trainable}) > 1:
            self.param_groups.pop()
            raise ValueError(
                "CBO keeps the swarm in one tensor: the new group's parameters must share the "
                "dtype and device of the others"
            )

    @property
    def uncounted_evaluations(self) -> dict[str, int]:
        """Loss evaluations of particles batched into one vectorised call beyond the first
        (the closure runs once for the whole batch). See the base class."""
        return {"forward": self._batched_forwards, "backward": 0}

    # -- layout -----------------------------------------------------------------------------------
    def _trainable(self) -> list[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"] if p.requires_grad]

    def _flat_params(self) -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1) for p in self._trainable()])

    @torch.no_grad()
    def _write_params(self, flat: torch.Tensor) -> None:
        params = self._trainable()
        pieces = torch.split(flat, [p.numel() for p in params])
        torch._foreach_copy_(params, [v.view_as(p) for v, p in zip(pieces, params)])

    def _coefficients(self) -> tuple[float | torch.Tensor, float | torch.Tensor]:
        """``lam * lr`` and ``sigma * sqrt(lr)``: floats when every group agrees, else per
        coordinate."""
        drift, noise, sizes = [], [], []
        for group in self.param_groups:
            n = sum(p.numel() for p in group["params"] if p.requires_grad)
            if n:
                drift.append(group["lam"] * group["lr"])
                noise.append(group["sigma"] * math.sqrt(group["lr"]))
                sizes.append(n)
        if len(set(drift)) == 1 and len(set(noise)) == 1:
            return drift[0], noise[0]
        particles = self.global_state["particles"]
        kw = {"dtype": particles.dtype, "device": particles.device}
        sizes_t = torch.tensor(sizes, device=particles.device)
        return (
            torch.tensor(drift, **kw).repeat_interleave(sizes_t),
            torch.tensor(noise, **kw).repeat_interleave(sizes_t),
        )

    # -- population evaluation ---------------------------------------------------------------------
    def _named_targets(self, model: nn.Module) -> list[str]:
        names = {p: name for name, p in model.named_parameters(remove_duplicate=False)}
        missing = [i for i, p in enumerate(self._trainable()) if p not in names]
        if missing:
            raise ValueError(
                f"CBO: {len(missing)} optimized parameter(s) do not belong to the model the closure "
                "evaluates; pass the model's own parameters"
            )
        return [names[p] for p in self._trainable()]

    def _evaluate_vmapped(
        self, closure: Callable[..., Any], model: nn.Module, rows: torch.Tensor
    ) -> torch.Tensor:
        wrapper = _ClosureModule(model, lambda: self.evaluate(closure, backward=False))
        names = ["model." + n for n in self._named_targets(model)]
        shapes = [p.shape for p in self._trainable()]
        sizes = [p.numel() for p in self._trainable()]

        def loss_of(row: torch.Tensor) -> torch.Tensor:
            pieces = torch.split(row, sizes)
            tensors = {n: v.view(s) for n, v, s in zip(names, pieces, shapes)}
            return torch.func.functional_call(wrapper, tensors, (), strict=False)

        batched = torch.func.vmap(loss_of, randomness="same", chunk_size=self.eval_chunk_size)
        calls = self.global_state["evaluations"]
        losses = batched(rows)
        self._batched_forwards += rows.shape[0] - (self.global_state["evaluations"] - calls)
        return losses

    def _evaluate_one_by_one(self, closure: Callable[..., Any], rows: torch.Tensor) -> torch.Tensor:
        current = self._flat_params()
        losses = []
        try:
            for row in rows:
                self._write_params(row)
                losses.append(self.evaluate(closure, backward=False).reshape(()))
        finally:
            self._write_params(current)
        return torch.stack(losses)

    @torch.no_grad()
    def _evaluate(self, closure: Callable[..., Any], rows: torch.Tensor) -> torch.Tensor:
        model = self.model if self.model is not None else getattr(closure, "model", None)
        if model is not None and self.vectorize and not self._vmap_failed:
            try:
                return self._evaluate_vmapped(closure, model, rows)
            except (ClosureOutputError, ClosureOutputTypeError):
                raise  # the closure returned no loss: not a reason to stop vectorising
            except Exception as err:  # noqa: BLE001 - any vmap failure falls back, with a warning
                self._vmap_failed = True
                warnings.warn(
                    f"CBO: the model cannot be evaluated vectorised over particles ({err}); "
                    "evaluating the particles one by one from now on",
                    RuntimeWarning,
                    stacklevel=3,
                )
        return self._evaluate_one_by_one(closure, rows)

    # -- the step ----------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[..., Any] | None = None) -> float:  # type: ignore[override]
        """One CBO step; returns the loss at the parameters on entry (see the class docstring)."""
        if closure is None:
            raise ValueError(
                "CBO needs a closure: opt.step(closure), where closure(backward=False) returns the "
                "loss of the current parameters (see anyorder.core.make_closure)"
            )
        self.check_hyperparameters()
        gs = self.global_state
        current = self._flat_params()
        particles = gs["particles"]
        if particles is None:
            gen = generator_for(self.seed, 0, query=1, device="cpu")
            noise = torch.randn((self.n_particles, current.numel()), generator=gen)
            particles = current + self.init_std * noise.to(current)
        with self.restoring():
            losses = self._evaluate(closure, torch.cat([particles, current[None]]))
        losses = losses.detach().to(torch.float64)
        gs["function_evaluations"] += particles.shape[0] + 1
        current_loss = float(losses[-1])
        energies = sanitize_energies(losses[:-1])
        best = float(energies.min())
        if not self.loss_is_finite(best):
            gs["step"] += 1
            return current_loss
        gs["particles"] = particles  # the swarm exists once a step has used it
        alpha = gs["alpha"]
        centre, weights = consensus(particles, energies, alpha)
        gen = generator_for(self.seed, gs["step"] + 1, device=particles.device)
        if self.batch_size is None:
            target = centre
        else:
            target = batch_consensus(particles, energies, alpha, self.batch_size, gen)
        gs.update(
            consensus_loss=current_loss,
            weighted_energy=float(weights @ energies.nan_to_num(posinf=0.0)),
            best_energy=best,
            variance=float(particle_variance(particles, centre)),
        )
        drift_coef, noise_coef = self._coefficients()
        cbo_update_(particles, target, drift_coef, noise_coef, self.noise, gen)
        self._write_params(centre)
        gs["alpha"] = min(alpha * self.alpha_factor, self.alpha_max)
        gs["step"] += 1
        return current_loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        particles = self.global_state.get("particles")
        if particles is not None:
            ref = self._trainable()[0]
            self.global_state["particles"] = particles.to(dtype=ref.dtype, device=ref.device)
