"""Measurement: time per step, peak tensor memory, evaluation counts.

**Time per step** is the median of ``time.perf_counter`` around ``optimizer.step(closure)`` over
the steps after the first ``warmup`` ones (CUDA is synchronised before each reading).

**Peak memory** is the peak of tensor memory allocated *during* the measured work above what was
allocated when it began (model weights and data already held are not counted; gradients, optimizer
state, activations and temporaries are).

* CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus
  ``memory_allocated`` at the start.
* CPU: the PyTorch profiler with ``profile_memory=True`` records every CPU tensor allocation and
  free (``[memory]`` events with signed byte counts). Their running sum, in time order, is the
  tensor memory allocated since the start; its maximum is the peak. This counts PyTorch tensor
  storage only (not Python objects or allocator slack), the same quantity CUDA reports.

**Evaluation counts** are recorded, not declared: :class:`EvalCounter` counts each call of the
task's loss (a forward evaluation) and, through a hook on the loss tensor, each backward pass that
flows through it (``loss.backward()`` or ``torch.autograd.grad`` alike).
"""

from __future__ import annotations

import os
import statistics
import sys
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["EvalCounter", "peak_memory_bytes", "median_step_time", "synchronize"]


@dataclass
class EvalCounter:
    """Counts forward evaluations and backward passes of a loss function."""

    forward: int = 0
    backward: int = 0

    def wrap(self, loss_fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        """``loss_fn`` that counts its calls and the backward passes through its results (the
        first element of a ``(loss, logits)`` pair)."""

        def counted(*args: Any, **kwargs: Any) -> torch.Tensor:
            self.forward += 1
            out = loss_fn(*args, **kwargs)
            loss = out[0] if isinstance(out, tuple) else out
            if isinstance(loss, torch.Tensor) and loss.requires_grad:
                loss.register_hook(self._on_backward)
            return out

        return counted

    def _on_backward(self, grad: torch.Tensor) -> None:
        self.backward += 1


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels so that wall-clock readings are honest."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def _silenced_stderr_fd():
    """Silence file descriptor 2 (Kineto prints start/stop lines there from C++)."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _cpu_peak_from_events(events: list[tuple[int, int]]) -> int:
    running = peak = 0
    for _, nbytes in sorted(events):
        running += nbytes
        peak = max(peak, running)
    return peak


def peak_memory_bytes(work: Callable[[], Any], device: torch.device | str = "cpu") -> int:
    """Peak tensor bytes allocated while ``work()`` runs, above those allocated at its start."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        work()
        torch.cuda.synchronize(device)
        return max(0, torch.cuda.max_memory_allocated(device) - base)
    from torch.profiler import ProfilerActivity, profile

    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _silenced_stderr_fd():
        prof.__enter__()
    try:
        work()
    finally:
        with _silenced_stderr_fd():
            prof.__exit__(None, None, None)
    events = [
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    ]
    return _cpu_peak_from_events(events)


def median_step_time(times: list[float], warmup: int) -> float:
    """Median of ``times`` after the first ``warmup`` (all of them if too few remain)."""
    timed = times[warmup:] if len(times) > warmup else times
    return statistics.median(timed) if timed else float("nan")
