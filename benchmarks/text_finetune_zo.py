"""Held-out accuracy of zeroth-order fine-tuning on ``text-finetune`` from a task-aligned start.

Usage:
  python benchmarks/text_finetune_zo.py --runs zo@3e-5,lora@1e-4,hybrid@3e-5/1e-3,adamw@3e-5 \
      --seeds 0,1,2 --steps 800 --eval-every 100 --threads 1 --out zo_runs.json

Each run starts from the task's model (``--head``: ``label-text``, the default, or ``probe`` or
``fresh``), with the bench's data order for its seed, and trains for a fixed number of steps
(``--steps``; per run with ``method@lr@steps``). Methods:

* ``zo``: :class:`anyorder.optim.ZOSGD` on every parameter (full model), eps ``--mu`` (1e-3);
* ``lora``: LoRA adapters (r 8, alpha 16, on the attention's query and value) injected with
  :func:`anyorder.integrations.add_lora`, ZOSGD on the adapters and the head, eps ``--lora-mu``
  (1e-2, MeZO's LoRA setting);
* ``hybrid``: :class:`anyorder.optim.HybridZO`, the encoder by ZO (lr), the head by its exact
  gradient (``hybrid@lr/head_lr``);
* ``adamw``: ``torch.optim.AdamW`` (weight decay 0.01) on every parameter, by backprop.

MeZO's evaluation policy (``anyorder.integrations.mezo``): constant learning rate; the model is
scored on the task's validation reviews (never trained on, never the held-out ones) every
``--eval-every`` steps and the best checkpoint is kept (:class:`KeepBest`); held-out accuracy
(all 973 reviews) is reported for the last and for the kept weights. The task's dropout is 0, so
eval-mode evaluations change nothing here. Step times printed here come from a loaded machine and
are not the figures quoted; ``benchmarks/zo_finetune_step.py`` times steps under a lock.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def build(method: str, task, seed: int, lr: float, head_lr: float | None, args):
    from anyorder.integrations import add_lora
    from anyorder.optim import ZOSGD, HybridZO

    model = task.init_model(seed)
    if method == "zo":
        return model, ZOSGD(model.parameters(), lr=lr, mu=args.mu, seed=seed)
    if method == "lora":
        params = add_lora(
            model, target_modules=["query", "value"], r=8, alpha=16, also_train=["head"], seed=seed
        )
        return model, ZOSGD(params, lr=lr, mu=args.lora_mu, seed=seed)
    if method == "hybrid":
        groups = [
            {"params": model.encoder.parameters()},
            {"params": model.head.parameters(), "order": 1, "lr": head_lr or lr},
        ]
        return model, HybridZO(groups, lr=lr, mu=args.mu, seed=seed)
    if method == "adamw":
        return model, torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    raise ValueError(f"unknown method {method!r}")


def run(spec: str, seed: int, task, args) -> dict:
    from anyorder.bench.tasks import text_finetune as tf
    from anyorder.core import make_closure
    from anyorder.integrations import KeepBest, eval_mode_closure

    parts = spec.split("@")
    method, rates = parts[0], parts[1]
    steps = int(parts[2]) if len(parts) > 2 else args.steps
    lr, _, head = rates.partition("/")
    lr, head_lr = float(lr), (float(head) if head else None)
    model, opt = build(method, task, seed, lr, head_lr, args)
    _, _, _, held_out = tf.load_reviews()
    val = task.validation_indices()
    keep = KeepBest(model)
    curve = [(0, task.accuracy(model, val))]
    keep.update(curve[0][1], 0)
    batches = task.batches(torch.Generator().manual_seed(seed))
    train_s = 0.0
    losses = []
    for step in range(1, steps + 1):
        batch = next(batches)
        t0 = time.perf_counter()
        if method == "adamw":
            opt.zero_grad()
            loss = task.loss(model, batch)
            loss.backward()
            opt.step()
            value = float(loss.detach())
        else:
            closure = make_closure(model, lambda m, b: task.loss(m, b), batch, forward=lambda m, b: m)
            value = opt.step(eval_mode_closure(model, closure))
        train_s += time.perf_counter() - t0
        losses.append(value)
        if step % args.eval_every == 0 or step == steps:
            acc = task.accuracy(model, val)
            curve.append((step, acc))
            keep.update(acc, step)
            print(f"  {spec} seed {seed} step {step}: validation {acc:.4f}, "
                  f"mean loss of the last {args.eval_every} {sum(losses[-args.eval_every:]) / len(losses[-args.eval_every:]):.4f}",
                  flush=True)
    last = task.accuracy(model, held_out)
    keep.restore()
    best = task.accuracy(model, held_out)
    return {
        "spec": spec, "method": method, "lr": lr, "head_lr": head_lr, "seed": seed,
        "steps": steps, "head": args.head, "validation_curve": curve,
        "best_step": keep.best_step, "best_validation": keep.best_score,
        "test_last": last, "test_best": best, "train_s_loaded": train_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", required=True)
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--head", default="label-text")
    parser.add_argument("--mu", type=float, default=1e-3)
    parser.add_argument("--lora-mu", type=float, default=1e-2)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from anyorder.bench.registry import get_task
    from anyorder.bench.tasks import text_finetune as tf
    from anyorder.core.files import atomic_write

    task = get_task("text-finetune")(head=args.head)
    _, _, _, held_out = tf.load_reviews()
    start = task.init_model(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; head {args.head}: "
          f"validation {task.accuracy(start, task.validation_indices()):.4f}, held-out "
          f"{task.accuracy(start, held_out):.4f} (all {len(held_out)}) before any step", flush=True)
    del start
    results = []
    for spec in args.runs.split(","):
        for seed in (int(s) for s in args.seeds.split(",")):
            out = run(spec, seed, task, args)
            results.append(out)
            print(json.dumps({k: v for k, v in out.items() if k != "validation_curve"}), flush=True)
            if args.out:
                atomic_write(Path(args.out), json.dumps(results, indent=1).encode())


if __name__ == "__main__":
    main()
