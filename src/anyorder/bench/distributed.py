"""``anyorder bench --distributed N``: the planned zeroth-order runs across N local processes.

Each run is launched with :func:`anyorder.distributed.launch` (gloo, one process per rank, every
rank its own shard of the data stream) and reported with the bytes each rank sent per step, the
ring all-gather's wire bytes, DDP's all-reduce bytes for the same model, and queries per second.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from anyorder.bench.runner import PlannedRun
from anyorder.distributed.launch import DistributedRun, launch

__all__ = ["DISTRIBUTABLE", "run_distributed", "format_distributed_table"]

#: Optimizers the distributed trainer can wrap (one two-point query per rank).
DISTRIBUTABLE = ("zo-sgd", "zo-adam")


def run_distributed(
    plan: list[PlannedRun],
    world: int,
    out_dir: Path,
    *,
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run every planned zeroth-order run on ``world`` processes; write and return results.json.

    Runs of other optimizers are left out (with a note), as are runs on other devices than CPU.
    """
    runs, skipped = [], []
    for planned in plan:
        if planned.spec.name not in DISTRIBUTABLE:
            skipped.append(f"{planned.task.name}/{planned.spec.name}")
            continue
        hp = dict(planned.hyperparameters)
        log(
            f"{planned.task.name} / {planned.spec.name}: {planned.steps} steps on {world} processes"
        )
        result = launch(
            world,
            DistributedRun(
                task=planned.task.name,
                optimizer=planned.spec.name,
                hyperparameters=hp,
                steps=planned.steps,
                seed=seed,
            ),
            out_dir / f"{planned.task.name}-{planned.spec.name}",
        )
        result.pop("losses", None)
        runs.append(result)
    if not runs:
        raise ValueError(
            f"--distributed needs a zeroth-order optimizer ({', '.join(DISTRIBUTABLE)}) in the plan"
        )
    data = {"distributed": world, "seed": seed, "skipped": skipped, "runs": runs}
    (out_dir / "results.json").write_text(json.dumps(data, indent=1, default=str))
    return data


def format_distributed_table(data: dict[str, Any]) -> str:
    """A plain-text table of the distributed runs."""
    lines = [
        f"{'task':<22} {'optimizer':<8} {'final loss':>10} {'B/step':>7} {'wire B':>7} "
        f"{'DDP B/step':>11} {'queries/s':>9}"
    ]
    for r in data["runs"]:
        if "failed" in r:
            lines.append(f"{r['run']['task']:<22} {r['run']['optimizer']:<8} failed: {r['errors']}")
            continue
        lines.append(
            f"{r['task']:<22} {r['optimizer']:<8} {r['final_loss']:>10.4f} "
            f"{r['bytes_sent_per_step']:>7.1f} {r['wire_bytes_per_step']:>7.1f} "
            f"{r['ddp_bytes_per_step']:>11.0f} {r['queries_per_second']:>9.1f}"
        )
    return "\n".join(lines)
