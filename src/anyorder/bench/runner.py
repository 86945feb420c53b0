"""Runs a bench suite: every applicable optimizer on every task, with the same seed, number of
steps and data order, measuring loss, metric, time, memory and evaluation counts (see
``measure``). Results are frozen dataclasses that serialise to JSON (``report``).
"""

from __future__ import annotations

import datetime as _dt
import math
import os
import platform
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

import anyorder
from anyorder.bench.budgets import budget_record
from anyorder.bench.measure import EvalCounter, median_step_time, peak_memory_bytes, synchronize
from anyorder.bench.registry import OptimizerSpec, get_task
from anyorder.bench.tasks.base import Task
from anyorder.core.closure import make_closure

__all__ = [
    "SUITES",
    "HistoryPoint",
    "RunResult",
    "SuiteResult",
    "PlannedRun",
    "plan_suite",
    "run_one",
    "run_suite",
]

#: Training steps the memory probe measures (and batches the inference peak is taken over).
MEMORY_STEPS = 3

#: The built-in suites: which tasks they run (steps come from each task's ``default_steps``).
SUITES: dict[str, tuple[str, ...]] = {
    "quick": ("digits-mlp", "breast-cancer-logreg", "char-lm", "rosenbrock", "rastrigin"),
    "full": (
        "digits-mlp",
        "breast-cancer-logreg",
        "char-lm",
        "text-finetune",
        "rosenbrock",
        "rastrigin",
    ),
}


@dataclass(frozen=True)
class HistoryPoint:
    """The training loss at one step (evaluated by the optimizer before its update)."""

    step: int
    loss: float
    wall_time_s: float
    forward_evals: int
    backward_evals: int = 0


@dataclass(frozen=True)
class RunResult:
    """One optimizer on one task. Losses of diverged runs and non-finite figures are ``None``."""

    task: str
    optimizer: str
    hyperparameters: dict[str, Any]
    task_options: dict[str, Any]
    seed: int
    steps: int
    steps_requested: int
    time_budget_s: float | None
    final_loss: float | None
    metric_name: str
    metric: float | None
    higher_is_better: bool
    time_per_step_s: float | None
    total_time_s: float
    inference_time_s: float | None
    peak_memory_bytes: int | None  # None where not measured (``--distributed`` runs)
    inference_peak_memory_bytes: int
    forward_evals: int
    backward_evals: int
    forward_evals_per_step: float
    backward_evals_per_step: float
    diverged: bool
    error: str | None = None
    history: list[HistoryPoint] = field(default_factory=list)
    #: ``anyorder bench --monitor``: the Hessian monitor's settings, records and seconds
    #: (``anyorder.hessian.HessianMonitor.to_dict``), or ``None`` when not monitored.
    monitor: dict[str, Any] | None = None
    #: ``anyorder bench --distributed N``: bytes per step, queries per second, ... of the run
    #: across N processes (``anyorder.bench.distributed``), or ``None`` for a single process.
    distributed: dict[str, Any] | None = None
    #: The budget the run was given (``anyorder.bench.budgets.budget_record``): its kind
    #: (``steps``, ``seconds`` or ``evaluations``), the caps and the backward:forward cost ratio.
    budget: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)


