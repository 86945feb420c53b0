"""Zeroth-order optimizers: the SGD and Adam rules fed by the SPSA / MeZO estimate.

``ZOSGD`` is MeZO's ZO-SGD (with optional momentum and weight decay); ``ZOAdam`` is the Adam rule
(``torch.optim.Adam`` semantics, L2 weight decay) fed the same estimate, as in the MeZO paper's
ZO-Adam variant. Both evaluate the closure with ``backward=False`` under ``torch.no_grad()`` and
never build an autograd graph. Memory beyond inference: ZOSGD keeps nothing (a momentum buffer if
``momentum > 0``), ZOAdam its two moment buffers; directions and estimates exist one chunk
(:data:`anyorder.core.rng.CHUNK` elements) at a time. During a step the default exact restore
(``restore="compact"``, :mod:`anyorder.estimators.restore`) keeps 2 bits per element and a short
list of escapes, so that an exception in the closure or a non-finite loss leaves the weights bit
for bit as they were (MeZO's own restore is exact only to an ulp).

A step asked to train parameters flagged as freshly initialised (:mod:`anyorder.core.fresh`)
warns once with :class:`~anyorder.core.fresh.FreshHeadWarning`: MeZO works only from a
task-aligned start.

Evaluations per step: ``2 * n_queries`` (``1 + n_queries`` when ``one_sided``). ``step(closure)``
returns the mean of the losses it evaluated, as a float.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from anyorder.core.base import AnyOrderOptimizer
from anyorder.core.fresh import warn_if_fresh
from anyorder.core.rng import flat_view
from anyorder.estimators.spsa import SPSA, SPSASample, warn_if_mu_below_resolution
from anyorder.functional import adam_, sgd_
from anyorder.optim._common import indexed_params

__all__ = ["ZOSGD", "ZOAdam", "ZOProbeRecord", "ZO_RESTORES"]

#: How a zeroth-order step puts the weights back when the closure raises or a loss is
#: non-finite: ``"compact"`` (bit for bit, about 1/16 of float32 weights' memory during the
#: step), ``"copy"`` (bit for bit, a full copy) or ``"arithmetic"`` (MeZO's, no memory, to an ulp).
ZO_RESTORES = ("compact", "copy", "arithmetic")


@dataclass(frozen=True)
class ZOProbeRecord:
    """Diagnostics of one probed step: how well the ZO estimate tracks the true gradient.

    ``cosine`` is between the estimate and the backprop gradient of the same batch (for a random
    Gaussian direction its typical size is sqrt(n_queries / d)); ``projected_gradient`` is the
    mean |g_q|; ``estimate_norm`` and ``gradient_norm`` are Euclidean norms over all tensors.
    """

    step: int
    cosine: float
    projected_gradient: float
    estimate_norm: float
    gradient_norm: float


class _ZeroOrderOptimizer(AnyOrderOptimizer):
    """Shared machinery: the estimator, the seed stream, probing and the non-finite policy."""

    def __init__(
        self,
        params: Iterable[Any],
        defaults: dict[str, Any],
        *,
        mu: float,
        n_queries: int,
        distribution: str,
        one_sided: bool,
        seed: int,
        probe_every: int,
        on_nonfinite: str,
        portable_directions: bool,
        exact_restore: bool,
        restore: str,
    ) -> None:
        if not isinstance(probe_every, int) or probe_every < 0:
            raise ValueError(f"probe_every must be an integer >= 0 (0: off), got {probe_every!r}")
        if restore not in ZO_RESTORES:
            raise ValueError(f"unknown restore {restore!r}; choose one of {', '.join(ZO_RESTORES)}")
        if exact_restore:
            restore = "copy"
        # The estimator validates mu, n_queries, distribution and seed.
        self.estimator = SPSA(
            mu,
            n_queries,
            distribution,
            one_sided,
            seed,
            portable_directions,
            restore="compact" if restore == "compact" else "arithmetic",
        )
        super().__init__(params, defaults, on_nonfinite=on_nonfinite)
        self.probe_every = probe_every
        self.probes: list[ZOProbeRecord] = []
        self.last_sample: SPSASample | None = None
        self.global_state.update({"seed": seed, "updates": 0})
        self.restore = restore
        self.exact_restore = restore == "copy"
        self._checked_resolution = False

    # Tensor indices are positions over all param groups, so a frozen tensor keeps its key.
    def _indexed(self) -> list[tuple[int, torch.Tensor, dict[str, Any]]]:
        return indexed_params(self.param_groups)

    def check_hyperparameters(self) -> None:
        """The param groups' hyperparameters and the estimator's ``mu`` (finite, > 0)."""
        super().check_hyperparameters()
        mu = self.estimator.mu
        if isinstance(mu, bool) or not isinstance(mu, (int, float)) or not (
            math.isfinite(mu) and mu > 0
        ):
            raise ValueError(f"{type(self).__name__}: invalid mu={mu!r}: it must be a finite number > 0")

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.estimator.seed = int(self.global_state["seed"])

    def _true_gradients(
        self, closure: Callable[..., Any], indexed: list[tuple[int, torch.Tensor, dict[str, Any]]]
    ) -> dict[int, torch.Tensor]:
        """Backprop gradients of the closure's loss, each laid out like its parameter (so that
        ``flat_view`` walks both in the same order as the directions)."""
        params = [p for _, p, _ in indexed]
        with torch.enable_grad():
            loss = self.evaluate(closure, backward=False, graph=True)
            grads = torch.autograd.grad(loss, params, allow_unused=True)
        out = {}
        for (i, p, _), g in zip(indexed, grads):
            laid_out = torch.zeros_like(p)  # preserves p's strides (e.g. channels-last)
            if g is not None:
                laid_out.copy_(g)
            out[i] = laid_out
        return out

    def _fused_update(
        self, indexed: list[tuple[int, torch.Tensor, dict[str, Any]]], sample: SPSASample
    ) -> list[tuple[int, torch.Tensor, dict[str, Any]]]:
        """Restore and update, in one pass over the weights, the tensors whose rule allows it;
        return the others (all of them by default)."""
        return indexed

    def _buffers(self, p: torch.Tensor, group: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The rule's state tensors for ``p`` (created on first use), laid out like ``p``."""
        return {}

    def _apply_rule(
        self,
        group: dict[str, Any],
        p: torch.Tensor,
        estimate: torch.Tensor,
        buffers: dict[str, torch.Tensor],
    ) -> None:
        """Apply the update rule in place to a chunk ``p`` (a 1-D view) given its estimate and
        the matching chunks of the state buffers."""
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure: Callable[..., Any] | None = None) -> float:  # type: ignore[override]
        """One zeroth-order step; returns the mean loss evaluated (a float)."""
        if closure is None:
            raise ValueError(
                f"{type(self).__name__} needs a closure: opt.step(closure), where closure(backward=False) "
                "returns the loss on the current batch"
            )
        self.check_hyperparameters()
        step = int(self.global_state["step"])
        indexed = self._indexed()
        pairs = [(i, p) for i, p, _ in indexed]
        if not self._checked_resolution:
            warn_if_mu_below_resolution(pairs, self.estimator.mu)
            warn_if_fresh([p for _, p in pairs], type(self).__name__)
            self._checked_resolution = True
        saved = [p.detach().clone() for _, p in pairs] if self.restore == "copy" else None

        def put_back() -> None:
            if saved is not None:
                torch._foreach_copy_([p for _, p in pairs], saved)

        with self.restoring(put_back):
            probe = self.probe_every > 0 and step % self.probe_every == 0
            true_grads = self._true_gradients(closure, indexed) if probe else None

            def loss_at() -> float:
                loss = self.evaluate(closure, backward=False)
                return float(loss.detach().double())

            sample = self.estimator.sample(pairs, loss_at, step)
        self.last_sample = sample
        if not sample.finite:
            if saved is None:
                self.estimator.restore(pairs, sample)
            else:
                put_back()
            self.loss_is_finite(*sample.losses)  # records the skip or raises
            self.global_state["step"] = step + 1
            return sample.mean_loss
        self.global_state["step"] = step + 1
        self.global_state["updates"] += 1
        sums = [0.0, 0.0, 0.0]  # probe: <estimate, gradient>, |estimate|^2, |gradient|^2
        rest = indexed if true_grads is not None else self._fused_update(indexed, sample)
        for i, p, group in rest:
            chunks = self.estimator.finish_chunks(i, p, sample)
            if true_grads is not None:
                chunks = _probed(chunks, flat_view(true_grads[i]), sums)
            self._update_tensor(p, group, chunks)
        if true_grads is not None:
            dot, est_sq, grad_sq = sums
            denom = math.sqrt(est_sq * grad_sq)
            self.probes.append(
                ZOProbeRecord(
                    step=step,
                    cosine=dot / denom if denom > 0 else float("nan"),
                    projected_gradient=sum(abs(g) for g in sample.projected)
                    / len(sample.projected),
                    estimate_norm=math.sqrt(est_sq),
                    gradient_norm=math.sqrt(grad_sq),
                )
            )
        return sample.mean_loss

    @torch.no_grad()
    def apply_queries(self, step: int, queries: Sequence[int], projected: Sequence[float]) -> None:
        """Update the (unperturbed) weights with the estimate ``(1/n) Σ_k g_k z_k``, where ``z_k``
        is the direction keyed by ``(seed, step, queries[k])`` and ``g_k = projected[k]``.

        This is the replay half of a step: given the measured projected gradients it regenerates
        their directions and applies the rule, with no evaluation. Distributed zeroth-order
        training ("Just One Byte", :class:`anyorder.distributed.ZOTrainer`) calls it on every
        process with everyone's (query, g) pairs in the same order, and a single process replaying
        the same sequence reproduces the weights bit for bit. Advances the step counter to
        ``step + 1``.
        """
        self.check_hyperparameters()
        if len(queries) != len(projected) or not queries:
            raise ValueError(
                f"need one projected gradient per query, got {len(queries)} queries and "
                f"{len(projected)} values"
            )
        self.global_state["updates"] += 1
        for i, p, group in self._indexed():
            streams = [self.estimator.chunks(i, p, step, int(q)) for q in queries]
            self._update_tensor(p, group, _combined(streams, projected))
        self.global_state["step"] = step + 1

    def _update_tensor(
        self,
        p: torch.Tensor,
        group: dict[str, Any],
        chunks: Iterable[tuple[int, int, torch.Tensor]],
    ) -> None:
        """Apply the rule to ``p`` given its estimate as ``(start, end, estimate)`` chunks over
        ``flat_view(p)``. Rules are element-wise, so they run chunk by chunk on views of the
        weights and state: no estimate of the tensor's size is ever formed."""
        flat = flat_view(p)
        buffers = {name: flat_view(buf) for name, buf in self._buffers(p, group).items()}
        for start, end, estimate in chunks:
            views = {name: buf[start:end] for name, buf in buffers.items()}
            self._apply_rule(group, flat[start:end], estimate, views)


