"""``anyorder bench --distributed N``: the planned zeroth-order runs across N local processes.

The bench hands the library's :func:`anyorder.distributed.launch` a picklable :class:`BenchJob`
(task name and options, optimizer spec, hyperparameters, seed) that every rank turns into its
model, optimizer, data shard and closures; the library never imports the bench. Each run is
written as a :class:`~anyorder.bench.runner.RunResult`, the schema of every other run, with the
distributed figures (bytes each rank sent per step, the ring all-gather's wire bytes, DDP's
all-reduce bytes for the same model, queries per second, ...) under ``distributed``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import anyorder
from anyorder.bench.measure import median_step_time
from anyorder.bench.registry import OptimizerSpec, get_task
from anyorder.bench.runner import (
    HistoryPoint,
    PlannedRun,
    RunResult,
    SuiteResult,
    _task_closure,
    inference_figures,
    machine_info,
)
from anyorder.distributed.launch import DistributedRun, launch

__all__ = [
    "DISTRIBUTABLE",
    "BenchJob",
    "bench_job",
    "select_distributed",
    "run_distributed",
    "format_distributed_table",
]

#: Optimizers the distributed trainer can wrap (one two-point query per rank).
DISTRIBUTABLE = ("zo-sgd", "zo-adam")

#: Steps of each rank's timings left out of ``time_per_step_s`` (as in the single-process runs).
WARMUP = 2


class _Job:
    """One rank's bench task, model, optimizer, shard and closures."""

    def __init__(self, spec: BenchJob) -> None:
        self.task = get_task(spec.task)(**spec.task_options)
        self.seed = spec.seed
        self.model = self.task.init_model(spec.seed)
        self.optimizer = spec.optimizer.build(self.model.parameters(), spec.hyperparameters)

    def batches(self, rank: int) -> Iterator[Any]:
        return self.task.batches(torch.Generator().manual_seed(self.seed * 1000 + rank))

    def closure(self, batch: Any) -> Callable[..., Any]:
        return _task_closure(self.task, self.model, batch, self.task.loss)

    def evaluate(self) -> dict[str, Any]:
        final_loss, metric = self.task.evaluate(self.model)
        return {"final_loss": final_loss, "metric": metric}


@dataclass(frozen=True)
class BenchJob:
    """A picklable factory of one rank's bench job (:class:`anyorder.distributed.DistributedJob`):
    the task by name and options (rebuilt in each process), the optimizer spec (a config variant
    included) and its hyperparameters, and the seed of the weights and of the shards (rank ``r``
    draws its batches from ``seed * 1000 + r``)."""

    task: str
    optimizer: OptimizerSpec
    hyperparameters: dict[str, Any]
    seed: int = 0
    task_options: dict[str, Any] = field(default_factory=dict)

    def __call__(self) -> _Job:
        return _Job(self)


def bench_job(
    task: str,
    optimizer: str = "zo-sgd",
    hyperparameters: dict[str, Any] | None = None,
    seed: int = 0,
    **task_options: Any,
) -> BenchJob:
    """A :class:`BenchJob` for a registered task and optimizer, with the registry's
    hyperparameters for that task updated by ``hyperparameters``."""
    from anyorder.bench.registry import get_optimizer

    spec = get_optimizer(optimizer)
    return BenchJob(task, spec, spec.hyperparameters(task, hyperparameters), seed, task_options)


