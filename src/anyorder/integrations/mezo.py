"""MeZO's evaluation policy, as options a training loop opts into (Malladi et al. 2023, §2 and
Appendix E; its reference code: ``large_models/trainer.py``).

MeZO fine-tunes with

1. **zeroth-order evaluations in eval mode** (dropout off): the two losses of a step must differ
   only by the perturbation; dropout masks would add noise of the size of the signal
   (:func:`eval_mode`, :func:`eval_mode_closure`). ``anyorder.core.make_closure`` already replays
   the same dropout masks for both evaluations of a step, which removes the *difference* noise;
   eval mode removes dropout altogether, as MeZO does;
2. **a constant learning rate** (no schedule): nothing to add, do not attach a scheduler;
3. **a keep-best checkpoint on a validation split** (:class:`KeepBest`): evaluate every N steps and
   keep the weights with the best validation score; the last weights of a noisy zeroth-order run
   are often worse than an earlier point.

Where this belongs: the policy concerns the *loop* (when to evaluate, what mode the model is in,
what to hand back at the end), not the update rule, so it is a small helper beside the optimizer
rather than an optimizer option. The optimizer sees parameters, not the model, and cannot switch
modes or score a validation split; the bench (``anyorder bench``) keeps every optimizer on the
same loop and reports the last weights, so keep-best is applied in the benchmark script that
measures it (``benchmarks/text_finetune_zo.py``), not in the runner.

Departure from MeZO's code: the keep-best copy is held on the CPU (``device="cpu"``, the default),
so the accelerator keeps the inference footprint; MeZO's Trainer saves a checkpoint to disk.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from anyorder.core.closure import call_closure

__all__ = ["KeepBest", "eval_mode", "eval_mode_closure"]


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode for the block; every submodule's own mode is restored after
    (also on an exception)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes:
            m.training = training


def eval_mode_closure(model: nn.Module, closure: Callable[..., Any]) -> Callable[..., Any]:
    """``closure`` evaluated with ``model`` in eval mode (MeZO's dropout-off evaluations); it
    keeps the closure contract (``closure(backward=...)``)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")

    def wrapped(backward: bool = True) -> Any:
        with eval_mode(model):
            return call_closure(closure, backward=backward)

    wrapped.model = model  # type: ignore[attr-defined]
    return wrapped


class KeepBest:
    """Keep the weights with the best validation score seen so far (MeZO's keep-best checkpoint).

    ``update(score, step)`` copies the module's ``state_dict`` (parameters and buffers) into
    buffers on ``device`` (CPU by default) when ``score`` beats the best so far; a NaN score never
    does. ``restore()`` loads the kept weights back in place. The copy is allocated once and
    overwritten afterwards.
    """

    def __init__(
        self, module: nn.Module, *, higher_is_better: bool = True, device: str | torch.device = "cpu"
    ) -> None:
        if not isinstance(module, nn.Module):
            raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
        self.module = module
        self.higher_is_better = bool(higher_is_better)
        self.device = torch.device(device)
        self.best_score: float | None = None
        self.best_step: int | None = None
        self._kept: dict[str, torch.Tensor] | None = None

    def _better(self, score: float) -> bool:
        if not math.isfinite(score):
            return False
        if self.best_score is None:
            return True
        return score > self.best_score if self.higher_is_better else score < self.best_score

    @torch.no_grad()
    def update(self, score: float, step: int | None = None) -> bool:
        """Keep the current weights if ``score`` is the best so far; returns whether it was."""
        score = float(score)
        if not self._better(score):
            return False
        state = self.module.state_dict()
        if self._kept is None:
            self._kept = {k: v.detach().to(self.device, copy=True) for k, v in state.items()}
        else:
            for k, v in state.items():
                self._kept[k].copy_(v)
        self.best_score, self.best_step = score, step
        return True

    @torch.no_grad()
    def restore(self) -> None:
        """Load the kept weights into the module (``RuntimeError`` if nothing was kept)."""
        if self._kept is None:
            raise RuntimeError("KeepBest.restore: no score was recorded yet")
        self.module.load_state_dict(self._kept)
