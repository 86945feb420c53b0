"""A training monitor for curvature against the stability threshold ``2 / lr``.

Cohen et al., "Gradient Descent on Neural Networks Typically Occurs at the Edge of Stability"
(ICLR 2021): under gradient descent with step ``lr`` the top Hessian eigenvalue rises until it
hovers at ``2 / lr``. For SGD, linear stability bounds the trace instead ("The Implicit
Regularization of Dynamical Stability in SGD", Wu and Su 2023). Every ``every`` steps the monitor
measures both on a fixed batch (or the batch it is given), records a :class:`MonitorRecord` and
flags when either is above ``2 / lr``.

Use it from any loop (``monitor.step()`` after ``optimizer.step()``), as an optimizer hook
(``monitor.attach(optimizer)``) or from ``anyorder bench --monitor``.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from anyorder.hessian.lanczos import eigenvalues
from anyorder.hessian.operators import Hessian
from anyorder.hessian.results import MonitorRecord
from anyorder.hessian.trace import trace

__all__ = ["HessianMonitor", "DEFAULT_EVERY"]

#: Default interval between checks, in optimizer steps.
DEFAULT_EVERY = 100


class HessianMonitor:
    """Record the top Hessian eigenvalue and trace every ``every`` steps and flag when they cross
    ``2 / lr`` (Cohen et al. 2021's edge of stability; the trace for SGD's linear stability).

    ``data`` is the fixed batch (or iterable of batches) measured at every check; pass a batch to
    :meth:`step` instead to measure the current one. ``lr`` is a number, or read from
    ``optimizer.param_groups[0]["lr"]`` at each check when ``optimizer`` is given (schedulers
    are followed). A check costs at most ``max_iter + trace_matvecs`` Hessian-vector products:
    Lanczos to relative tolerance ``tol``, warm-started from the previous check's top
    eigenvector (the first check starts from the loss gradient), and the trace
    (:func:`anyorder.hessian.trace`'s default method). ``on_flag(record)`` is called when a
    flag turns on. The model's train/eval modes are restored after each check.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[..., torch.Tensor],
        data: Any = None,
        *,
        forward: Callable[[nn.Module, Any], Any] | None = None,
        every: int = DEFAULT_EVERY,
        lr: float | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        tol: float = 1e-2,
        max_iter: int = 20,
        trace_matvecs: int = 15,
        seed: int = 0,
        on_flag: Callable[[MonitorRecord], None] | None = None,
    ) -> None:
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise ValueError(f"every must be a positive integer, got {every!r}")
        if lr is not None and not (isinstance(lr, (int, float)) and lr > 0):
            raise ValueError(f"lr must be a number > 0 or None, got {lr!r}")
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer)}")
        if not isinstance(max_iter, int) or max_iter < 2:
            raise ValueError(f"max_iter must be an integer >= 2, got {max_iter!r}")
        self.model, self.loss_fn, self.data, self.forward = model, loss_fn, data, forward
        self.every, self.lr, self.optimizer = every, lr, optimizer
        self.tol, self.max_iter, self.trace_matvecs = tol, max_iter, trace_matvecs
        self.seed, self.on_flag = seed, on_flag
        self.steps = 0
        self.records: list[MonitorRecord] = []
        self.seconds = 0.0
        self._top_vector: torch.Tensor | None = None  # warm start of the next check

    def current_lr(self) -> float | None:
        """The learning rate the flags compare against."""
        if self.optimizer is not None:
            lr = self.optimizer.param_groups[0].get("lr")
            return float(lr) if isinstance(lr, (int, float, torch.Tensor)) else None
        return self.lr

    def step(self, batch: Any = None) -> MonitorRecord | None:
        """Count one optimizer step; on every ``every``-th (and the first) run :meth:`check`."""
        self.steps += 1
        if (self.steps - 1) % self.every != 0:
            return None
        return self.check(batch, step=self.steps - 1)

    __call__ = step

    def check(self, batch: Any = None, *, step: int | None = None) -> MonitorRecord:
        """Measure now: the top eigenvalue (Lanczos, warm-started) and the trace (the default
        method) on ``batch`` (default: the monitor's ``data``)."""
        data = self.data if batch is None else batch
        if data is None and self.forward is None:
            raise ValueError("no data: give the monitor a batch at construction or to step()")
        t0 = time.perf_counter()
        seed = self.seed + len(self.records)
        op = Hessian(self.model, self.loss_fn, data, forward=self.forward)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Lanczos did not reach")
            top = eigenvalues(
                op,
                1,
                tol=self.tol,
                max_iter=min(self.max_iter, op.size),
                seed=seed,
                start="auto" if self._top_vector is None else self._top_vector,
                return_eigenvectors=True,
                strict_vectors=False,
            )
        self._top_vector = top.eigenvectors[0]
        tr = trace(op, matvecs=max(5, self.trace_matvecs), seed=seed)
        lr = self.current_lr()
        threshold = 2.0 / lr if lr else None
        record = MonitorRecord(
            step=self.steps - 1 if step is None else step,
            top_eigenvalue=top.eigenvalues[0],
            trace=tr.estimate,
            trace_stderr=tr.stderr,
            lr=lr,
            threshold=threshold,
            eigenvalue_above=None if threshold is None else top.eigenvalues[0] > threshold,
            trace_above=None if threshold is None else tr.estimate > threshold,
            seconds=time.perf_counter() - t0,
            matvecs=op.matvecs,
        )
        self.seconds += record.seconds
        previous = self.records[-1] if self.records else None
        self.records.append(record)
        if self.on_flag is not None:
            turned_on = any(
                bool(getattr(record, f)) and not (previous and bool(getattr(previous, f)))
                for f in ("eigenvalue_above", "trace_above")
            )
            if turned_on:
                self.on_flag(record)
        return record

    @property
    def crossings(self) -> list[MonitorRecord]:
        """Records where a flag turned on (the top eigenvalue or trace went above ``2 / lr``)."""
        out, prev = [], None
        for r in self.records:
            for f in ("eigenvalue_above", "trace_above"):
                if getattr(r, f) and not (prev is not None and getattr(prev, f)):
                    out.append(r)
                    break
            prev = r
        return out

    def attach(self, optimizer: torch.optim.Optimizer) -> Any:
        """Run :meth:`step` after every ``optimizer.step()`` (a step post-hook; the monitor's fixed
        ``data`` is measured) and follow its learning rate; returns the removable handle."""
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer)}")
        if self.data is None and self.forward is None:
            raise ValueError("attach needs the monitor's fixed data (give data=...)")
        self.optimizer = optimizer
        return optimizer.register_step_post_hook(lambda *_: self.step())

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary: settings, records and total seconds spent."""
        return {
            "every": self.every,
            "tol": self.tol,
            "max_iter": self.max_iter,
            "trace_matvecs": self.trace_matvecs,
            "seconds": self.seconds,
            "records": [r.to_dict() for r in self.records],
        }
