"""Hessian analysis: curvature operators, extreme eigenvalues, trace, spectral density, per-layer
sensitivity with HAWQ-V2 bit allocation, a training monitor and a batch-size advisor.
"""

from anyorder.hessian.batch_size import advise_lr, batch_extremes, fit_batch_curvature
from anyorder.hessian.density import density, slq_nodes
from anyorder.hessian.lanczos import eigenvalues, lanczos, start_vector
from anyorder.hessian.monitor import HessianMonitor
from anyorder.hessian.operators import (
    GGN,
    CurvatureOperator,
    Fisher,
    Hessian,
    MatrixOperator,
    ModelOperator,
)
from anyorder.hessian.results import (
    BatchSizeAdvice,
    BitAllocation,
    LayerSensitivity,
    MonitorRecord,
    SpectralDensity,
    Spectrum,
    TraceEstimate,
)
from anyorder.hessian.sensitivity import (
    allocate_bits,
    layer_sensitivity,
    parameter_layers,
    quantization_error,
    quantize,
)
from anyorder.hessian.trace import trace

__all__ = [
    "eigenvalues",
    "lanczos",
    "start_vector",
    "trace",
    "density",
    "slq_nodes",
    "layer_sensitivity",
    "parameter_layers",
    "quantize",
    "quantization_error",
    "allocate_bits",
    "HessianMonitor",
    "batch_extremes",
    "advise_lr",
    "fit_batch_curvature",
    "CurvatureOperator",
    "MatrixOperator",
    "ModelOperator",
    "Hessian",
    "GGN",
    "Fisher",
    "TraceEstimate",
    "Spectrum",
    "SpectralDensity",
    "LayerSensitivity",
    "BitAllocation",
    "MonitorRecord",
    "BatchSizeAdvice",
]
