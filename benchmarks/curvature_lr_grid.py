"""Learning-rate grid for the curvature- and sharpness-aware optimizers, without the bench's
measurement overhead.

Usage: python benchmarks/curvature_lr_grid.py [--tasks digits-mlp,breast-cancer-logreg]
           [--optimizers sophia,adahessian,sam,lion,diffgrad,mfac,adamw] [--grid 1e-4,...,1]
           [--steps N] [--threads 1]

The same protocol as ``benchmarks/tune_lr.py`` (same seed, initial weights, data order and
number of steps as ``anyorder bench``'s quick suite, each optimizer built from its registration
with only ``lr`` overridden, driven by the runner's closures, the lr with the lowest final training objective wins, diverged runs
lose) but it trains directly instead of through the runner, skipping the memory probe and
timing, which made the full grid too slow on a shared 2-core machine.
"""

from __future__ import annotations

import argparse
import math

import torch

from anyorder.bench.registry import get_optimizer, get_task
from anyorder.bench.runner import _task_closure

GRID = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)


def final_objective(task_name: str, opt_name: str, lr: float, steps: int | None) -> float:
    """Train like the runner (seed 0) and return the task's final training objective."""
    task = get_task(task_name)()
    spec = get_optimizer(opt_name)
    model = task.init_model(0)
    opt = spec.build(model.parameters(), spec.hyperparameters(task_name, {"lr": lr}))
    batches = task.batches(torch.Generator().manual_seed(0))
    n = steps if steps is not None else type(task).default_steps["quick"]
    logits = "logits" in spec.requires  # Sophia-G: the closure returns (loss, logits)
    loss_fn = task.loss_and_logits if logits else task.loss
    for _ in range(n):
        loss = opt.step(_task_closure(task, model, next(batches), loss_fn, with_logits=logits))
        value = float(loss.detach()) if isinstance(loss, torch.Tensor) else float(loss)
        if not math.isfinite(value):
            return math.inf
    objective, _ = task.evaluate(model)
    return objective if math.isfinite(objective) else math.inf


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", default="digits-mlp,breast-cancer-logreg")
    parser.add_argument("--optimizers", default="sophia,adahessian,sam,lion,diffgrad,mfac,adamw")
    parser.add_argument("--grid", default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    grid = tuple(float(v) for v in args.grid.split(",")) if args.grid else GRID
    import warnings

    warnings.simplefilter("ignore")
    print(f"{'task':22s} {'optimizer':11s} {'best lr':>8s} {'final loss':>11s}   all")
    for task_name in args.tasks.split(","):
        for opt_name in args.optimizers.split(","):
            scores = {lr: final_objective(task_name, opt_name, lr, args.steps) for lr in grid}
            best = min(scores, key=lambda lr: scores[lr])
            everything = " ".join(f"{lr:g}:{s:.4g}" for lr, s in scores.items())
            print(
                f"{task_name:22s} {opt_name:11s} {best:8g} {scores[best]:11.5g}   {everything}",
                flush=True,
            )


if __name__ == "__main__":
    main()
