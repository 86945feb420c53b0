"""Pick each baseline's learning rate per task from a grid of powers of ten on the quick suite.

Usage: python benchmarks/tune_lr.py [--steps N] [--optimizers a,b] [--tasks t,u] [--grid 1e-4,1e-3]

For every (task, optimizer) it runs lr in {1e-5, ..., 1} (same seed, steps and data order as the
bench) and prints the lr with the lowest final training objective; diverged runs lose. The chosen
values are the registry's defaults in ``anyorder/bench/optimizers.py``.
"""

from __future__ import annotations

import argparse

from anyorder.bench.registry import all_optimizers
from anyorder.bench.runner import SUITES, plan_suite, run_suite

GRID = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--optimizers", default="sgd,adam,adamw")
    parser.add_argument("--tasks", default=",".join(SUITES["quick"]))
    parser.add_argument("--grid", default=None, help="comma-separated lrs (default: 1e-5 ... 1)")
    args = parser.parse_args()
    names = args.optimizers.split(",")
    grid = tuple(float(v) for v in args.grid.split(",")) if args.grid else GRID
    all_optimizers()
    config = {"optimizers": {f"{n}@{lr:g}": {"base": n, "lr": lr} for n in names for lr in grid}}
    for per_task in config["optimizers"].values():
        per_task["tasks"] = {t: {"lr": per_task["lr"]} for t in args.tasks.split(",")}
    plan = plan_suite(
        tasks=args.tasks.split(","),
        optimizers=list(config["optimizers"]),
        steps=args.steps,
        config=config,
    )
    result = run_suite(plan, progress=True)
    best: dict[tuple[str, str], tuple[float, float]] = {}
    for r in result.runs:
        base, lr = r.optimizer.split("@")
        score = r.final_loss if r.final_loss is not None and not r.diverged else float("inf")
        key = (r.task, base)
        if key not in best or score < best[key][1]:
            best[key] = (float(lr), score)
    print(f"{'task':22s} {'optimizer':10s} {'best lr':>8s} {'final loss':>12s}")
    for (task, base), (lr, score) in sorted(best.items()):
        print(f"{task:22s} {base:10s} {lr:8g} {score:12.5g}")


if __name__ == "__main__":
    main()
