"""Results of the Hessian analyses: frozen dataclasses that serialise to JSON (DESIGN.md,
principle 6). Tensors (eigenvectors) are carried for the caller but left out of ``to_dict``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

import torch

__all__ = [
    "TraceEstimate",
    "Spectrum",
    "SpectralDensity",
    "LayerSensitivity",
    "BitAllocation",
    "MonitorRecord",
    "BatchSizeAdvice",
    "to_jsonable",
]


def to_jsonable(value: Any) -> Any:
    """``value`` with dataclasses, tuples and tensors turned into JSON types; non-finite floats
    become ``None`` (JSON has no NaN)."""
    if hasattr(value, "to_dict"):
        return value.to_dict()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return to_jsonable(value.tolist())
    return value


class _Serialisable:
    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (tensor fields are left out)."""
        out = {}
        for f in fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                continue
            out[f.name] = to_jsonable(value)
        return out


@dataclass(frozen=True)
class TraceEstimate(_Serialisable):
    """A stochastic trace estimate: ``estimate`` is the mean of ``samples`` and ``stderr`` its
    standard error (for Hutch++ conditional on the sketched subspace, whose part is exact). For
    ``method="neyman"`` ``samples`` are the per-block samples in the order taken and the estimate
    is the sum of the per-block means plus the pilots' exact parts (see ``trace``)."""

    estimate: float
    stderr: float
    samples: tuple[float, ...]
    method: str
    matvecs: int


@dataclass(frozen=True)
class Spectrum(_Serialisable):
    """Extreme eigenvalues found by Lanczos, ordered from the requested end inwards.

    ``residuals[i]`` is ``||A y_i - theta_i y_i||`` for unit Ritz vector ``y_i``: a bound on the
    distance from ``eigenvalues[i]`` to the spectrum. ``eigenvectors`` (shape ``(k, n)``) is only
    set when requested and is not serialised.
    """

    eigenvalues: tuple[float, ...]
    residuals: tuple[float, ...]
    which: str
    converged: bool
    iterations: int
    matvecs: int
    eigenvectors: torch.Tensor | None = field(default=None, repr=False, compare=False)


@dataclass(frozen=True)
class SpectralDensity(_Serialisable):
    """A spectral density from stochastic Lanczos quadrature: ``values`` on ``grid`` (integrating
    to one), and the quadrature ``nodes``/``weights`` it was smoothed from (weights sum to one)
    with a Gaussian kernel of width ``sigma``."""

    grid: tuple[float, ...]
    values: tuple[float, ...]
    nodes: tuple[float, ...]
    weights: tuple[float, ...]
    sigma: float
    n_vectors: int
    steps: int
    matvecs: int


@dataclass(frozen=True)
class LayerSensitivity(_Serialisable):
    """One layer's curvature: the trace of its diagonal Hessian block and HAWQ-V2's average
    eigenvalue ``trace / n_params``."""

    name: str
    n_params: int
    trace: TraceEstimate
    average_eigenvalue: float
    average_eigenvalue_stderr: float


@dataclass(frozen=True)
class BitAllocation(_Serialisable):
    """HAWQ-V2 mixed precision: bits per layer minimising ``sum_i sensitivity_i *
    ||Q(W_i) - W_i||^2`` under the size budget; ``frontier`` is the Pareto frontier of
    ``(size_bits, perturbation, bits)`` points it was chosen from."""

    bits: dict[str, int]
    size_bits: int
    budget_bits: int
    perturbation: float
    frontier: tuple[tuple[int, float, dict[str, int]], ...]


@dataclass(frozen=True)
class MonitorRecord(_Serialisable):
    """One check of the training monitor at ``step``: the top Hessian eigenvalue and the trace
    compared with the stability threshold ``2 / lr`` (Cohen et al.'s edge of stability for the top
    eigenvalue; the trace for SGD's linear stability). Flags are ``None`` without a learning rate.
    ``matvecs``: the Hessian-vector products the check took (Lanczos and trace together).
    """

    step: int
    top_eigenvalue: float
    trace: float
    trace_stderr: float
    lr: float | None
    threshold: float | None
    eigenvalue_above: bool | None
    trace_above: bool | None
    seconds: float
    matvecs: int = 0


@dataclass(frozen=True)
class BatchSizeAdvice(_Serialisable):
    """A learning rate for ``new_batch_size`` from batch-Hessian extremes ("Learning Rates as a
    Function of Batch Size"): ``lambda_max(B) ~ curvature + noise / B`` is fitted to the
    measurements; SGD scales the learning rate by ``lambda(B_ref) / lambda(B_new)`` (linear in
    ``B`` when noise dominates), Adam by its square root."""

    optimizer: str
    base_batch_size: int
    base_lr: float
    new_batch_size: int
    lr: float
    curvature: float
    noise: float
    predicted_top_eigenvalue: float
    measured: dict[int, float]
    stability_lr: float
