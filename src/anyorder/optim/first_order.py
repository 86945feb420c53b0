"""First-order rules with a twist: Lion and diffGrad. Both work with the standard
``loss.backward(); opt.step()`` loop and with ``opt.step(closure)``."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from anyorder.core.base import AnyOrderOptimizer
from anyorder.functional.diffgrad import diffgrad_
from anyorder.functional.lion import lion_
from anyorder.optim._common import check_betas, check_nonnegative

__all__ = ["Lion", "DiffGrad"]


class _FirstOrder(AnyOrderOptimizer):
    """Closure handling and the non-finite policy for rules fed by ``p.grad``."""

    def _loss(self, closure: Callable[..., Any] | None) -> tuple[torch.Tensor | None, bool]:
        """(loss, proceed): checks the hyperparameters, evaluates the closure
        (``backward=True``) if given, and applies the non-finite policy to the loss and every
        gradient (one host sync); a skipped step changes neither weights nor state."""
        self.check_hyperparameters()
        loss = None if closure is None else self.evaluate(closure, backward=True)
        grads = [p.grad for group in self.param_groups for p in group["params"]]
        if any(g is not None and g.is_sparse for g in grads):
            raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
        losses = () if loss is None else (loss.detach(),)
        if not self.all_finite(losses, gradient=grads):
            self.global_state["step"] += 1
            return loss, False
        return loss, True

    def _group_tensors(
        self, group: dict[str, Any], names: tuple[str, ...]
    ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[list[torch.Tensor]]]:
        params, grads = [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
            params.append(p)
            grads.append(p.grad)
        buffers: list[list[torch.Tensor]] = [[] for _ in names]
        for p in params:
            state = self.state[p]
            for k, name in enumerate(names):
                if name not in state:
                    state[name] = torch.zeros_like(p, memory_format=torch.preserve_format)
                buffers[k].append(state[name])
        return params, grads, buffers


class Lion(_FirstOrder):
    """Lion (Chen et al., "Symbolic Discovery of Optimization Algorithms", NeurIPS 2023).

    Update (the paper's Algorithm 2): ``c = b1 m + (1 - b1) g``;
    ``p <- p (1 - lr wd) - lr sign(c)``; ``m <- b2 m + (1 - b2) g``.

    Args:
        params: parameters or param groups.
        lr: learning rate (typically 3-10x smaller than AdamW's).
        betas: (b1, b2), interpolation and momentum coefficients.
        weight_decay: decoupled weight decay (typically 3-10x larger than AdamW's).
        on_nonfinite: policy for a non-finite loss or gradient (``"skip"``: nothing changes,
            the step is counted in ``global_state["skipped_steps"]``; ``"raise"``).
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        *,
        on_nonfinite: str = "skip",
    ) -> None:
        betas = check_betas(betas)
        weight_decay = check_nonnegative(weight_decay, "weight_decay")
        super().__init__(
            params,
            {"lr": lr, "betas": betas, "weight_decay": weight_decay},
            on_nonfinite=on_nonfinite,
        )

    @torch.no_grad()
    def step(self, closure: Callable[..., Any] | None = None) -> Any:  # type: ignore[override]
        """One Lion step on ``p.grad`` (after ``closure()`` if given); returns the loss."""
        loss, proceed = self._loss(closure)
        if not proceed:
            return loss
        for group in self.param_groups:
            params, grads, (exp_avgs,) = self._group_tensors(group, ("exp_avg",))
            lion_(
                params,
                grads,
                exp_avgs,
                lr=group["lr"],
                beta1=group["betas"][0],
                beta2=group["betas"][1],
                weight_decay=group["weight_decay"],
            )
        self.global_state["step"] += 1
        return loss


class DiffGrad(_FirstOrder):
    """diffGrad (Dubey et al., "diffGrad: An Optimization Method for Convolutional Neural
    Networks", IEEE TNNLS 2019): Adam whose momentum is scaled by the friction coefficient
    ``sigmoid(|g_{t-1} - g_t|)``.

    As the authors' code: bias correction ``lr sqrt(1 - b2^t) / (1 - b1^t)``, eps added to
    ``sqrt(v)`` before it, ``g_0 = 0``, and L2 weight decay added to the gradient.

    Args:
        params: parameters or param groups.
        lr: learning rate.
        betas: Adam's (b1, b2).
        eps: added to ``sqrt(v)``.
        weight_decay: L2 penalty (added to the gradient).
        on_nonfinite: policy for a non-finite loss or gradient (``"skip"``: nothing changes,
            the step is counted in ``global_state["skipped_steps"]``; ``"raise"``).
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        on_nonfinite: str = "skip",
    ) -> None:
        betas = check_betas(betas)
        eps = check_nonnegative(eps, "eps")
        weight_decay = check_nonnegative(weight_decay, "weight_decay")
        super().__init__(
            params,
            {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay},
            on_nonfinite=on_nonfinite,
        )
        self.global_state["updates"] = 0

    @torch.no_grad()
    def step(self, closure: Callable[..., Any] | None = None) -> Any:  # type: ignore[override]
        """One diffGrad step on ``p.grad`` (after ``closure()`` if given); returns the loss."""
        loss, proceed = self._loss(closure)
        if not proceed:
            return loss
        updates = int(self.global_state["updates"]) + 1
        for group in self.param_groups:
            params, grads, (m, v, prev) = self._group_tensors(
                group, ("exp_avg", "exp_avg_sq", "previous_grad")
            )
            diffgrad_(
                params,
                grads,
                m,
                v,
                prev,
                step=updates,
                lr=group["lr"],
                beta1=group["betas"][0],
                beta2=group["betas"][1],
                eps=group["eps"],
                weight_decay=group["weight_decay"],
            )
        self.global_state["updates"] = updates
        self.global_state["step"] += 1
        return loss
