"""Sharpness-aware minimisation (Foret, Kleiner, Mobahi & Neyshabur, "Sharpness-Aware
Minimization for Efficiently Improving Generalization", ICLR 2021) and its adaptive variant ASAM
(Kwon, Kim, Park & Choi, "ASAM: Adaptive Sharpness-Aware Minimization for Scale-Invariant
Learning of Deep Neural Networks", ICML 2021).

One step: gradient g at w; perturbation e = rho T^2 g / ||T g|| (T = I for SAM, T = |w| + eta
element-wise for ASAM); gradient at w + e; restore w exactly (from a copy, not by subtracting e,
which would drift by rounding); the base optimizer steps with the perturbed gradient.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from anyorder.core.base import AnyOrderOptimizer
from anyorder.optim._common import check_nonnegative
from anyorder.optim._curvature import total_norm

__all__ = ["SAM"]

_SAM_KEYS = ("rho", "adaptive", "eta")


def resolve_optimizer_class(base: Any) -> type[torch.optim.Optimizer]:
    """An optimizer class, or its name in ``torch.optim`` / ``anyorder.optim`` (any case)."""
    if isinstance(base, type) and issubclass(base, torch.optim.Optimizer):
        return base
    if isinstance(base, str):
        import anyorder.optim as ours

        for module in (torch.optim, ours):
            for name in dir(module):
                obj = getattr(module, name)
                if (
                    name.lower() == base.lower()
                    and isinstance(obj, type)
                    and issubclass(obj, torch.optim.Optimizer)
                ):
                    return obj
        raise ValueError(
            f"unknown base_optimizer {base!r}: not an optimizer class in torch.optim or "
            "anyorder.optim"
        )
    raise TypeError(
        f"base_optimizer must be a torch.optim.Optimizer subclass or its name, got {base!r}"
    )


class SAM(AnyOrderOptimizer):
    """SAM (Foret et al., 2021) around any base optimizer; ``adaptive=True`` gives ASAM (Kwon et
    al., 2021).

    Args:
        params: parameters or param groups (shared with the base optimizer, so LR schedulers
            and per-group settings act on both).
        base_optimizer: the optimizer class that takes the step (or its name, e.g. ``"SGD"``,
            ``"AdamW"``, ``"Lion"``); built as ``base_optimizer(param_groups, **base_kwargs)``.
        rho: neighbourhood radius (per group).
        adaptive: ASAM's scale-invariant neighbourhood, T = |w| + eta, on every tensor of the
            group (the ASAM paper's T_w). The ASAM authors' code scales only tensors whose name
            contains ``"weight"`` (biases get T = 1); :func:`anyorder.optim.asam_groups` builds
            the param groups that give exactly that (``adaptive`` is a per-group setting).
        eta: ASAM's offset (the ASAM paper's 0.01); unused by SAM.
        on_nonfinite: ``"skip"`` leaves the weights and the base optimizer untouched when
            either evaluation is not finite; ``"raise"`` raises.
        base_kwargs: hyperparameters of the base optimizer (``lr``, ``momentum``...).

    ``opt.step(closure)`` makes both gradient evaluations (``closure(backward=True)`` twice;
    plain torch closures work too) and returns the loss at the unperturbed weights. Manual
    loops call ``loss.backward(); opt.first_step(zero_grad=True); loss_fn().backward();
    opt.second_step(zero_grad=True)``. :attr:`telemetry` holds ``perturbation_norm`` (||e||)
    and ``gradient_norm`` (||T g|| at w) of the last step.
    """

    def __init__(
        self,
        params: Iterable[Any],
        base_optimizer: Any = "SGD",
        rho: float = 0.05,
        adaptive: bool = False,
        *,
        eta: float = 0.01,
        on_nonfinite: str = "skip",
        **base_kwargs: Any,
    ) -> None:
        rho = check_nonnegative(rho, "rho")
        eta = check_nonnegative(eta, "eta")
        base_cls = resolve_optimizer_class(base_optimizer)
        defaults = {"rho": rho, "adaptive": bool(adaptive), "eta": eta, **base_kwargs}
        super().__init__(params, defaults, on_nonfinite=on_nonfinite)
        self.base_optimizer = base_cls(self.param_groups, **base_kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.defaults.update(self.base_optimizer.defaults)
        self._saved: list[tuple[list[torch.Tensor], list[torch.Tensor]]] | None = None
        self._telemetry: dict[str, torch.Tensor] = {}

    def _with_grads(self) -> list[tuple[dict[str, Any], list[torch.Tensor], list[torch.Tensor]]]:
        out = []
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                out.append((group, params, [p.grad for p in params]))
        return out

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        """Move to w + e using the gradients in ``.grad`` (a copy of w is kept)."""
        groups = self._with_grads()
        scaled, tees = [], []
        for group, params, grads in groups:
            if group["adaptive"]:
                t = torch._foreach_abs(params)
                torch._foreach_add_(t, group["eta"])
                tees.append(t)
                scaled.extend(torch._foreach_mul(t, grads))
            else:
                tees.append(None)
                scaled.extend(grads)
        grad_norm = total_norm(scaled)
        saved, perturbations = [], []
        for (group, params, grads), t in zip(groups, tees):
            scale = (group["rho"] / (grad_norm + 1e-12)).to(params[0].device, params[0].dtype)
            if t is not None:
                e = torch._foreach_mul(t, t)
                torch._foreach_mul_(e, grads)
                torch._foreach_mul_(e, scale)
            else:
                e = torch._foreach_mul(grads, scale)
            saved.append((params, [p.detach().clone() for p in params]))
            torch._foreach_add_(params, e)
            perturbations.extend(e)
        self._saved = saved
        self._telemetry = {
            "gradient_norm": grad_norm,
            "perturbation_norm": total_norm(perturbations),
        }
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def restore(self) -> None:
        """Put back the weights saved by :meth:`first_step` (exactly)."""
        if self._saved is None:
            return
        for params, copies in self._saved:
            torch._foreach_copy_(params, copies)
        self._saved = None

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """Restore w and let the base optimizer step with the gradients taken at w + e."""
        if self._saved is None:
            raise RuntimeError("second_step() called without first_step()")
        self.restore()
        self.base_optimizer.step()
        self.global_state["step"] += 1
        if zero_grad:
            self.zero_grad()

    def _gradients(self) -> list[torch.Tensor | None]:
        return [p.grad for group in self.param_groups for p in group["params"]]

    def step(self, closure: Callable[..., Any] | None = None) -> Any:  # type: ignore[override]
        """One SAM step: two gradient evaluations through ``closure``; returns the first loss.

        A non-finite loss or gradient at either point skips the step (weights restored from
        the copy, the base optimizer not called) or raises, per ``on_nonfinite``; an exception
        in the closure (``KeyboardInterrupt`` included) restores the weights, then propagates.
        """
        if closure is None:
            raise ValueError(
                "SAM evaluates the gradient twice per step and needs a closure: call "
                "opt.step(closure) where closure() zeroes the gradients, computes the loss and "
                "calls backward (anyorder.core.make_closure builds one), or call "
                "opt.first_step() and opt.second_step() around your own second backward pass"
            )
        self.check_hyperparameters()
        with self.restoring(self.restore):
            loss = self.evaluate(closure, backward=True)
            if not self.all_finite((loss.detach(),), gradient=self._gradients()):
                self.global_state["step"] += 1
                return loss
            self.first_step(zero_grad=False)
            second = self.evaluate(closure, backward=True)
            finite = self.all_finite(
                (second.detach(),), **{"gradient at the perturbed weights": self._gradients()}
            )
        if not finite:
            self.restore()
            self.global_state["step"] += 1
            return loss
        self.second_step()
        return loss

    @property
    def telemetry(self) -> dict[str, float]:
        """``perturbation_norm`` and ``gradient_norm`` of the last step, as floats."""
        return {k: float(v) for k, v in self._telemetry.items()}

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["base"] = self.base_optimizer.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        base = state_dict.pop("base", None)
        super().load_state_dict(state_dict)
        if base is not None:
            self.base_optimizer.load_state_dict(base)
        self.base_optimizer.param_groups = self.param_groups
