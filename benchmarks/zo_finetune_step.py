"""Step time and peak memory of full-model ZO, LoRA-ZO, hybrid ZO and AdamW on ``text-finetune``.

Usage: flock /work/bench.lock python benchmarks/zo_finetune_step.py [--threads 2] [--rounds 12]

all-MiniLM-L6-v2 with the task's label-text head, the task's own batches (16 reviews, padding
trimmed). Methods, each on its own copy of the model:

* ``forward``: one no-grad forward (the inference reference);
* ``zo``: :class:`anyorder.optim.ZOSGD` on all 22.6M parameters;
* ``lora``: ZOSGD on LoRA adapters (r 8 on query and value, :func:`anyorder.integrations.add_lora`)
  and the head;
* ``hybrid``: :class:`anyorder.optim.HybridZO`, ZO on the encoder, the head's exact gradient;
* ``adamw``: one backprop step of ``torch.optim.AdamW``.

Timing: interleaved round-robin, the same batch for every method within a round; the figure is
the median over rounds of (method time / forward time of that round), and the median
milliseconds. Memory: peak tensor bytes of one step above what was allocated before it
(``anyorder.bench.measure.peak_memory_bytes``, the profiler's count on the CPU) on the widest of
the batches, against the forward's peak on the same batch. Prints ``uptime``'s load and the thread
count; the steps that fit in 10 minutes follow from the median milliseconds.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--methods", default="forward,zo,lora,hybrid,adamw")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from anyorder.bench.measure import peak_memory_bytes
    from anyorder.bench.registry import get_task
    from anyorder.core import make_closure
    from anyorder.integrations import add_lora
    from anyorder.optim import ZOSGD, HybridZO

    task = get_task("text-finetune")()
    stream = task.batches(torch.Generator().manual_seed(0))
    batches = [next(stream) for _ in range(8)]
    widest = max(batches, key=lambda b: b[0].shape[1])

    def closure_for(model, batch):
        return make_closure(model, lambda m, b: task.loss(m, b), batch, forward=lambda m, b: m)

    steps, counts = {}, {}
    for method in args.methods.split(","):
        model = task.init_model(0)
        if method == "forward":
            def step(batch, model=model):
                with torch.no_grad():
                    task.loss(model, batch)
        elif method == "zo":
            opt = ZOSGD(model.parameters(), lr=3e-5, mu=1e-3, seed=0)
            def step(batch, model=model, opt=opt):
                opt.step(closure_for(model, batch))
        elif method == "lora":
            params = add_lora(model, target_modules=["query", "value"], also_train=["head"])
            opt = ZOSGD(params, lr=1e-3, mu=1e-2, seed=0)
            def step(batch, model=model, opt=opt):
                opt.step(closure_for(model, batch))
        elif method == "hybrid":
            groups = [
                {"params": model.encoder.parameters()},
                {"params": model.head.parameters(), "order": 1, "lr": 3e-3},
            ]
            opt = HybridZO(groups, lr=3e-5, mu=1e-3, seed=0)
            def step(batch, model=model, opt=opt):
                opt.step(closure_for(model, batch))
        elif method == "adamw":
            opt = torch.optim.AdamW(model.parameters(), lr=3e-5, weight_decay=0.01, foreach=True)
            def step(batch, model=model, opt=opt):
                opt.zero_grad()
                task.loss(model, batch).backward()
                opt.step()
        else:
            raise SystemExit(f"unknown method {method!r}")
        steps[method] = step
        counts[method] = sum(p.numel() for p in model.parameters() if p.requires_grad)
        step(batches[0])  # warm-up (lazy state, the native kernel's first compile)
        step(batches[1])

    memory = {name: peak_memory_bytes(lambda s=s: s(widest)) for name, s in steps.items()}
    times = {name: [] for name in steps}
    for r in range(args.rounds):
        batch = batches[r % len(batches)]
        for name, s in steps.items():
            t0 = time.perf_counter()
            s(batch)
            times[name].append(time.perf_counter() - t0)
    load = os.getloadavg()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.rounds} rounds; "
        f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
    )
    ref = times.get("forward")
    print(
        "| method | trainable | ms/step (median) | / forward | steps in 10 min | peak memory "
        "| / inference |"
    )
    print("|---|---|---|---|---|---|---|")
    for name in steps:
        ms = 1e3 * statistics.median(times[name])
        ratio = statistics.median(a / b for a, b in zip(times[name], ref)) if ref else float("nan")
        mem = memory[name] / 2**20
        mem_ratio = memory[name] / memory["forward"] if "forward" in memory else float("nan")
        print(
            f"| {name} | {counts[name] / 1e6:.3f}M | {ms:.0f} | {ratio:.2f} | {int(600e3 / ms)} | {mem:.1f} MiB | {mem_ratio:.2f} |"
        )


if __name__ == "__main__":
    main()