@dataclass(frozen=True)
class SuiteResult:
    """The whole bench: metadata plus one :class:`RunResult` per (task, optimizer)."""

    anyorder_version: str
    created: str
    machine: dict[str, Any]
    suite: str
    seed: int
    device: str
    runs: list[RunResult]
    #: The paired seeds every (task, optimizer) pair ran with (``--seeds``); ``[seed]`` for one.
    seeds: list[int] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (the ``results.json`` schema)."""
        return asdict(self)


@dataclass(frozen=True)
class PlannedRun:
    """A validated (task, optimizer) pair with its resolved settings."""

    task: Task
    spec: OptimizerSpec
    hyperparameters: dict[str, Any]
    steps: int
    time_budget_s: float | None = None
    #: Evaluation budget: the run ends once forward + backward_cost * backward reaches it.
    eval_budget: float | None = None
    #: Cost of one backward pass in forward evaluations (see ``anyorder.bench.budgets``).
    backward_cost: float = 2.0


def machine_info(device: torch.device) -> dict[str, Any]:
    """Where the figures were taken."""
    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _finite_or_none(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


def plan_suite(
    *,
    suite: str = "quick",
    tasks: Sequence[str] | None = None,
    optimizers: Sequence[str] | None = None,
    steps: int | None = None,
    device: str = "cpu",
    config: Mapping[str, Any] | None = None,
    time_budget_s: float | None = None,
    log: Callable[[str], None] | None = None,
) -> list[PlannedRun]:
    """Resolve names, options and hyperparameters, and check them all before anything runs.

    An optimizer named in ``optimizers`` is skipped on a task that lacks what it requires, with
    a one-line reason passed to ``log`` (e.g. Sophia-G needs logits, which function tasks lack).

    ``time_budget_s`` ends each run once its steps have taken that many seconds (``steps`` is
    then the cap), for comparisons at an equal wall-clock budget.

    Raises ``UnknownNameError`` for unknown names, ``ValueError`` for bad values and
    ``MissingDataError`` when a task's data package is missing.
    """
    from anyorder.bench.config import resolve_optimizer

    if suite not in SUITES:
        raise ValueError(f"unknown suite {suite!r}; valid suites: {', '.join(SUITES)}")
    if steps is not None and (not isinstance(steps, int) or steps < 1):
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if time_budget_s is not None and not (
        isinstance(time_budget_s, (int, float)) and time_budget_s > 0
    ):
        raise ValueError(f"time budget must be a number of seconds > 0, got {time_budget_s!r}")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but CUDA is not available; use --device cpu")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"unknown device {device!r}; valid devices: cpu, cuda")
    config = config or {}
    if config:  # the checks load_config makes, for a config dict given directly from Python
        from anyorder.bench.checks import check_config

        check_config(config, "<config given to plan_suite>")
    task_names = list(tasks) if tasks else list(SUITES[suite])
    opt_names = list(optimizers) if optimizers else None
    specs: list[tuple[OptimizerSpec, dict[str, Any], dict[str, dict[str, Any]]]] = []
    if opt_names is None:
        from anyorder.bench.registry import all_optimizers

        opt_names = list(all_optimizers())
    for name in opt_names:
        specs.append(resolve_optimizer(name, config))
    plan: list[PlannedRun] = []
    skipped: list[str] = []
    for task_name in task_names:
        task_cls = get_task(task_name)
        task = task_cls(device=dev, **dict(config.get("tasks", {}).get(task_name, {})))
        task.init_model(0)  # builds the model and loads the data: fails early if missing
        n_steps = steps if steps is not None else task_cls.default_steps[suite]
        for spec, general, per_task in specs:
            if not spec.applies_to(task):
                if optimizers:
                    missing = ", ".join(sorted(spec.requires - task.provides))
                    skipped.append(
                        f"skipping {spec.name} on {task_name}: it needs {missing}, which this "
                        "task does not provide"
                    )
                continue
            hp = spec.hyperparameters(task_name, {**general, **per_task.get(task_name, {})})
            probe = torch.nn.Parameter(torch.zeros(2))
            spec.build([probe], hp)  # validates hyperparameters (raises ValueError)
            plan.append(PlannedRun(task, spec, hp, n_steps, time_budget_s))
    if not plan:
        raise ValueError(
            f"no optimizer among {', '.join(opt_names)} applies to tasks {', '.join(task_names)}"
            + (f" ({'; '.join(skipped)})" if skipped else "")
        )
    if log is not None:
        for line in skipped:
            log(line)
    return plan


def _loss_value(loss: Any) -> float:
    if loss is None:
        return float("nan")
    return float(loss.detach()) if isinstance(loss, torch.Tensor) else float(loss)


def _uncounted(opt: torch.optim.Optimizer, kind: str) -> int:
    """What ``opt`` reports it evaluated beyond what the counter sees (one protocol for every
    optimizer: :attr:`anyorder.core.AnyOrderOptimizer.uncounted_evaluations`)."""
    extra = getattr(opt, "uncounted_evaluations", None)
    return int(extra.get(kind, 0)) if isinstance(extra, dict) else 0


def _forward_count(opt: torch.optim.Optimizer, counter: EvalCounter) -> int:
    """Loss evaluations so far: the counter's, plus those an optimizer batched into one
    vectorised call (particle methods), which the counter sees once."""
    return counter.forward + _uncounted(opt, "forward")


def _backward_count(opt: torch.optim.Optimizer, counter: EvalCounter) -> int:
    """Backward passes so far: through the closure's loss (the counter's hook) plus those an
    optimizer makes on its own (double-backward Hessian-vector products, Sophia-G's backward from
    sampled labels)."""
    return counter.backward + _uncounted(opt, "backward")


def _task_closure(
    task: Task,
    model: torch.nn.Module,
    batch: Any,
    loss_fn: Callable[..., Any],
    *,
    with_logits: bool = False,
):
    """The contract closure of one step. With ``with_logits`` (optimizers that require
    ``"logits"``, e.g. Sophia-G), ``loss_fn`` is ``task.loss_and_logits`` (maybe counted) and the
    closure returns ``(loss, logits)``; it differentiates the loss only, as usual."""
    if not with_logits:
        return make_closure(model, lambda output, _batch: output, batch, forward=loss_fn)
    latest: list[torch.Tensor] = []

    def loss_keeping_logits(model: torch.nn.Module, batch: Any) -> torch.Tensor:
        loss, logits = loss_fn(model, batch)
        latest[:] = [logits]
        return loss

    inner = make_closure(model, lambda output, _batch: output, batch, forward=loss_keeping_logits)

    def closure(backward: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        loss = inner(backward=backward)
        return loss, latest.pop()

    closure.model = model  # type: ignore[attr-defined]
    return closure


def _needs_logits(run: PlannedRun) -> bool:
    return "logits" in run.spec.requires


def _loss_fn(task: Task, run: PlannedRun) -> Callable[..., Any]:
    return task.loss_and_logits if _needs_logits(run) else task.loss


def _memory_probe(task: Task, run: PlannedRun, seed: int, n_steps: int) -> int:
    if task.device.type == "cuda":
        # One throwaway step first: one-time allocations (cuBLAS workspaces for the backward
        # pass) are not the optimizer's memory.
        warm = task.init_model(seed)
        warm_opt = run.spec.build(run.spec.params_of(warm), run.hyperparameters)
        warm_batch = next(task.batches(torch.Generator().manual_seed(seed)))
        warm_opt.step(
            _task_closure(
                task, warm, warm_batch, _loss_fn(task, run), with_logits=_needs_logits(run)
            )
        )
        del warm, warm_opt
    model = task.init_model(seed)
    opt = run.spec.build(run.spec.params_of(model), run.hyperparameters)
    batches = task.batches(torch.Generator().manual_seed(seed))
    batch_list = [next(batches) for _ in range(n_steps)]

    def work() -> None:
        for batch in batch_list:
            try:
                opt.step(
                    _task_closure(
                        task, model, batch, _loss_fn(task, run), with_logits=_needs_logits(run)
                    )
                )
            except Exception:  # the timed run records the failure; the probe keeps its peak
                return

    return peak_memory_bytes(work, task.device)


def inference_figures(
    task: Task, seed: int, repeats: int = 10, n_batches: int = MEMORY_STEPS
) -> tuple[int, float]:
    """(peak bytes, median seconds) of one forward evaluation under ``no_grad``.

    The peak is the largest over the first ``n_batches`` batches, the ones the training memory
    probe steps through (batch shapes can differ, e.g. text trimmed to its longest item); the
    time is that of the first batch.
    """
    model = task.init_model(seed)
    stream = task.batches(torch.Generator().manual_seed(seed))
    batches = [next(stream) for _ in range(max(1, n_batches))]

    def forward(batch: Any) -> None:
        with torch.no_grad():
            task.loss(model, batch)

    forward(batches[0])  # warm-up: one-time allocations (e.g. the cuBLAS workspace)
    peak = max(peak_memory_bytes(lambda b=b: forward(b), task.device) for b in batches)
    times = []
    for _ in range(repeats + 1):
        synchronize(task.device)
        t0 = time.perf_counter()
        forward(batches[0])
        synchronize(task.device)
        times.append(time.perf_counter() - t0)
    return peak, median_step_time(times, warmup=1)


def run_one(
    run: PlannedRun,
    seed: int,
    *,
    warmup: int = 2,
    memory_steps: int = MEMORY_STEPS,
    inference: tuple[int, float] | None = None,
    on_step: Callable[[], None] | None = None,
    monitor_every: int | None = None,
) -> RunResult:
    """Train ``run.spec`` on ``run.task`` for ``run.steps`` steps from ``seed``.

    Peak memory comes from a separate probe of ``memory_steps`` steps on a fresh copy (so the
    profiler does not slow the timed run). A non-finite loss ends the run as diverged.

    ``monitor_every``: run :class:`anyorder.hessian.HessianMonitor` every that many steps on a
    fixed batch (drawn from its own generator, so the data order is unchanged), outside the timed
    step and the evaluation counts; its records go into ``RunResult.monitor``.
    """
    task = run.task
    inf_peak, inf_time = inference if inference is not None else inference_figures(task, seed)
    mem_peak = _memory_probe(task, run, seed, min(memory_steps, run.steps))

    model = task.init_model(seed)
    opt = run.spec.build(run.spec.params_of(model), run.hyperparameters)
    batches = task.batches(torch.Generator().manual_seed(seed))
    counter = EvalCounter()
    counted_loss = counter.wrap(_loss_fn(task, run))
    history: list[HistoryPoint] = []
    times: list[float] = []
    wall = 0.0
    diverged, error = False, None
    monitor = _make_monitor(task, model, opt, seed, monitor_every) if monitor_every else None
    monitor_error = None
    for step in range(run.steps):
        batch = next(batches)
        closure = _task_closure(task, model, batch, counted_loss, with_logits=_needs_logits(run))
        synchronize(task.device)
        t0 = time.perf_counter()
        try:
            loss = opt.step(closure)
        except Exception as err:  # an optimizer's non-finite guard, or any failure of its step:
            # recorded in the run's result, and the suite goes on (nothing else is lost)
            diverged, error = (
                True,
                f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}",
            )
            break
        synchronize(task.device)
        dt = time.perf_counter() - t0
        times.append(dt)
        wall += dt
        value = _loss_value(loss)
        history.append(
            HistoryPoint(
                step, value, wall, _forward_count(opt, counter), _backward_count(opt, counter)
            )
        )
        if monitor is not None and monitor_error is None and math.isfinite(value):
            try:
                monitor.step()
            except Exception as err:  # a failed analysis must not end the run
                monitor_error = f"{type(err).__name__}: {err}"
        if on_step is not None:
            on_step()
        if not math.isfinite(value):
            diverged = True
            break
        if run.time_budget_s is not None and wall >= run.time_budget_s:
            break
        if run.eval_budget is not None and history[-1].forward_evals + run.backward_cost * (
            history[-1].backward_evals
        ) >= run.eval_budget:
            break
    final_loss = metric = None
    if not diverged:
        final_loss, metric = task.evaluate(model)
        diverged = not math.isfinite(final_loss)
    done = len(history)
    forwards, backwards = _forward_count(opt, counter), _backward_count(opt, counter)
    return RunResult(
        task=task.name,
        optimizer=run.spec.name,
        hyperparameters=dict(run.hyperparameters),
        task_options=dict(task.options),
        seed=seed,
        steps=done,
        steps_requested=run.steps,
        time_budget_s=run.time_budget_s,
        final_loss=_finite_or_none(final_loss),
        metric_name=task.metric_name,
        metric=_finite_or_none(metric),
        higher_is_better=task.higher_is_better,
        time_per_step_s=_finite_or_none(median_step_time(times, warmup)) if times else None,
        total_time_s=wall,
        inference_time_s=_finite_or_none(inf_time),
        peak_memory_bytes=mem_peak,
        inference_peak_memory_bytes=inf_peak,
        forward_evals=forwards,
        backward_evals=backwards,
        forward_evals_per_step=forwards / max(done, 1),
        backward_evals_per_step=backwards / max(done, 1),
        diverged=diverged,
        error=error,
        history=[
            HistoryPoint(
                h.step,
                h.loss if math.isfinite(h.loss) else None,
                h.wall_time_s,
                h.forward_evals,
                h.backward_evals,
            )
            for h in history
        ],
        monitor=None
        if monitor is None
        else {**monitor.to_dict(), "error": monitor_error, "train_seconds": wall},
        budget=budget_record(run),
    )


def _make_monitor(
    task: Task, model: torch.nn.Module, opt: torch.optim.Optimizer, seed: int, every: int
) -> Any:
    from anyorder.hessian.monitor import HessianMonitor

    batch = next(task.batches(torch.Generator().manual_seed(seed + 1)))
    return HessianMonitor(
        model,
        lambda output, _batch: output,
        batch,
        forward=task.loss,
        every=every,
        optimizer=opt,
        seed=seed,
    )


def run_suite(
    plan: Sequence[PlannedRun],
    *,
    suite: str = "quick",
    seed: int = 0,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    monitor_every: int | None = None,
    seeds: Sequence[int] | None = None,
    finished: Mapping[tuple[str, str, int], RunResult] | None = None,
    on_result: Callable[[RunResult], None] | None = None,
) -> SuiteResult:
    """Run every planned run in order; a diverged run is recorded and the suite goes on.
    ``monitor_every`` turns on the Hessian monitor (see :func:`run_one`).

    ``seeds`` (default ``[seed]``): every planned run is repeated for each seed, seed by seed, with
    paired seeds: for a given seed every optimizer starts from the same weights and sees the same
    batches (``task.init_model(seed)``, ``task.batches(Generator().manual_seed(seed))``).
    ``finished`` maps ``(task, optimizer, seed)`` to results already on disk (``--resume``): those
    runs are not redone. ``on_result`` receives each new result as soon as it is finished (the CLI
    saves it, so an interrupted suite loses no finished run).
    """
    from tqdm.auto import tqdm

    seed_list = list(seeds) if seeds is not None else [seed]
    finished = finished or {}
    device = plan[0].task.device if plan else torch.device("cpu")
    inference: dict[int, tuple[int, float]] = {}
    runs: list[RunResult] = []
    todo = [
        (s, run)
        for s in seed_list
        for run in plan
        if (run.task.name, run.spec.name, s) not in finished
    ]
    total = sum(r.steps for _, r in todo)
    with tqdm(total=total, disable=not progress, unit="step", dynamic_ncols=True) as bar:
        for run_seed in seed_list:
            for run in plan:
                done = finished.get((run.task.name, run.spec.name, run_seed))
                if done is not None:
                    runs.append(done)
                    continue
                bar.set_description(f"{run.task.name} / {run.spec.name} / seed {run_seed}")
                key = id(run.task)
                if key not in inference:
                    inference[key] = inference_figures(run.task, seed_list[0])
                result = run_one(
                    run,
                    run_seed,
                    inference=inference[key],
                    on_step=lambda: bar.update(1),
                    monitor_every=monitor_every,
                )
                bar.update(run.steps - result.steps)
                if result.diverged and log is not None:
                    why = f" ({result.error})" if result.error else ""
                    log(
                        f"{run.task.name} / {run.spec.name} / seed {run_seed}: diverged after "
                        f"{result.steps} steps{why}"
                    )
                if on_result is not None:
                    on_result(result)
                runs.append(result)
    return SuiteResult(
        anyorder_version=anyorder.__version__,
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        machine=machine_info(device),
        suite=suite,
        seed=seed_list[0],
        device=str(device),
        runs=runs,
        seeds=seed_list,
    )
