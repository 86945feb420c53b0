"""AdaHessian (Yao, Gholami, Shen, Mustafa, Keutzer & Mahoney, "ADAHESSIAN: An Adaptive Second
Order Optimizer for Machine Learning", AAAI 2021), Algorithm 1.

The second moment is an EMA of the squared Hutchinson diagonal D (Rademacher probes), spatially
averaged over each convolution kernel's window (the paper's eq. 11: the *signed* mean of D over
the window; the authors' code averages |D| instead, which biases the estimate upward), with bias
correction and the Hessian power k:

    m <- b1 m + (1 - b1) g;  v <- b2 v + (1 - b2) D_s^2  (refresh steps);
    p <- p - lr * (m / (1 - b1^t) / ((sqrt(v) / sqrt(1 - b2^s))^k + eps) + wd p),

with weight decay as in the authors' code (the paper has none): scaled by ``lr``, not by the
bias-corrected step size ``lr / (1 - b1^t)`` (that would decay 10x harder at step 1 with b1 = 0.9). With ``update_every=k > 1`` the
diagonal is re-estimated every k steps and v (and its bias correction, over s refreshes) only
changes then.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from functools import partial
from typing import Any

import torch

from anyorder.curvature.hutchinson import HutchinsonDiagonal
from anyorder.curvature.hvp import require_contract_closure
from anyorder.functional.adahessian import adahessian_, spatial_average_
from anyorder.optim._common import check_betas, check_nonnegative, check_positive_int
from anyorder.optim._curvature import CurvatureOptimizer, total_norm

__all__ = ["AdaHessian"]


class AdaHessian(CurvatureOptimizer):
    """AdaHessian (Yao et al., 2021): Adam with a Hutchinson Hessian diagonal for the second
    moment.

    Args:
        params: parameters or param groups.
        lr: learning rate (the paper's default 0.15).
        betas: (b1, b2) of the gradient EMA and of the squared-diagonal EMA.
        eps: added to the denominator.
        weight_decay: as in the authors' code, ``p -= lr * wd * p`` (no bias correction).
        hessian_power: the paper's k in (0, 1].
        update_every: re-estimate the diagonal every this many steps.
        spatial_average: average the diagonal over convolution kernels' windows.
        n_samples: Hutchinson probes per estimate.
        seed: probe seed (probes keyed by (seed, step)).
        hvp: ``"auto"``, ``"autograd"`` or ``"finite_difference"``.
        on_nonfinite: ``"skip"`` or ``"raise"``, for a non-finite loss, gradient or Hessian
            diagonal estimate (a skipped step changes neither weights nor state).

    Needs ``opt.step(closure)`` (the optimizer differentiates ``closure(backward=False)``
    itself). Telemetry: ``hessian_norm`` (norm of the latest diagonal), ``refreshed``,
    ``hvp_method``.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 0.15,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-4,
        weight_decay: float = 0.0,
        hessian_power: float = 1.0,
        update_every: int = 1,
        spatial_average: bool = True,
        *,
        n_samples: int = 1,
        seed: int = 0,
        hvp: str = "auto",
        on_nonfinite: str = "skip",
    ) -> None:
        betas = check_betas(betas)
        eps = check_nonnegative(eps, "eps")
        weight_decay = check_nonnegative(weight_decay, "weight_decay")
        hessian_power = check_nonnegative(hessian_power, "hessian_power")
        if not 0.0 < hessian_power <= 1.0:
            raise ValueError(f"hessian_power must be in (0, 1], got {hessian_power!r}")
        update_every = check_positive_int(update_every, "update_every")
        estimator = HutchinsonDiagonal(n_samples, seed, "rademacher", hvp, owner="AdaHessian")
        defaults = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "hessian_power": hessian_power,
        }
        super().__init__(
            params,
            defaults,
            estimator=estimator,
            update_every=update_every,
            seed=seed,
            on_nonfinite=on_nonfinite,
        )
        self.spatial_average = spatial_average

    @torch.no_grad()
    def step(self, closure: Callable[..., Any] | None = None) -> torch.Tensor:  # type: ignore[override]
        """One AdaHessian step; returns the loss."""
        require_contract_closure(closure, "AdaHessian")
        self.check_hyperparameters()
        step = int(self.global_state["step"])
        items = self._items()
        self._telemetry["refreshed"] = False
        loss, grads, diagonal = self._evaluate(closure, items, step, self.hessian_due)
        if not self._finite(loss, grads, diagonal):
            self.global_state["step"] = step + 1
            return loss
        if diagonal is not None:
            self._set_grads(items, grads)
            if self.spatial_average and any(d.dim() >= 3 for d in diagonal):
                diagonal = spatial_average_(diagonal)
            self._mark_refreshed(step)
            self._telemetry["hessian_norm"] = partial(total_norm, diagonal)
        updates = int(self.global_state["updates"]) + 1
        refreshes = int(self.global_state["hessian_refreshes"])
        names = ("exp_avg", "exp_hessian_sq")
        for group, columns in self._grouped(items, grads, names, diagonal):
            params, grad_list, exp_avgs, exp_hessian_sqs = columns[:4]
            adahessian_(
                params,
                grad_list,
                exp_avgs,
                exp_hessian_sqs,
                None if diagonal is None else columns[4],
                step=updates,
                hessian_step=max(refreshes, 1),
                lr=group["lr"],
                beta1=group["betas"][0],
                beta2=group["betas"][1],
                eps=group["eps"],
                weight_decay=group["weight_decay"],
                hessian_power=group["hessian_power"],
            )
        self.global_state["step"] = step + 1
        self.global_state["updates"] = updates
        return loss