def _probed(
    chunks: Iterable[tuple[int, int, torch.Tensor]], gradient: torch.Tensor, sums: list[float]
) -> Iterator[tuple[int, int, torch.Tensor]]:
    """Pass the estimate's chunks through, adding <estimate, gradient>, |estimate|^2 and
    |gradient|^2 (in float64) to ``sums`` before the rule sees each chunk."""
    for start, end, estimate in chunks:
        e64, g64 = estimate.double(), gradient[start:end].double()
        sums[0] += float((e64 * g64).sum())
        sums[1] += float(e64.pow(2).sum())
        sums[2] += float(g64.pow(2).sum())
        yield start, end, estimate


def _combined(
    streams: list[Iterator[tuple[int, int, torch.Tensor]]], projected: Sequence[float]
) -> Iterator[tuple[int, int, torch.Tensor]]:
    """Chunks of (1/n) sum_k g_k z_k from the directions' chunk streams, one chunk at a time."""
    n = len(projected)
    for chunks in zip(*streams):
        start, end, estimate = chunks[0]
        estimate.mul_(projected[0] / n)
        for (_, _, z), g in zip(chunks[1:], projected[1:]):
            estimate.add_(z, alpha=g / n)
        yield start, end, estimate


class ZOSGD(_ZeroOrderOptimizer):
    """MeZO / ZO-SGD: SGD (momentum, weight decay as ``torch.optim.SGD``) on the SPSA estimate.

    Args:
        params: parameters or param groups.
        lr: learning rate.
        mu: perturbation scale.
        momentum, weight_decay: as in ``torch.optim.SGD``.
        n_queries: directions per step (estimate variance falls as 1/n_queries).
        distribution: ``"auto"`` (default: Rademacher when directions are drawn on the CPU,
            about three times cheaper there than Gaussians and a lower-variance estimate;
            Gaussian when drawn on an accelerator, where it is the cheaper), ``"rademacher"``,
            ``"gaussian"`` or ``"sphere"``.
        one_sided: forward differences (1 + n_queries evaluations) instead of central (2 n).
        seed: direction stream seed; directions are keyed by (seed, step, query, tensor index).
        probe_every: every this many steps, also compute the backprop gradient and record a
            :class:`ZOProbeRecord` in ``self.probes`` (opt-in: costs a backward pass and
            gradient memory on those steps).
        on_nonfinite: ``"skip"`` (weights restored, step recorded in
            ``global_state["skipped_steps"]``) or ``"raise"``.
        portable_directions: draw directions on the CPU so that replicas on any device type
            agree (see :class:`anyorder.estimators.SPSA`); default: on the parameter's device.
        restore: how a step that raises (any exception in the closure, ``KeyboardInterrupt``
            included) or is skipped for a non-finite loss puts the weights back.
            ``"compact"`` (default): bit for bit, from the low 2 bits of each element and the
            few elements the arithmetic restore cannot recover (tiny and zero weights), kept
            during the step only: ``numel / 4`` bytes (1/16 of float32 weights, 1/8 of
            bfloat16 ones) plus 8-16 bytes per escape (:mod:`anyorder.estimators.restore`);
            with ``n_queries > 1`` each query then starts from exactly the step's starting
            weights. ``"copy"``: bit for bit from a full copy of the weights (2x their memory
            during the step). ``"arithmetic"``: MeZO's restore, the displacement ``mu z``
            subtracted again: no memory, exact up to the rounding of the additions (an ulp for
            a few per cent of the elements after one move, about half after two).
        exact_restore: ``True`` is ``restore="copy"`` (kept for compatibility).

    Weight decay applies to every tensor of a group, biases and normalisation weights included
    (MeZO's code skips those). To skip them, put them in a group of their own::

        decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
        no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
        ZOSGD([{"params": decay}, {"params": no_decay, "weight_decay": 0.0}], lr=1e-6,
              weight_decay=0.1)

    (:func:`anyorder.optim.decay_groups` builds these groups.)
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float,
        mu: float = 1e-3,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        n_queries: int = 1,
        distribution: str = "auto",
        one_sided: bool = False,
        seed: int = 0,
        *,
        probe_every: int = 0,
        on_nonfinite: str = "skip",
        portable_directions: bool = False,
        exact_restore: bool = False,
        restore: str = "compact",
    ) -> None:
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
        super().__init__(
            params,
            {"lr": lr, "momentum": momentum, "weight_decay": weight_decay},
            mu=mu,
            n_queries=n_queries,
            distribution=distribution,
            one_sided=one_sided,
            seed=seed,
            probe_every=probe_every,
            on_nonfinite=on_nonfinite,
            portable_directions=portable_directions,
            exact_restore=exact_restore,
            restore=restore,
        )

    def _fused_update(self, indexed, sample):
        # Plain SGD with one query: w <- (1 - lr wd)(w + pending z) - lr g z, so the restore and
        # the update share one draw of z and one pass over the weights (one kernel call for all
        # momentum-free tensors).
        if len(sample.projected) != 1:
            return indexed
        fused = [(i, p, g) for i, p, g in indexed if g["momentum"] == 0]
        decays = [1 - g["lr"] * g["weight_decay"] for _, _, g in fused]
        self.estimator.add_many_(
            [(i, p) for i, p, _ in fused],
            sample.step,
            0,
            [
                d * sample.pending - g["lr"] * sample.projected[0]
                for d, (_, _, g) in zip(decays, fused)
            ],
            decays,
        )
        return [(i, p, g) for i, p, g in indexed if g["momentum"] != 0]

    def _buffers(self, p, group):
        if group["momentum"] == 0:
            return {}
        state = self.state[p]
        if "momentum_buffer" not in state:
            # Zeros give b = d on the first step, as torch.optim.SGD's clone does (no dampening).
            state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return {"momentum_buffer": state["momentum_buffer"]}

    def _apply_rule(self, group, p, estimate, buffers):
        buf = buffers.get("momentum_buffer")
        sgd_(
            [p],
            [estimate],
            [buf],
            lr=group["lr"],
            momentum=group["momentum"],
            weight_decay=group["weight_decay"],
        )


class ZOAdam(_ZeroOrderOptimizer):
    """ZO-Adam: the Adam rule (``torch.optim.Adam`` semantics) on the SPSA estimate.

    Same arguments as :class:`ZOSGD`, with Adam's ``betas`` and ``eps``; ``weight_decay`` is L2
    (added to the estimate), as in ``torch.optim.Adam``. Bias correction counts applied updates
    (skipped non-finite steps do not count).
    """

    hyperparameter_ranges = {"eps": (0.0, False, math.inf, False)}

    def __init__(
        self,
        params: Iterable[Any],
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        mu: float = 1e-3,
        weight_decay: float = 0.0,
        n_queries: int = 1,
        distribution: str = "auto",
        one_sided: bool = False,
        seed: int = 0,
        *,
        probe_every: int = 0,
        on_nonfinite: str = "skip",
        portable_directions: bool = False,
        exact_restore: bool = False,
        restore: str = "compact",
    ) -> None:
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {betas!r}")
        if not eps > 0:
            raise ValueError(f"eps must be > 0, got {eps!r}")
        super().__init__(
            params,
            {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay},
            mu=mu,
            n_queries=n_queries,
            distribution=distribution,
            one_sided=one_sided,
            seed=seed,
            probe_every=probe_every,
            on_nonfinite=on_nonfinite,
            portable_directions=portable_directions,
            exact_restore=exact_restore,
            restore=restore,
        )

    def _buffers(self, p, group):
        state = self.state[p]
        if not state:
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return {"exp_avg": state["exp_avg"], "exp_avg_sq": state["exp_avg_sq"]}

    def _apply_rule(self, group, p, estimate, buffers):
        beta1, beta2 = group["betas"]
        adam_(
            [p],
            [estimate],
            [buffers["exp_avg"]],
            [buffers["exp_avg_sq"]],
            step=int(self.global_state["updates"]),
            lr=group["lr"],
            beta1=beta1,
            beta2=beta2,
            eps=group["eps"],
            weight_decay=group["weight_decay"],
        )