def _finite(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and math.isfinite(x) else None


def _run_result(
    planned: PlannedRun, world: int, seed: int, raw: dict[str, Any], inference: tuple[int, float]
) -> RunResult:
    """A launch's result in the schema of every run; a failed launch is a diverged run whose
    ``error`` says which ranks failed and why."""
    task = planned.task
    failed = "failed" in raw
    losses = [] if failed else [float(x) for x in raw["losses"]]
    times = [] if failed else [float(t) for t in raw["step_times_s"]]
    history, wall = [], 0.0
    for step, (loss, dt) in enumerate(zip(losses, times)):
        wall += dt
        history.append(HistoryPoint(step, _finite(loss), wall, 2 * world * (step + 1)))
    done = len(history)
    final_loss = None if failed else _finite(raw["final_loss"])
    diverged = failed or final_loss is None or any(h.loss is None for h in history)
    error = None
    if failed:
        messages = "; ".join(e["error"] for e in raw["errors"]) or "no message"
        error = f"ranks {sorted(raw['failed'])} failed (exit codes {raw['failed']}): {messages}"
    distributed = None
    if not failed:
        keys = ("world_size", "bytes_sent_per_step", "wire_bytes_per_step", "ddp_bytes_per_step",
                "queries_per_second", "check_bytes", "compute_s", "exchange_s", "update_s",
                "skipped_queries", "n_params", "weights_digest", "resumed_from", "quantization")  # fmt: skip
        distributed = {k: raw[k] for k in keys if k in raw}
    forwards = 2 * world * done
    return RunResult(
        task=task.name,
        optimizer=planned.spec.name,
        hyperparameters=dict(planned.hyperparameters),
        task_options=dict(task.options),
        seed=seed,
        steps=done,
        steps_requested=planned.steps,
        time_budget_s=None,
        final_loss=final_loss,
        metric_name=task.metric_name,
        metric=None if failed else _finite(raw["metric"]),
        higher_is_better=task.higher_is_better,
        time_per_step_s=_finite(median_step_time(times, WARMUP)) if times else None,
        total_time_s=wall,
        inference_time_s=_finite(inference[1]),
        peak_memory_bytes=None,
        inference_peak_memory_bytes=inference[0],
        forward_evals=forwards,
        backward_evals=0,
        forward_evals_per_step=forwards / max(done, 1),
        backward_evals_per_step=0.0,
        diverged=diverged,
        error=error,
        history=history,
        distributed=distributed,
    )


def select_distributed(
    plan: list[PlannedRun], log: Callable[[str], None] = print
) -> list[PlannedRun]:
    """The planned runs ``--distributed`` can run (ZO-SGD, ZO-Adam and their config variants,
    checked against the trainer's requirements), logging one line per run left out. Raises
    ``ValueError`` when none is left or a run has a time budget; called before anything is
    written."""
    factories = _distributable_factories()
    todo = []
    for planned in plan:
        if planned.time_budget_s is not None:
            raise ValueError("--distributed runs a fixed number of steps; drop --time-budget")
        if planned.spec.factory not in factories:
            log(f"skipping {planned.spec.name} on {planned.task.name}: --distributed runs only "
                f"{', '.join(DISTRIBUTABLE)} (and their variants)")  # fmt: skip
            continue
        _check_trainable(planned)
        todo.append(planned)
    if not todo:
        raise ValueError(
            f"--distributed needs a zeroth-order optimizer ({', '.join(DISTRIBUTABLE)}) in the plan"
        )
    return todo


def run_distributed(
    plan: list[PlannedRun],
    world: int,
    out_dir: Path,
    *,
    seed: int = 0,
    suite: str = "quick",
    log: Callable[[str], None] = print,
) -> SuiteResult:
    """Run every planned zeroth-order run (:func:`select_distributed`) on ``world`` processes;
    returns the suite's result, one :class:`RunResult` per run (the caller writes it with
    :func:`anyorder.bench.report.write_report`). Each run's processes keep their seed log in
    ``out_dir/<task>-<optimizer>/checkpoint``.
    """
    todo = select_distributed(plan, log)
    runs = []
    inference: dict[int, tuple[int, float]] = {}
    for planned in todo:
        task = planned.task
        if id(task) not in inference:
            inference[id(task)] = inference_figures(task, seed)
        log(f"{task.name} / {planned.spec.name}: {planned.steps} steps on {world} processes")
        job = BenchJob(task.name, planned.spec, dict(planned.hyperparameters), seed,
                       dict(task.options))  # fmt: skip
        raw = launch(
            world,
            DistributedRun(job, steps=planned.steps),
            out_dir / f"{task.name}-{planned.spec.name}",
        )
        result = _run_result(planned, world, seed, raw, inference[id(task)])
        if result.diverged:
            log(f"{task.name} / {planned.spec.name}: diverged after {result.steps} steps"
                + (f" ({result.error})" if result.error else ""))  # fmt: skip
        runs.append(result)
    device = torch.device("cpu")
    return SuiteResult(
        anyorder_version=anyorder.__version__,
        created=_now(),
        machine=machine_info(device),
        suite=suite,
        seed=seed,
        device=str(device),
        runs=runs,
    )


def _now() -> str:
    import datetime as _dt

    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _check_trainable(planned: PlannedRun) -> None:
    """The trainer's own checks (one two-point query per rank), in this process before any
    launch: ``ValueError`` naming the run."""
    from anyorder.distributed.trainer import ZOTrainer

    probe = torch.nn.Linear(1, 1)
    try:
        ZOTrainer(probe, planned.spec.build(probe.parameters(), planned.hyperparameters),
                  check_every=0)  # fmt: skip
    except (TypeError, ValueError) as err:
        raise ValueError(f"--distributed: {planned.spec.name} on {planned.task.name}: {err}") from err


def _distributable_factories() -> set[Any]:
    from anyorder.bench.registry import get_optimizer

    return {get_optimizer(name).factory for name in DISTRIBUTABLE}


def format_distributed_table(result: SuiteResult) -> str:
    """A plain-text table of the distributed figures of each run."""
    lines = [
        f"{'task':<22} {'optimizer':<8} {'final loss':>10} {'B/step':>7} {'wire B':>7} "
        f"{'DDP B/step':>11} {'queries/s':>9}"
    ]
    for r in result.runs:
        d = r.distributed
        if d is None:
            lines.append(f"{r.task:<22} {r.optimizer:<8} failed: {r.error}")
            continue
        loss = f"{r.final_loss:>10.4f}" if r.final_loss is not None else f"{'-':>10}"
        lines.append(
            f"{r.task:<22} {r.optimizer:<8} {loss} "
            f"{d['bytes_sent_per_step']:>7.1f} {d['wire_bytes_per_step']:>7.1f} "
            f"{d['ddp_bytes_per_step']:>11.0f} {d['queries_per_second'] or 0:>9.1f}"
        )
    return "\n".join(lines)
