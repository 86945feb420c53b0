"""The whole Hessian analysis of a bench task, as run by ``anyorder hessian``: top and bottom
eigenvalues (Lanczos), trace (Hutchinson stratified over layer blocks, Neyman-allocated),
spectral density (SLQ, Ghorbani et al. 2019), per-layer sensitivity with a HAWQ-V2 bit
allocation, and batch-size learning-rate advice (Granziol et al., "Learning Rates as a Function
of Batch Size"), written as JSON plus two plots.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from anyorder.hessian.batch_size import advise_lr, batch_extremes
from anyorder.hessian.density import density
from anyorder.hessian.lanczos import eigenvalues
from anyorder.hessian.operators import Hessian
from anyorder.hessian.results import (
    BatchSizeAdvice,
    BitAllocation,
    LayerSensitivity,
    SpectralDensity,
    Spectrum,
    TraceEstimate,
    _Serialisable,
)
from anyorder.hessian.sensitivity import allocate_bits, layer_sensitivity, parameter_layers

__all__ = ["HessianReport", "analyse_task", "write_hessian_report", "format_summary"]


@dataclass(frozen=True)
class HessianReport(_Serialisable):
    """Everything ``anyorder hessian`` measures on one task (JSON via ``to_dict``, the
    ``hessian.json`` schema)."""

    task: str
    seed: int
    checkpoint: str | None
    n_params: int
    n_batches: int
    samples: float
    top: Spectrum
    bottom: Spectrum
    trace: TraceEstimate
    density: SpectralDensity
    layers: tuple[LayerSensitivity, ...]
    bits: BitAllocation | None
    batch_size_advice: tuple[BatchSizeAdvice, ...]
    batch_size_note: str | None
    seconds: dict[str, float]


def _stage_timer() -> tuple[dict[str, float], Callable[[str], None]]:
    seconds: dict[str, float] = {}
    state = {"name": None, "t": time.perf_counter()}

    def mark(name: str | None) -> None:
        now = time.perf_counter()
        if state["name"] is not None:
            seconds[state["name"]] = now - state["t"]
        state["name"], state["t"] = name, now

    return seconds, mark


def analyse_task(
    task: Any,
    model: nn.Module,
    *,
    seed: int = 0,
    n_batches: int = 8,
    top_k: int = 5,
    matvecs: int = 99,
    checkpoint: str | None = None,
    base_lr: dict[str, float] | None = None,
    new_batch_size: int | None = None,
    progress: bool = True,
) -> HessianReport:
    """Run every analysis on ``model`` with ``n_batches`` batches of ``task`` (drawn with
    ``seed``; the operator averages over them exactly). ``base_lr`` maps ``"sgd"``/``"adam"`` to
    learning rates tuned at the task's batch size, for the batch-size advice (only for tasks with
    a ``batch_size`` option; default new size: four times it)."""
    from tqdm.auto import tqdm

    stream = task.batches(torch.Generator().manual_seed(seed))
    batches = [next(stream) for _ in range(n_batches)]

    def forward(m: nn.Module, batch: Any) -> torch.Tensor:
        return task.loss(m, batch)

    def identity(output: torch.Tensor, _batch: Any) -> torch.Tensor:
        return output

    op = Hessian(model, identity, batches, forward=forward, cache=True)
    has_bs = "batch_size" in task.option_defaults()
    layer_count = len(parameter_layers(model))
    stages = 5 + layer_count + (1 if has_bs else 0)
    seconds, mark = _stage_timer()
    with tqdm(total=stages, disable=not progress, unit="stage", dynamic_ncols=True) as bar:

        def stage(name: str) -> None:
            mark(name)
            bar.set_description(name)

        stage("top eigenvalues")
        top = eigenvalues(op, min(top_k, op.size), tol=1e-4, seed=seed)
        bar.update()
        stage("smallest eigenvalue")
        bottom = eigenvalues(op, 1, which="smallest", tol=1e-3, seed=seed)
        bar.update()
        stage("trace")
        tr = trace_of(op, matvecs, seed)
        bar.update()
        stage("density")
        dens = density(op, n_vectors=4, steps=min(80, op.size), seed=seed)
        bar.update()
        stage("per-layer traces")
        layers = layer_sensitivity(
            model,
            identity,
            batches,
            forward=forward,
            matvecs=max(5, matvecs // 3),
            seed=seed,
            cache=True,
            progress=lambda _name: bar.update(),
        )
        stage("bit allocation")
        bits = None
        if all(s.average_eigenvalue > 0 for s in layers):
            bits = allocate_bits(layers, model, average_bits=4)
        bar.update()
        advice: list[BatchSizeAdvice] = []
        note = None
        if has_bs:
            stage("batch-size advice")
            base = int(task.options["batch_size"])
            sizes = sorted({max(2, base // 4), base, base * 4})
            task_cls = type(task)

            def draw(b: int, g: torch.Generator) -> Any:
                other = task_cls(device=task.device, **{**task.options, "batch_size": b})
                return next(other.batches(g))

            extremes = batch_extremes(
                model, identity, draw, sizes, repeats=2, forward=forward, seed=seed, tol=1e-3
            )
            for name, lr in (base_lr or {}).items():
                try:
                    advice.append(
                        advise_lr(
                            extremes,
                            base_batch_size=base,
                            base_lr=lr,
                            new_batch_size=new_batch_size or 4 * base,
                            optimizer=name,
                        )
                    )
                except ValueError as err:
                    note = str(err)
            bar.update()
        else:
            note = f"task {task.name!r} has no batch_size option"
        mark(None)
    return HessianReport(
        task=task.name,
        seed=seed,
        checkpoint=checkpoint,
        n_params=op.size,
        n_batches=n_batches,
        samples=sum(op.batch_weight(b) for b in batches),
        top=top,
        bottom=bottom,
        trace=tr,
        density=dens,
        layers=layers,
        bits=bits,
        batch_size_advice=tuple(advice),
        batch_size_note=note,
        seconds=seconds,
    )


def trace_of(op: Hessian, matvecs: int, seed: int) -> TraceEstimate:
    """Trace with ``matvecs`` products, Hutchinson stratified over the layers with Neyman
    allocation (the default of :func:`anyorder.hessian.trace`)."""
    from anyorder.hessian.trace import trace

    return trace(op, matvecs=max(2, matvecs), seed=seed)


def _png(fig: Any) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def write_hessian_report(report: HessianReport, out_dir: str | Path) -> dict[str, Path]:
    """Write ``hessian.json``, ``density.png`` and ``layers.png`` into ``out_dir``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from anyorder.core.files import atomic_write, strict_json_bytes

    out = Path(out_dir)
    paths = {"json": out / "hessian.json", "density": out / "density.png"}
    paths["layers"] = out / "layers.png"
    atomic_write(paths["json"], strict_json_bytes(report.to_dict(), indent=1))

    fig, ax = plt.subplots(figsize=(7, 4.2), constrained_layout=True)
    values = [max(v, 1e-12) for v in report.density.values]
    ax.semilogy(report.density.grid, values, lw=1.2)
    ax.set_ylim(bottom=max(min(values), 1e-8 * max(values)))
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density (SLQ)")
    ax.set_title(f"{report.task}: Hessian eigenvalue density ({report.n_params} parameters)")
    ax.grid(alpha=0.3)
    atomic_write(paths["density"], _png(fig))

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
    names = [s.name for s in report.layers]
    xs = range(len(names))
    axes[0].bar(
        xs, [s.trace.estimate for s in report.layers], yerr=[s.trace.stderr for s in report.layers]
    )
    axes[0].set_ylabel("trace of the layer's Hessian block")
    axes[1].bar(
        xs,
        [s.average_eigenvalue for s in report.layers],
        yerr=[s.average_eigenvalue_stderr for s in report.layers],
        color="tab:orange",
    )
    axes[1].set_ylabel("average eigenvalue (trace / parameters)")
    for ax in axes:
        ax.set_xticks(list(xs), names, rotation=45, ha="right")
        ax.set_xlabel("layer")
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle(f"{report.task}: per-layer Hessian sensitivity (HAWQ-V2)")
    atomic_write(paths["layers"], _png(fig))
    return paths


