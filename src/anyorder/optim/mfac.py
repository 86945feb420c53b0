"""M-FAC (Frantar, Kurtic & Alistarh, "M-FAC: Efficient Matrix-Free Approximations of
Second-Order Information", NeurIPS 2021), the dynamic (sliding-window) algorithm.

The curvature is the damped empirical Fisher of the last m gradients,
F = lambda I + (1/m) sum_i g_i g_i^T = lambda I + G^T G / m (G: the m x d window), and the step
direction is the inverse-Fisher-vector product with the current gradient (which enters the window
first). We compute it in Woodbury form,

    F^{-1} x = (x - G^T (m lambda I_m + G G^T)^{-1} G x) / lambda,

the same product the paper's recursive Sherman-Morrison scheme yields, with the same costs: O(dm)
per product (G x and G^T c), O(dm) to update the m x m Gram matrix G G^T when a gradient enters
the window (one row), and O(m^3) for the small Cholesky solve. Rows not yet filled are zero, so
before m gradients have been seen F has fewer terms (as in the paper's code, which starts from
zeros). The window, the Gram matrix and the next slot live in ``global_state`` and round-trip
through the state dict.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch

from anyorder.core.base import AnyOrderOptimizer
from anyorder.functional.sgd import sgd_
from anyorder.optim._common import check_nonnegative, check_positive_int, indexed_params

__all__ = ["MFAC"]


class MFAC(AnyOrderOptimizer):
    """M-FAC (Frantar et al., 2021): SGD on the inverse damped empirical Fisher of a sliding
    window of the last ``m`` gradients times the gradient.

    Args:
        params: parameters or param groups (the window spans all of them; ``lr``, ``momentum``
            and ``weight_decay`` may differ per group).
        lr: learning rate.
        m: window length (the paper uses up to 1024 on GPUs; memory is m x d).
        damping: lambda > 0.
        momentum: heavy-ball momentum on the preconditioned direction d, as torch.optim.SGD:
            ``b <- momentum b + d; p <- p - lr b``. The reference code averages instead,
            ``v <- momentum v + (1 - momentum) d; p <- p - lr_ref v``; both start from zero, so
            ``b = v / (1 - momentum)`` and ``lr = lr_ref * (1 - momentum)`` gives the reference's
            trajectory exactly.
        weight_decay: L2, added to the gradient before it enters the window.
        on_nonfinite: policy for a non-finite loss or gradient: ``"skip"`` (nothing enters the
            window, nothing moves; counted in ``global_state["skipped_steps"]``) or ``"raise"``.

    Works with ``loss.backward(); opt.step()`` and with ``opt.step(closure)``. The window spans
    the parameters of the first step: :meth:`add_param_group` works before it and is refused
    after it (the window's length would change).
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        m: int = 32,
        damping: float = 1e-4,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        *,
        on_nonfinite: str = "skip",
    ) -> None:
        m = check_positive_int(m, "m")
        damping = check_nonnegative(damping, "damping")
        if damping == 0:
            raise ValueError("damping must be > 0, got 0.0")
        if not isinstance(momentum, (int, float)) or not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
        weight_decay = check_nonnegative(weight_decay, "weight_decay")
        defaults = {"lr": lr, "momentum": momentum, "weight_decay": weight_decay}
        super().__init__(params, defaults, on_nonfinite=on_nonfinite)
        self.m = m
        self.damping = damping
        self.global_state.update({"slot": 0, "window": None, "gram": None})

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group before the first step; after it, refuse with ``ValueError`` (the window
        holds gradients of the parameters it started with)."""
        gs = getattr(self, "global_state", None)
        if gs is not None and gs.get("window") is not None:
            raise ValueError(
                "MFAC cannot add a param group after its first step: its gradient window holds "
                f"gradients of {gs['window'].shape[1]} elements (the parameters it started with); "
                "build a new MFAC over all the parameters instead"
            )
        super().add_param_group(param_group)

    @torch.no_grad()
    def step(self, closure: Callable[..., Any] | None = None) -> Any:  # type: ignore[override]
        """One M-FAC step on ``p.grad`` (after ``closure()`` if given); returns the loss."""
        self.check_hyperparameters()
        loss = None if closure is None else self.evaluate(closure, backward=True)
        items = [(i, p, g) for i, p, g in indexed_params(self.param_groups) if p.grad is not None]
        params = [p for _, p, _ in items]
        grads = [p.grad for p in params]
        # Checked before anything enters the window: a non-finite gradient would poison the
        # window and the Gram matrix for the next m steps.
        if not self.all_finite(() if loss is None else (loss.detach(),), gradient=grads):
            self.global_state["step"] += 1
            return loss
        if not items:
            return loss
        decays = [g["weight_decay"] for _, _, g in items]
        if any(decays):
            grads = [gr + wd * p if wd else gr for gr, p, wd in zip(grads, params, decays)]
        flat = torch.cat([g.reshape(-1) for g in grads])
        direction = self.inverse_fisher_product(flat, add_to_window=True)
        # Back to per-parameter views, then SGD (momentum per group) on the direction.
        views = list(torch.split(direction, [p.numel() for p in params]))
        views = [v.view_as(p) for v, p in zip(views, params)]
        for group in self.param_groups:
            chosen = [(p, v) for (_, p, g), v in zip(items, views) if g is group]
            if not chosen:
                continue
            bufs = [self.state[p].get("momentum_buffer") for p, _ in chosen]
            bufs = sgd_(
                [p for p, _ in chosen],
                [v for _, v in chosen],
                bufs,
                lr=group["lr"],
                momentum=group["momentum"],
            )
            if group["momentum"] != 0:
                for (p, _), b in zip(chosen, bufs):
                    self.state[p]["momentum_buffer"] = b
        self.global_state["step"] += 1
        return loss

    @torch.no_grad()
    def inverse_fisher_product(self, x: torch.Tensor, add_to_window: bool = False) -> torch.Tensor:
        """F^{-1} x for the window's damped empirical Fisher (flat ``x`` of length d); with
        ``add_to_window`` x first replaces the oldest gradient in the window."""
        gs = self.global_state
        d = x.numel()
        if gs["window"] is None:
            gs["window"] = torch.zeros(self.m, d, dtype=x.dtype, device=x.device)
            gs["gram"] = torch.zeros(self.m, self.m, dtype=torch.float64, device=x.device)
        window, gram = gs["window"], gs["gram"]
        if window.shape[1] != d:
            raise ValueError(
                f"M-FAC's window holds gradients of {window.shape[1]} elements, got {d}: the set "
                "of parameters with gradients must not change between steps"
            )
        gx = (window @ x).double()  # O(dm)
        slot = int(gs["slot"])
        if add_to_window:
            # The new Gram matrix is factored before anything is written, so a failed
            # factorisation leaves the window and the Gram matrix as they were.
            gx[slot] = torch.dot(x.double(), x.double())  # no host sync
            gram = gram.clone()
            gram[slot, :] = gx
            gram[:, slot] = gx
        system = gram + self.m * self.damping * torch.eye(self.m, dtype=gram.dtype, device=x.device)
        chol = _robust_cholesky(system)  # O(m^3)
        if add_to_window:
            window[slot] = x
            gs["gram"] = gram
            gs["slot"] = (slot + 1) % self.m
        coef = torch.cholesky_solve(gx[:, None], chol)[:, 0].to(x.dtype)
        out = x - window.T @ coef  # O(dm)
        return out.div_(self.damping)


def _robust_cholesky(system: torch.Tensor) -> torch.Tensor:
    """Cholesky factor of the damped Gram system. The Gram entries are float32 inner products:
    with large gradients (e.g. ~1e4 on Rosenbrock) their rounding can exceed the damping and make
    the system numerically indefinite. Then add the smallest diagonal jitter (relative to the mean
    diagonal, growing 100-fold per try) that makes it positive definite, with a warning."""
    chol, info = torch.linalg.cholesky_ex(system)
    if int(info) == 0:
        return chol
    scale = float(system.diagonal().abs().mean()) or 1.0
    eye = torch.eye(system.shape[0], dtype=system.dtype, device=system.device)
    for exponent in (-10, -8, -6, -4, -2):
        chol, info = torch.linalg.cholesky_ex(system + (10.0**exponent) * scale * eye)
        if int(info) == 0:
            warnings.warn(
                f"M-FAC: the damped Gram system was numerically indefinite (float32 rounding of "
                f"large gradients); added jitter {10.0**exponent:g} x its mean diagonal",
                RuntimeWarning,
                stacklevel=3,
            )
            return chol
    raise FloatingPointError(
        "M-FAC: the damped Gram system is not positive definite even with jitter; the gradients "
        "are probably non-finite or the damping is far too small"
    )
