"""Per-layer Hessian sensitivity and HAWQ-V2 mixed-precision bit allocation (Dong et al.,
"HAWQ-V2: Hessian Aware trace-Weighted Quantization of Neural Networks", NeurIPS 2020).

HAWQ-V2 ranks layers by the average eigenvalue of their diagonal Hessian block, ``tr(H_i) / n_i``
(estimated with Hutchinson; Hutch++ here by default), and scores a bit configuration by
``Omega = sum_i (tr(H_i) / n_i) * ||Q_{b_i}(W_i) - W_i||^2``; the configuration chosen is the one
with the lowest ``Omega`` on the Pareto frontier of (model size, Omega) within the size budget.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from anyorder.hessian.operators import Hessian
from anyorder.hessian.results import BitAllocation, LayerSensitivity
from anyorder.hessian.trace import trace

__all__ = [
    "parameter_layers",
    "layer_sensitivity",
    "quantize",
    "quantization_error",
    "allocate_bits",
]


def parameter_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The modules that own trainable parameters directly (``recurse=False``), in order: the
    "layers" of the per-layer analyses."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    return [
        (name or "(root)", m)
        for name, m in model.named_modules()
        if any(p.requires_grad for p in m.parameters(recurse=False))
    ]


def layer_sensitivity(
    model: nn.Module,
    loss_fn: Callable[..., torch.Tensor],
    data: Any,
    *,
    forward: Callable[[nn.Module, Any], Any] | None = None,
    layers: Sequence[str] | None = None,
    method: str = "hutch++",
    matvecs: int = 60,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
    cache: bool | None = None,
) -> tuple[LayerSensitivity, ...]:
    """Trace of each layer's diagonal Hessian block and its average eigenvalue ``trace / n``
    (HAWQ-V2's sensitivity, Dong et al. 2020), with standard errors; ``matvecs`` products per
    layer. ``layers``: module names (default: :func:`parameter_layers`). ``progress(name)`` is
    called before each layer. ``cache``: keep each layer operator's gradient graphs between
    products, as :class:`Hessian` (default: only for a single batch)."""
    found = dict(parameter_layers(model))
    names = list(found) if layers is None else list(layers)
    out = []
    for i, name in enumerate(names):
        if name not in found:
            raise ValueError(
                f"layer {name!r} owns no trainable parameter; layers: {', '.join(found)}"
            )
        if progress is not None:
            progress(name)
        module = found[name]
        params = [p for p in module.parameters(recurse=False) if p.requires_grad]
        op = Hessian(model, loss_fn, data, params=params, forward=forward, cache=cache)
        est = trace(op, method=method, matvecs=matvecs, seed=seed + i)
        n = op.size
        out.append(
            LayerSensitivity(
                name=name,
                n_params=n,
                trace=est,
                average_eigenvalue=est.estimate / n,
                average_eigenvalue_stderr=est.stderr / n,
            )
        )
    return tuple(out)


def quantize(tensor: torch.Tensor, bits: int) -> torch.Tensor:
    """Symmetric uniform per-tensor quantization to ``bits`` bits (levels ``-(2^(b-1) - 1) ..
    2^(b-1) - 1`` times ``max|w| / (2^(b-1) - 1)``), returned dequantized, as in HAWQ-V2's
    perturbation ``Q(W)``."""
    if not isinstance(bits, int) or bits < 2:
        raise ValueError(f"bits must be an integer >= 2, got {bits!r}")
    levels = 2 ** (bits - 1) - 1
    scale = tensor.detach().abs().max() / levels
    if float(scale) == 0:
        return tensor.detach().clone()
    return torch.round(tensor.detach() / scale).clamp_(-levels, levels).mul_(scale)


def quantization_error(module: nn.Module, bits: int) -> float:
    """``||Q_b(W) - W||^2`` summed over the module's own trainable parameters."""
    params = [p for p in module.parameters(recurse=False) if p.requires_grad]
    return float(sum(float((quantize(p, bits) - p.detach()).pow(2).sum()) for p in params))


def allocate_bits(
    sensitivities: Sequence[LayerSensitivity] | Mapping[str, float],
    model: nn.Module,
    *,
    bit_options: Iterable[int] = (2, 4, 8),
    budget_bits: int | None = None,
    average_bits: float | None = None,
) -> BitAllocation:
    """HAWQ-V2 bit allocation (Dong et al. 2020): the per-layer bits minimising ``Omega = sum_i
    s_i * ||Q_{b_i}(W_i) - W_i||^2`` (``s_i``: average Hessian eigenvalue) subject to ``sum_i n_i
    b_i <= budget``, found exactly by building the Pareto frontier of (size, Omega) layer by layer.

    Give the budget as ``budget_bits`` (total bits over the layers) or ``average_bits`` per
    parameter, not both. Raises ``ValueError`` when no configuration fits.
    """
    if isinstance(sensitivities, Mapping):
        sens = {str(k): float(v) for k, v in sensitivities.items()}
    else:
        sens = {s.name: float(s.average_eigenvalue) for s in sensitivities}
    if not sens:
        raise ValueError("sensitivities is empty: give at least one layer")
    options = sorted(set(bit_options))
    if not options or any(not isinstance(b, int) or b < 2 for b in options):
        raise ValueError(f"bit_options must be integers >= 2, got {list(bit_options)!r}")
    layers = dict(parameter_layers(model))
    for name in sens:
        if name not in layers:
            raise ValueError(f"unknown layer {name!r}; layers: {', '.join(layers)}")
    sizes = {
        n: sum(p.numel() for p in layers[n].parameters(recurse=False) if p.requires_grad)
        for n in sens
    }
    total = sum(sizes.values())
    if (budget_bits is None) == (average_bits is None):
        raise ValueError("give exactly one of budget_bits or average_bits")
    if average_bits is not None:
        if not (isinstance(average_bits, (int, float)) and average_bits > 0):
            raise ValueError(f"average_bits must be a number > 0, got {average_bits!r}")
        budget = int(average_bits * total)
    else:
        if not isinstance(budget_bits, int) or budget_bits <= 0:
            raise ValueError(f"budget_bits must be a positive integer, got {budget_bits!r}")
        budget = budget_bits
    # Pareto frontier of (size, perturbation), merged layer by layer; dominated points dropped.
    frontier: list[tuple[int, float, dict[str, int]]] = [(0, 0.0, {})]
    for name, s in sens.items():
        costs = [(sizes[name] * b, s * quantization_error(layers[name], b), b) for b in options]
        merged = sorted(
            ((fs + cs, fp + cp, {**fb, name: b}) for fs, fp, fb in frontier for cs, cp, b in costs),
            key=lambda t: (t[0], t[1]),
        )
        frontier = []
        for point in merged:
            if not frontier or point[1] < frontier[-1][1]:
                frontier.append(point)
    feasible = [p for p in frontier if p[0] <= budget]
    if not feasible:
        raise ValueError(
            f"no bit configuration fits the budget of {budget} bits; the smallest takes "
            f"{frontier[0][0]} bits ({min(options)} bits per parameter)"
        )
    size, omega, bits = feasible[-1]
    return BitAllocation(
        bits=bits,
        size_bits=size,
        budget_bits=budget,
        perturbation=omega,
        frontier=tuple(frontier),
    )