def format_summary(report: HessianReport) -> str:
    """The printed summary."""
    top = ", ".join(f"{x:.5g}" for x in report.top.eigenvalues)
    lines = [
        f"task {report.task}: {report.n_params} parameters, {report.n_batches} batches "
        f"({report.samples:g} samples)",
        f"top eigenvalues: {top}",
        f"smallest eigenvalue: {report.bottom.eigenvalues[0]:.5g}",
        f"trace: {report.trace.estimate:.5g} +- {report.trace.stderr:.2g} "
        f"({report.trace.method}, {report.trace.matvecs} products)",
        f"density: SLQ, {report.density.n_vectors} vectors x {report.density.steps} steps",
        "layers (trace, average eigenvalue):",
    ]
    for s in report.layers:
        lines.append(
            f"  {s.name:16s} {s.n_params:8d} params  trace {s.trace.estimate:10.4g} "
            f"+- {s.trace.stderr:.2g}  avg {s.average_eigenvalue:.4g}"
        )
    if report.bits is not None:
        bits = ", ".join(f"{k}: {v}" for k, v in report.bits.bits.items())
        lines.append(f"HAWQ-V2 bits at 4 bits/parameter on average: {bits}")
    for a in report.batch_size_advice:
        lines.append(
            f"batch size {a.base_batch_size} -> {a.new_batch_size}, {a.optimizer}: "
            f"lr {a.base_lr:.3g} -> {a.lr:.3g} (stability limit {a.stability_lr:.3g})"
        )
    if report.batch_size_note:
        lines.append(f"batch-size advice: {report.batch_size_note}")
    return "\n".join(lines)
