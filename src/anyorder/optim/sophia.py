"""Sophia (Liu et al., "Sophia: A Scalable Stochastic Second-order Optimizer for Language Model
Pre-training", ICLR 2024), Algorithm 3 with the Hutchinson (Algorithm 1) or Gauss-Newton-Bartlett
(Algorithm 2) diagonal estimate.

**Convention.** We follow the paper's Algorithm 3 and the official code's parametrisation
(``Liuhong99/Sophia``, ``SophiaG``):

    p <- p (1 - lr wd)                                       (decoupled weight decay)
    m <- b1 m + (1 - b1) g                                   (every step, no bias correction)
    h <- b2 h + (1 - b2) h_hat                               (refresh steps only; h starts at 0)
    p <- p - lr clip(m / max(rho h, eps), 1)                 (element-wise, |clip| <= 1)

so every coordinate moves by at most ``lr``. GNB's ``h_hat`` includes the paper's factor B (the
number of label positions; the official code multiplies it into the step as ``rho * bs * h``,
so our ``rho`` equals theirs). Two details differ from the official code and follow the paper:
the denominator is ``max(rho h, eps)`` (the code adds eps, which lets a negative Hutchinson
estimate flip the step's sign), and the first refresh happens on step 0, before the first update
(Algorithm 3 refreshes when t mod k = 1, t from 1; the code refreshes after step k - 1, so its
first k steps are sign steps). ``pytorch-optimizer``'s ``SophiaH`` uses the first arXiv version's
parametrisation ``lr' clip(m / max(h, eps), rho')``, which is ours with ``lr' = lr / rho`` and
``rho' = 1 / rho`` (up to eps).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from functools import partial
from typing import Any

import torch

from anyorder.curvature.gauss_newton import GaussNewtonBartlett
from anyorder.curvature.hutchinson import HutchinsonDiagonal
from anyorder.functional.sophia import ema_, sophia_, sophia_clip_count
from anyorder.optim._common import check_betas, check_nonnegative, check_positive_int
from anyorder.optim._curvature import CurvatureOptimizer, total_norm

__all__ = ["Sophia", "SOPHIA_ESTIMATORS"]

SOPHIA_ESTIMATORS = ("hutchinson", "gnb")
_MOMENTS = ("exp_avg", "hessian")


def _clip_fraction(
    groups: list[tuple[list[torch.Tensor], list[torch.Tensor], float, float]],
) -> float:
    """Share of the coordinates of ``(exp_avgs, hessians, rho, eps)`` groups that Sophia clips."""
    count = sum(float(sophia_clip_count(m, h, rho=rho, eps=eps)) for m, h, rho, eps in groups)
    total = sum(t.numel() for m, _, _, _ in groups for t in m)
    return count / total


class Sophia(CurvatureOptimizer):
    """Sophia (Liu et al., 2023): clipped ratio of a gradient EMA to a diagonal-Hessian EMA.

    Args:
        params: parameters or param groups.
        lr: learning rate, the largest step of any coordinate (the official code uses 1e-4 to
            6e-4 for GPT-2).
        betas: (b1, b2) of the gradient EMA and the Hessian EMA.
        rho: the paper's gamma: scale of the Hessian in the denominator.
        weight_decay: decoupled weight decay.
        eps: floor of the denominator.
        update_every: the paper's k: refresh the Hessian estimate every this many steps.
        estimator: ``"hutchinson"`` (Sophia-H; needs ``opt.step(closure)``), ``"gnb"``
            (Sophia-G; see below) or an estimator object with
            ``estimate(closure, params, step, indices)`` (e.g.
            :class:`anyorder.curvature.HutchinsonDiagonal` with other settings).
        n_samples: Hutchinson probes per refresh.
        probe: Hutchinson probe distribution, ``"rademacher"`` (default, lower variance) or
            ``"gaussian"`` (the paper's).
        seed: seed of the probes / GNB's sampled labels, keyed by (seed, step).
        hvp: Hessian-vector products: ``"auto"``, ``"autograd"`` or ``"finite_difference"``
            (see :mod:`anyorder.curvature.hvp`).
        track_stats: offer :attr:`telemetry`'s clip fraction (computed when read, see below).
        on_nonfinite: ``"skip"`` or ``"raise"`` (see :class:`anyorder.core.AnyOrderOptimizer`).

    Usage. Sophia-H: ``opt.step(closure)`` every step (``closure(backward=False)`` is
    differentiated by the optimizer on refresh steps; the user never passes ``create_graph``).
    Sophia-G: either ``opt.step(closure)`` with a closure returning ``(loss, logits)`` (with
    ``backward=True`` it calls ``loss.backward()`` as usual), or the standard
    ``loss.backward(); opt.step()`` between refreshes plus, on refresh steps
    (:attr:`hessian_due` is true: steps 0, k, 2k, ...), a call of
    ``opt.update_hessian(logits)`` with logits that still carry their graph; ``step()`` without
    a closure on a refresh step that got no ``update_hessian`` raises ``ValueError``.

    Telemetry (:attr:`telemetry` after each step): ``clip_fraction`` (share of coordinates whose
    step was clipped to ``lr``), ``hessian_norm`` (Euclidean norm of the Hessian EMA h),
    ``refreshed`` (whether this step refreshed h) and ``hvp_method``. The two norms are
    computed on first read, from the state the step left (m and h do not change until the next
    update or refresh), so a step costs no reductions for them.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.965, 0.99),
        rho: float = 0.04,
        weight_decay: float = 0.1,
        *,
        eps: float = 1e-15,
        update_every: int = 10,
        estimator: str | Any = "hutchinson",
        n_samples: int = 1,
        probe: str = "rademacher",
        seed: int = 0,
        hvp: str = "auto",
        track_stats: bool = True,
        on_nonfinite: str = "skip",
    ) -> None:
        betas = check_betas(betas)
        rho = check_nonnegative(rho, "rho")
        weight_decay = check_nonnegative(weight_decay, "weight_decay")
        eps = check_nonnegative(eps, "eps")
        update_every = check_positive_int(update_every, "update_every")
        if isinstance(estimator, str):
            if estimator == "hutchinson":
                est: Any = HutchinsonDiagonal(n_samples, seed, probe, hvp, owner="Sophia")
            elif estimator == "gnb":
                est = GaussNewtonBartlett(seed, owner="Sophia")
            else:
                raise ValueError(
                    f"unknown estimator {estimator!r}; choose one of "
                    f"{', '.join(SOPHIA_ESTIMATORS)} or pass an estimator object"
                )
        elif callable(getattr(estimator, "estimate", None)):
            est = estimator
        else:
            raise TypeError(
                "estimator must be 'hutchinson', 'gnb' or an object with "
                f"estimate(closure, params, step, indices), got {type(estimator).__name__}"
            )
        if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
            raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
        defaults = {"lr": lr, "betas": betas, "rho": rho, "weight_decay": weight_decay, "eps": eps}
        super().__init__(
            params,
            defaults,
            estimator=est,
            update_every=update_every,
            seed=seed,
            on_nonfinite=on_nonfinite,
        )
        self.track_stats = track_stats

    @property
    def is_gnb(self) -> bool:
        """Whether the estimator is Gauss-Newton-Bartlett (works with logits)."""
        return isinstance(self.estimator, GaussNewtonBartlett)

    @property
    def returns_logits(self) -> bool:  # type: ignore[override]
        """Sophia-G's closure returns ``(loss, logits)``."""
        return self.is_gnb

    def _refresh(self, items, diagonal: list[torch.Tensor]) -> None:
        # _grouped sorts the diagonal into the groups as it would gradients
        for group, (_, values, _, hessians) in self._grouped(items, diagonal, _MOMENTS):
            ema_(hessians, values, group["betas"][1])
        self._mark_refreshed(int(self.global_state["step"]))
        hessians = [self.state[p]["hessian"] for _, p, _ in items]
        self._telemetry["hessian_norm"] = partial(total_norm, hessians)

    @torch.no_grad()
    def update_hessian(self, logits: torch.Tensor, *, retain_graph: bool = True) -> None:
        """Refresh the Hessian EMA from ``logits`` (with their graph) by GNB, for training loops
        that call ``loss.backward(); opt.step()`` themselves. Only with ``estimator="gnb"``.

        Call it when :attr:`hessian_due` is true, before that step's ``step()`` and before
        ``loss.backward()`` (the graph is retained for that backward pass, which then frees it;
        pass ``retain_graph=False`` if the logits' graph is not needed again). It does not touch
        ``.grad``. Labels are sampled with the key (seed, current step).
        """
        if not self.is_gnb:
            raise ValueError(
                "update_hessian(logits) is for Sophia(estimator='gnb'); the Hutchinson estimator "
                "needs opt.step(closure)"
            )
        self.check_hyperparameters()
        items = self._items()
        step = int(self.global_state["step"])
        with torch.enable_grad():
            diagonal = self.estimator.from_logits(
                logits, [p for _, p, _ in items], step, retain_graph=retain_graph
            )
        if self._finite(None, [], diagonal):
            self._materialize("clip_fraction")  # it reads h, which the refresh changes
            self._refresh(items, diagonal)

    @torch.no_grad()
    def step(self, closure: Callable[..., Any] | None = None) -> torch.Tensor | None:  # type: ignore[override]
        """One Sophia step; returns the loss (``None`` without a closure)."""
        self.check_hyperparameters()
        step = int(self.global_state["step"])
        items = self._items()
        due = self.hessian_due
        self._telemetry["refreshed"] = False
        loss: torch.Tensor | None = None
        diagonal: list[torch.Tensor] | None = None
        if closure is None:
            if not self.is_gnb:
                raise ValueError(
                    "Sophia(estimator='hutchinson') computes Hessian-vector products itself and "
                    "needs a closure: call opt.step(closure) with closure(backward: bool = True) "
                    "-> loss (anyorder.core.make_closure builds one); for the standard "
                    "loss.backward(); opt.step() loop use estimator='gnb'"
                )
            if due:
                raise ValueError(
                    f"Sophia(estimator='gnb') refreshes its Hessian estimate on step {step} "
                    f"(every update_every={self.update_every} steps from step 0) and needs the "
                    "logits there: call opt.update_hessian(logits) before opt.step() when "
                    "opt.hessian_due is true, or call opt.step(closure) with a closure returning "
                    "(loss, logits)"
                )
            grads = [p.grad for _, p, _ in items]
        else:
            loss, grads, diagonal = self._evaluate(closure, items, step, due)
        if not self._finite(loss, grads, diagonal):
            self.global_state["step"] = step + 1
            return loss
        if diagonal is not None:
            self._set_grads(items, grads)
            self._telemetry.pop("clip_fraction", None)  # it reads h, which the refresh changes
            self._refresh(items, diagonal)
        chosen = self._grouped(items, grads, _MOMENTS)
        for group, (params, grad_list, exp_avgs, hessians) in chosen:
            sophia_(
                params,
                grad_list,
                exp_avgs,
                hessians,
                lr=group["lr"],
                beta1=group["betas"][0],
                rho=group["rho"],
                eps=group["eps"],
                weight_decay=group["weight_decay"],
            )
        if self.track_stats and chosen:
            # Computed on first read from the state this step leaves (m updated, h as used);
            # the next change of m or h is the next update or refresh, which replaces it.
            self._telemetry["clip_fraction"] = partial(
                _clip_fraction,
                [(cols[2], cols[3], group["rho"], group["eps"]) for group, cols in chosen],
            )
        self.global_state["step"] = step + 1
        self.global_state["updates"] += 1
        return loss
