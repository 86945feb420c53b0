"""Distributed zeroth-order training: bytes per step against DDP, throughput from 1 to 4 local
processes, and a bandwidth projection for a 1B-parameter model at 64 and 1024 workers.

Runs ``anyorder.distributed.launch`` (gloo, one process per rank) on a bench task for each world
size, side by side in one invocation, and prints a Markdown table. Reproduce::

    python benchmarks/distributed_zo.py --task char-lm --steps 30 --worlds 1,2,3,4

The projection uses the measured figures: the per-step compute (two forward passes) and the cost of
regenerating one direction per parameter element in the update, scaled to 1B parameters in
proportion to the parameter count (stated as an assumption in the output).
"""

from __future__ import annotations

import argparse
import json
import tempfile

from anyorder.bench.distributed import bench_job
from anyorder.distributed.launch import DistributedRun, ddp_bytes_per_step, launch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", default="char-lm")
    parser.add_argument("--optimizer", default="zo-sgd")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--worlds", default="1,2,3,4")
    parser.add_argument("--out", default="distributed_zo.json")
    args = parser.parse_args()
    rows = []
    for world in map(int, args.worlds.split(",")):
        with tempfile.TemporaryDirectory() as tmp:
            run = DistributedRun(bench_job(args.task, args.optimizer), steps=args.steps)
            result = launch(world, run, tmp)
        if "failed" in result:
            raise SystemExit(f"world {world} failed: {result}")
        result.pop("losses", None)
        rows.append(result)
        print(json.dumps({k: result[k] for k in ("world_size", "queries_per_second",
                                                 "bytes_sent_per_step", "compute_s",
                                                 "exchange_s", "update_s")}), flush=True)  # fmt: skip
    with open(args.out, "w") as fh:
        json.dump(rows, fh, indent=1, default=str)

    d = rows[0]["n_params"]
    base_qps = rows[0]["queries_per_second"]
    print(f"\n{args.task}, {args.optimizer}, {d:,} parameters, {args.steps} steps\n")
    print("| processes | queries / s | speed-up | bytes sent / step / rank | wire bytes (ring) | "
          "DDP all-reduce bytes / step / rank | DDP / ours |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        ddp = r["ddp_bytes_per_step"]
        ratio = ddp / r["bytes_sent_per_step"] if ddp else float("nan")
        print(f"| {r['world_size']} | {r['queries_per_second']:.1f} | "
              f"{r['queries_per_second'] / base_qps:.2f}x | {r['bytes_sent_per_step']:.0f} | "
              f"{r['wire_bytes_per_step']:.0f} | {ddp:,.0f} | {ratio:,.0f}x |")  # fmt: skip

    # Projection. Per step and rank: compute = two forwards; update = regenerate N directions.
    one = rows[0]
    steps = one["steps"]
    compute_per_param = one["compute_s"] / steps / d  # seconds per parameter for 2 forwards
    update_per_direction_param = one["update_s"] / steps / d  # one direction (N = 1)
    big = 1_000_000_000
    print("\nProjection for a 1B-parameter model (assumption: per-step compute and direction "
          "regeneration scale linearly with the parameter count from the measurement above, on "
          "the same hardware):\n")  # fmt: skip
    print("| workers | compute / step (s) | update / step (s) | ours: bytes / step / rank (ring) "
          "| ours: bandwidth needed | DDP: bytes / step / rank | DDP: bandwidth needed |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for n in (64, 1024):
        compute = compute_per_param * big
        update = update_per_direction_param * big * n
        step_time = compute + update
        ours = 8 * (n - 1)
        ddp = ddp_bytes_per_step(big, n)
        print(f"| {n} | {compute:.1f} | {update:.1f} | {ours:,} | "
              f"{ours / step_time:.3g} B/s | {ddp / 1e9:.2f} GB | "
              f"{ddp / compute / 1e9:.2f} GB/s |")  # fmt: skip


if __name__ == "__main__":
    main()
