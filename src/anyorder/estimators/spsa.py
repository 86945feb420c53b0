"""SPSA / MeZO random-direction gradient estimates from function values only.

Papers: Spall's SPSA; MeZO ("Fine-Tuning Language Models with Just Forward Passes"), on which
"Just One Byte (per gradient)" and "Fine-tuning Quantized Neural Networks with Zeroth-order
Optimization" build.

For each query q a direction z_q (one tensor per parameter, drawn by
:func:`anyorder.core.rng.direction` from ``(seed, step, q, tensor index)``) gives the projected
gradient

* two-point: g_q = (f(w + mu z_q) - f(w - mu z_q)) / (2 mu)   (2 evaluations per query)
* one-sided: g_q = (f(w + mu z_q) - f(w)) / mu                (1 + n_queries evaluations)

and the estimate is ĝ = (1/n) sum_q g_q z_q, an unbiased estimate of the gradient of the
Gaussian-smoothed loss (of the loss itself for quadratics with the two-point form); its variance
falls as 1/n.

Memory (the MeZO property): the weights are perturbed in place, z is regenerated from its key
whenever it is needed (to perturb, to restore, to form the update), one chunk of
:data:`anyorder.core.rng.CHUNK` elements at a time, so no direction, copy or estimate of
parameter size ever exists. A step makes three passes over the weights for one query: +mu z, -2 mu z,
then restore and update together (:meth:`SPSA.finish_tensor`), instead of MeZO's four.

Precision: losses are read as Python floats (float64), so g_q is formed in float64 whatever the
weights' dtype.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from anyorder.core.rng import (
    CHUNK,
    DISTRIBUTIONS,
    add_directions_,
    direction_chunks,
    flat_view,
)
from anyorder.estimators.restore import PerturbationGuard

__all__ = ["SPSA", "SPSASample", "IndexedParams", "RESTORES"]

#: How :meth:`SPSA.sample` restores the weights on an exception or a non-finite loss.
RESTORES = ("compact", "arithmetic")

#: ``(tensor index, parameter)`` pairs; the index keys the tensor's random direction.
IndexedParams = Sequence[tuple[int, torch.Tensor]]


@dataclass(frozen=True)
class SPSASample:
    """What one estimate measured: projected gradients g_q and the losses evaluated.

    After :meth:`SPSA.sample` the weights are still displaced by ``pending * z_last``;
    :meth:`SPSA.finish_tensor` (or :meth:`SPSA.restore`) removes that displacement.
    """

    step: int
    projected: tuple[float, ...]
    losses: tuple[float, ...]
    pending: float

    @property
    def finite(self) -> bool:
        """Whether every loss (hence every g_q) is finite."""
        return all(math.isfinite(v) for v in self.losses)

    @property
    def mean_loss(self) -> float:
        """Mean of the losses evaluated in this step."""
        return sum(self.losses) / len(self.losses)


class SPSA:
    """The SPSA / MeZO estimator. See the module docstring for the maths and memory policy.

    Args:
        mu: perturbation scale (> 0).
        n_queries: directions per estimate (>= 1).
        distribution: ``"auto"`` (default: Rademacher where directions are drawn on the CPU,
            Gaussian where they are drawn on an accelerator; each is the faster there, see
            BENCHMARKS.md), ``"rademacher"``, ``"gaussian"`` or ``"sphere"`` (per tensor, radius
            sqrt(numel), so E[z z^T] = I for all three).
        one_sided: forward differences against f(w) instead of central differences.
        seed: the direction stream's seed.
        portable: draw every direction on the CPU (then move it), so that processes on any
            device type regenerate the same numbers; by default directions are drawn where the
            parameter lives, which is much faster on accelerators (CPU and CUDA streams differ).
        restore: how :meth:`sample` puts the weights back when an evaluation raises or a loss is
            non-finite: ``"compact"`` (default: bit for bit, keeping 2 bits per element and the
            few elements the arithmetic restore cannot recover during the call, see
            :mod:`anyorder.estimators.restore`) or ``"arithmetic"`` (MeZO's: the displacement is
            subtracted again; no memory, exact only up to an ulp).
    """

    def __init__(
        self,
        mu: float = 1e-3,
        n_queries: int = 1,
        distribution: str = "auto",
        one_sided: bool = False,
        seed: int = 0,
        portable: bool = False,
        restore: str = "compact",
    ) -> None:
        if not isinstance(mu, (int, float)) or not mu > 0 or not math.isfinite(mu):
            raise ValueError(f"mu must be a finite number > 0, got {mu!r}")
        if not isinstance(n_queries, int) or isinstance(n_queries, bool) or n_queries < 1:
            raise ValueError(f"n_queries must be an integer >= 1, got {n_queries!r}")
        if distribution != "auto" and distribution not in DISTRIBUTIONS:
            raise ValueError(
                f"unknown distribution {distribution!r}; choose one of auto, {', '.join(DISTRIBUTIONS)}"
            )
        if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
            raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
        if restore not in RESTORES:
            raise ValueError(f"unknown restore {restore!r}; choose one of {', '.join(RESTORES)}")
        self.restore_mode = restore
        self.mu = float(mu)
        self.n_queries = n_queries
        self.distribution = distribution
        self.one_sided = bool(one_sided)
        self.seed = seed
        self.portable = bool(portable)

    @property
    def evaluations_per_step(self) -> int:
        """Closure evaluations one estimate costs."""
        return 1 + self.n_queries if self.one_sided else 2 * self.n_queries

    def resolve_distribution(self, device: torch.device) -> str:
        """The distribution used for a parameter on ``device`` (resolves ``"auto"``)."""
        if self.distribution != "auto":
            return self.distribution
        drawn_on_cpu = self.portable or torch.device(device).type == "cpu"
        return "rademacher" if drawn_on_cpu else "gaussian"

    def chunks(
        self, index: int, p: torch.Tensor, step: int, query: int
    ) -> Iterator[tuple[int, int, torch.Tensor]]:
        """The direction of tensor ``index`` for ``(step, query)``, chunk by chunk, over
        ``flat_view(p)``: ``(start, end, z[start:end])`` typed like ``p``."""
        return direction_chunks(
            p.numel(),
            self.seed,
            step,
            query,
            index,
            distribution=self.resolve_distribution(p.device),
            dtype=p.dtype,
            device=p.device,
            draw_on_device=not self.portable,
        )

    @torch.no_grad()
    def add_many_(
        self,
        params: IndexedParams,
        step: int,
        query: int,
        alphas: Sequence[float],
        decays: Sequence[float] | None = None,
    ) -> None:
        """p <- decays[t] * p + alphas[t] * z_t for the t-th ``(index, p)`` of ``params``, z_t its
        direction of ``(step, query)``: one pass over the weights, in one call of the compiled
        kernel where it applies (:func:`anyorder.core.rng.add_directions_`)."""
        add_directions_(
            [flat_view(p) for _, p in params],
            alphas,
            self.seed,
            step,
            query,
            [index for index, _ in params],
            distributions=[self.resolve_distribution(p.device) for _, p in params],
            decays=decays,
            draw_on_device=not self.portable,
        )

    @torch.no_grad()
    def perturb_(self, params: IndexedParams, step: int, query: int, scale: float) -> None:
        """w += scale * z_query, one pass over the weights."""
        self.add_many_(params, step, query, [scale] * len(params))

    @torch.no_grad()
    def sample(self, params: IndexedParams, loss_at: Callable[[], float], step: int) -> SPSASample:
        """Evaluate ``loss_at`` around the current weights and return the projected gradients.

        ``loss_at()`` returns the loss at the weights as they are when it is called. The weights
        are left displaced by ``pending * z_last`` (see :class:`SPSASample`). If a loss is not
        finite, the remaining queries are not evaluated. If ``loss_at`` raises (any exception,
        ``KeyboardInterrupt`` included) the weights are put back before the exception propagates.

        With ``restore="compact"`` (the default) that restore is bit for bit
        (:class:`anyorder.estimators.restore.PerturbationGuard`: 2 bits per element and a short
        list of escapes, kept during the call), a non-finite loss is restored the same way inside
        this call (the sample then has ``pending == 0``), and with ``n_queries > 1`` every query
        starts from exactly the starting weights. With ``restore="arithmetic"`` (MeZO's restore,
        no memory) the displacement is subtracted again, which is exact only up to the rounding
        of the additions (an ulp for a few per cent of the elements), and later queries start
        from the previous query's rounded restore.
        """
        mu, projected, losses = self.mu, [], []
        last = self.n_queries - 1
        shift = [0, 0.0]  # (query, displacement) the weights carry now
        guard = PerturbationGuard(self, params, step) if self.restore_mode == "compact" else None
        try:
            base = loss_at() if self.one_sided else None
            if base is not None:
                losses.append(base)
                if not math.isfinite(base):
                    return SPSASample(step, (), tuple(losses), 0.0)
            for q in range(self.n_queries):
                if guard is not None:
                    guard.first_move_(q, mu, None if self.one_sided else -2 * mu)
                else:
                    self.perturb_(params, step, q, mu)
                shift[:] = [q, mu]
                plus = loss_at()
                losses.append(plus)
                if self.one_sided:
                    pending = -mu
                    projected.append((plus - base) / mu)
                else:
                    self.perturb_(params, step, q, -2 * mu)
                    if guard is not None:
                        guard.moved(-2 * mu)
                    shift[:] = [q, -mu]
                    minus = loss_at()
                    losses.append(minus)
                    pending = mu
                    projected.append((plus - minus) / (2 * mu))
                if not math.isfinite(projected[-1]):
                    if guard is not None:
                        guard.restore()
                        pending = 0.0
                    return SPSASample(step, tuple(projected), tuple(losses), pending)
                if q != last:
                    if guard is not None:
                        guard.restore()
                    else:
                        self.perturb_(params, step, q, pending)
                    shift[:] = [q, 0.0]
        except BaseException:
            # Any exception (KeyboardInterrupt included) inside an evaluation: put the weights
            # back before it propagates (bit for bit with the guard, else to the rounding).
            if guard is not None:
                guard.restore()
            elif shift[1]:
                self.perturb_(params, step, int(shift[0]), -shift[1])
            raise
        return SPSASample(step, tuple(projected), tuple(losses), pending)

    @torch.no_grad()
    def restore(self, params: IndexedParams, sample: SPSASample) -> None:
        """Undo the pending displacement without updating (used when a loss was not finite)."""
        if sample.pending:
            self.perturb_(params, sample.step, len(sample.projected) - 1, sample.pending)

    @torch.no_grad()
    def finish_chunks(
        self, index: int, p: torch.Tensor, sample: SPSASample
    ) -> Iterator[tuple[int, int, torch.Tensor]]:
        """Restore tensor ``index`` chunk by chunk and yield its estimate (1/n) sum_q g_q z_q.

        Yields ``(start, end, estimate[start:end])`` over ``flat_view(p)``; each chunk of ``p`` is
        restored before its estimate is yielded. The last query's direction serves both. Consume
        the whole iterator: an abandoned one leaves later chunks displaced.
        """
        n = len(sample.projected)
        last = n - 1
        flat = flat_view(p)
        others = [self.chunks(index, p, sample.step, q) for q in range(last)]
        for start, end, z in self.chunks(index, p, sample.step, last):
            flat[start:end].add_(z, alpha=sample.pending)
            estimate = z.mul_(sample.projected[last] / n)
            for q, stream in enumerate(others):
                estimate.add_(next(stream)[2], alpha=sample.projected[q] / n)
            yield start, end, estimate

    @torch.no_grad()
    def finish_tensor(self, index: int, p: torch.Tensor, sample: SPSASample) -> torch.Tensor:
        """Restore tensor ``index`` and return its whole estimate (fresh memory of ``p``'s size,
        laid out like ``p``)."""
        out = torch.empty_like(p)
        flat_out = flat_view(out)
        for start, end, estimate in self.finish_chunks(index, p, sample):
            flat_out[start:end] = estimate
        return out

    @torch.no_grad()
    def estimate_(
        self,
        params: Sequence[torch.Tensor],
        closure: Callable[..., torch.Tensor],
        step: int,
    ) -> SPSASample:
        """Write the estimate into every ``p.grad`` (for use with first-order rules).

        ``closure`` follows the closure contract and is called with ``backward=False``.
        Unlike the ZO optimizers this materialises a gradient buffer per parameter. If a loss is
        not finite, the weights are restored and every ``p.grad`` is set to ``None``, so a
        following ``torch.optim`` step leaves them alone instead of reusing stale gradients.
        """
        from anyorder.core.closure import call_closure, check_closure_output

        indexed = [(i, p) for i, p in enumerate(params) if p.requires_grad]

        def loss_at() -> float:
            loss, _ = check_closure_output(call_closure(closure, backward=False))
            return float(loss.detach().double())

        sample = self.sample(indexed, loss_at, step)
        if not sample.finite:
            self.restore(indexed, sample)
            for _, p in indexed:
                p.grad = None
            return sample
        for index, p in indexed:
            p.grad = self.finish_tensor(index, p, sample)
        return sample


def warn_if_mu_below_resolution(params: IndexedParams, mu: float) -> None:
    """Warn when ``mu`` is below the spacing of floating-point numbers at the weights' size.

    A perturbation smaller than half an ulp of |w| rounds away in low-precision dtypes (bfloat16's
    ulp at |w| = 0.05 is about 2.4e-4), so the two evaluations would see the same weights.
    """
    for index, p in params:
        if not p.is_floating_point() or p.numel() == 0:
            continue
        # The median magnitude of (at most) the first chunk: no copy of a large tensor is made.
        typical = float(flat_view(p.detach())[:CHUNK].abs().float().median())
        ulp = torch.finfo(p.dtype).eps * max(typical, torch.finfo(p.dtype).tiny)
        if mu < ulp:
            warnings.warn(
                f"mu={mu:g} is below the resolution of {p.dtype} weights of typical size "
                f"{typical:.3g} (ulp {ulp:.3g}) in tensor {index}: perturbations round away; "
                "use a larger mu or float32 weights",
                RuntimeWarning,
                stacklevel=3,
            )
            return
