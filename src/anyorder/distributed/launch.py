"""Run a :class:`DistributedJob` with :class:`ZOTrainer` across N local processes (gloo), as
``anyorder bench --distributed N`` and the multi-process tests do.

The library knows nothing of the bench: the caller hands over a picklable factory
(:attr:`DistributedRun.job`) that every rank calls to build its own model, zeroth-order optimizer,
data stream and closures (the bench's is ``anyorder.bench.distributed.BenchJob``). Each rank trains
the same initial model on its own shard of the data stream, exchanging only seeds and scalars.
Rank 0 writes ``result.json`` (its losses and step times, bytes per step, queries per second, the
weight hash and the job's own final figures); a rank that loses a peer writes ``rank<r>.json``
with the error and exits with code 3.
"""

from __future__ import annotations

import json
import os
import pickle
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields
from datetime import timedelta
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

__all__ = ["DistributedJob", "DistributedRun", "launch", "ddp_bytes_per_step"]


class DistributedJob(Protocol):
    """What one rank trains, built in that rank's process by :attr:`DistributedRun.job`.

    ``model`` and ``optimizer`` (a ZOSGD / ZOAdam with ``n_queries=1``) must start identical on
    every rank; ``batches(rank)`` is that rank's shard of the data, a stream whose ``k``-th batch
    depends only on the rank and ``k`` (a resumed rank skips the batches of the steps done);
    ``closure(batch)`` evaluates the loss; ``evaluate()`` returns rank 0's final figures (any
    JSON-ready dict, merged into the result).
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer

    def batches(self, rank: int) -> Iterator[Any]: ...

    def closure(self, batch: Any) -> Callable[..., Any]: ...

    def evaluate(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class DistributedRun:
    """What to run: a picklable zero-argument factory of the :class:`DistributedJob` (a
    module-level class or function, or a ``functools.partial`` of one: it travels to the spawned
    processes by pickle) and the trainer's options."""

    job: Callable[[], DistributedJob]
    steps: int = 100
    quantize_bits: int | None = None
    checkpoint_every: int = 0
    check_every: int = 25
    resume: bool = False
    #: tests only: (rank, step) at which that rank dies with os._exit(1)
    kill_at: tuple[int, int] | None = None
    timeout_s: float = 30.0


def ddp_bytes_per_step(n_params: int, world: int, bytes_per_element: int = 4) -> float:
    """Bytes each rank sends per step in DDP's ring all-reduce of the gradients:
    ``2 (N - 1) / N`` times the gradient's size."""
    return 2 * (world - 1) / world * n_params * bytes_per_element


def _worker(rank: int, world: int, run: DistributedRun, out_dir: str, init_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=run.timeout_s),
    )
    from anyorder.distributed.trainer import WorkerLostError, ZOTrainer

    out = Path(out_dir)
    job = run.job()
    model = job.model
    trainer = ZOTrainer(
        model,
        job.optimizer,  # type: ignore[arg-type]
        quantize_bits=run.quantize_bits,
        check_every=run.check_every,
        checkpoint_dir=out / "checkpoint",
        checkpoint_every=run.checkpoint_every,
    )
    start = trainer.resume() if run.resume else 0
    batches = job.batches(rank)
    for _ in range(start):  # the shard's stream is a function of the step: skip what was done
        next(batches)
    losses, step_times = [], []
    try:
        for step in range(start, run.steps):
            if run.kill_at is not None and run.kill_at == (rank, step):
                os._exit(1)
            batch = next(batches)
            closure = job.closure(batch)
            t0 = time.perf_counter()
            losses.append(trainer.step(closure))
            step_times.append(time.perf_counter() - t0)
        trainer.check_replicas()
    except WorkerLostError as err:
        (out / f"rank{rank}.json").write_text(json.dumps({"rank": rank, "error": str(err)}))
        trainer.close()
        os._exit(3)
    trainer.close()
    if rank == 0:
        n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        report = trainer.report()
        report.update(
            steps=run.steps,
            resumed_from=start,
            wall_time_s=sum(step_times),
            n_params=n_params,
            ddp_bytes_per_step=ddp_bytes_per_step(n_params, world),
            weights_digest=trainer.weights_digest().hex(),
            losses=losses,
            step_times_s=step_times,
            **job.evaluate(),
        )
        (out / "result.json").write_text(json.dumps(report, default=str))
    dist.barrier()
    exit_finished_worker()


def exit_finished_worker() -> None:
    """End a spawned worker once every rank passed the final barrier (all results are on disk).

    ``os._exit(0)`` instead of ``destroy_process_group()`` and a normal interpreter exit: gloo's
    threads, torn down while the peers are doing the same, now and then abort a finished rank
    with "terminate called without an active exception" (exit code -6, seen once in CI), which
    would report a complete run as failed."""
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def launch(world: int, run: DistributedRun, out_dir: str | Path) -> dict[str, Any]:
    """Start ``world`` processes on this machine, wait for them and return rank 0's result (or,
    when ranks failed, ``{"failed": {rank: exit code}, "errors": [...]}``)."""
    if not isinstance(world, int) or world < 1:
        raise ValueError(f"world must be a positive integer, got {world!r}")
    try:
        pickle.dumps(run.job)
    except Exception as err:
        raise TypeError(
            "DistributedRun.job must be picklable (a module-level class or function, or a "
            f"functools.partial of one): {type(err).__name__}: {err}"
        ) from err
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "result.json").unlink(missing_ok=True)
    fd, init_file = tempfile.mkstemp(prefix="anyorder-gloo-")
    os.close(fd)
    os.unlink(init_file)  # the file store creates it
    try:
        ctx = mp.start_processes(
            _worker,
            args=(world, run, str(out), init_file),
            nprocs=world,
            join=False,
            start_method="spawn",
        )
        for process in ctx.processes:
            process.join()
        codes = {rank: p.exitcode for rank, p in enumerate(ctx.processes)}
    finally:
        Path(init_file).unlink(missing_ok=True)
    failed = {rank: code for rank, code in codes.items() if code != 0}
    if failed:
        errors = [json.loads(f.read_text()) for f in sorted(out.glob("rank*.json")) if f.is_file()]
        settings = {f.name: getattr(run, f.name) for f in fields(run) if f.name != "job"}
        return {"failed": failed, "errors": errors, "run": {**settings, "job": repr(run.job)}}
    return json.loads((out / "result.json").read_text())
