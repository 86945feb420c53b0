"""Run a bench task with :class:`ZOTrainer` across N local processes (gloo), as ``anyorder bench
--distributed N`` and the multi-process tests do.

Each rank trains the same initial model on its own shard of the data stream (the task's batches
drawn from a generator seeded by ``(seed, rank)``), exchanging only seeds and scalars. Rank 0 writes
``result.json`` (final loss, metric, bytes per step, queries per second, the weight hash); a rank
that loses a peer writes ``rank<r>.json`` with the error and exits with code 3.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

__all__ = ["DistributedRun", "launch", "ddp_bytes_per_step"]


@dataclass(frozen=True)
class DistributedRun:
    """What to run: task, zeroth-order optimizer (a bench name) and the trainer's options."""

    task: str
    optimizer: str = "zo-sgd"
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    steps: int = 100
    seed: int = 0
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
    from anyorder.bench.registry import get_optimizer, get_task
    from anyorder.bench.runner import _task_closure
    from anyorder.distributed.trainer import WorkerLostError, ZOTrainer

    out = Path(out_dir)
    task = get_task(run.task)()
    spec = get_optimizer(run.optimizer)
    model = task.init_model(run.seed)
    hp = spec.hyperparameters(task.name, run.hyperparameters)
    opt = spec.build(model.parameters(), hp)
    trainer = ZOTrainer(
        model,
        opt,
        quantize_bits=run.quantize_bits,
        check_every=run.check_every,
        checkpoint_dir=out / "checkpoint",
        checkpoint_every=run.checkpoint_every,
    )
    start = trainer.resume() if run.resume else 0
    batches = task.batches(torch.Generator().manual_seed(run.seed * 1000 + rank))
    for _ in range(start):  # the shard's stream is a function of the step: skip what was done
        next(batches)
    losses = []
    t0 = time.perf_counter()
    try:
        for step in range(start, run.steps):
            if run.kill_at is not None and run.kill_at == (rank, step):
                os._exit(1)
            batch = next(batches)
            losses.append(trainer.step(_task_closure(task, model, batch, task.loss)))
        trainer.check_replicas()
    except WorkerLostError as err:
        (out / f"rank{rank}.json").write_text(json.dumps({"rank": rank, "error": str(err)}))
        trainer.close()
        os._exit(3)
    wall = time.perf_counter() - t0
    trainer.close()
    if rank == 0:
        final_loss, metric = task.evaluate(model)
        n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        report = trainer.report()
        report.update(
            task=task.name,
            optimizer=spec.name,
            hyperparameters=hp,
            steps=run.steps,
            resumed_from=start,
            final_loss=final_loss,
            metric_name=task.metric_name,
            metric=metric,
            wall_time_s=wall,
            n_params=n_params,
            ddp_bytes_per_step=ddp_bytes_per_step(n_params, world),
            weights_digest=trainer.weights_digest().hex(),
            losses=losses,
        )
        (out / "result.json").write_text(json.dumps(report, default=str))
    dist.barrier()
    dist.destroy_process_group()


def launch(world: int, run: DistributedRun, out_dir: str | Path) -> dict[str, Any]:
    """Start ``world`` processes on this machine, wait for them and return rank 0's result (or,
    when ranks failed, ``{"failed": {rank: exit code}, "errors": [...]}``)."""
    if not isinstance(world, int) or world < 1:
        raise ValueError(f"world must be a positive integer, got {world!r}")
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
        return {"failed": failed, "errors": errors, "run": asdict(run)}
    return json.loads((out / "result.json").read_text())
