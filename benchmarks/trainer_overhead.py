"""ZOSGD through the Hugging Face Trainer (anyorder.integrations.ClosureTrainer) against the same
optimizer in a plain loop: step time and peak memory, side by side.

Usage: flock /work/bench.lock python benchmarks/trainer_overhead.py [--rounds 4] [--steps 8]
           [--batch 16] [--seq 64] [--threads 2]

Model: the bench's offline all-MiniLM-L6-v2 (anyorder.bench.tasks.text_finetune) as a
BertForSequenceClassification (dropout off, seeded head), Rotten Tomatoes snippets padded to
``--seq`` tokens, batch ``--batch``, ZOSGD(lr=1e-6, mu=1e-3) in both paths.

Time: ``--rounds`` interleaved rounds; each runs ``--steps`` plain-loop steps then ``--steps``
Trainer steps (a fresh ClosureTrainer over the same model, sequential sampling, no logging or
saving). A step's time is the wall time between consecutive step ends (the plain loop: slicing
the batch, building the closure, ``opt.step``; the Trainer: fetching and collating the batch,
``training_step``, its ``optimizer.step``/scheduler/``zero_grad``/callbacks), the first step of
each block excluded (iterator start). Reported: the median of each path and the ratio.

Memory: (1) peak tensor bytes above what was held before, during ``--steps`` steps of each path
and during one forward pass under no_grad (anyorder.bench.measure.peak_memory_bytes, torch's
profiler); (2) the peak resident set of separate subprocesses that import the same modules, load the same
model and data, then (after ``malloc_trim`` and resetting the kernel's high-water mark through
``/proc/self/clear_refs``, so that loading the weights does not hide the steps) run ``--steps``
steps of one path, or only the forward passes those steps make (``inference``); VmHWM is read
from ``/proc/self/status`` (Linux).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch


def load(seq: int, batch: int, n_batches: int):
    from transformers import AutoModelForSequenceClassification

    from anyorder.bench.tasks import text_finetune as tf

    ids, mask, labels = tf.load_tokenized(64)
    n = batch * n_batches
    ids, mask, labels = ids[:n, :seq].clone(), mask[:n, :seq].clone(), labels[:n].clone()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForSequenceClassification.from_pretrained(
            str(tf.model_dir()), num_labels=2, local_files_only=True,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        )  # fmt: skip
    model.train()
    rows = [{"input_ids": i, "attention_mask": m, "labels": y} for i, m, y in zip(ids, mask, labels)]
    return model, rows, (ids, mask, labels)


def plain_steps(model, opt, tensors, batch: int, steps: int, start: int = 0) -> list[float]:
    """Step ends (perf_counter) of ``steps`` plain-loop ZOSGD steps."""
    from anyorder.core import make_closure

    ids, mask, labels = tensors
    ends = []
    for k in range(start, start + steps):
        sl = slice(batch * k, batch * (k + 1))
        b = {"input_ids": ids[sl], "attention_mask": mask[sl], "labels": labels[sl]}
        opt.step(make_closure(model, lambda out, _b: out, b, forward=lambda m, x: m(**x).loss))
        ends.append(time.perf_counter())
    return ends


def trainer_for(model, opt, rows, batch: int, steps: int, out: str):
    from transformers import TrainerCallback, TrainingArguments

    from anyorder.integrations import ClosureTrainer

    class Ends(TrainerCallback):
        def __init__(self):
            self.ends = []

        def on_step_end(self, args, state, control, **kwargs):
            self.ends.append(time.perf_counter())

    args = TrainingArguments(
        output_dir=out, per_device_train_batch_size=batch, max_steps=steps, learning_rate=1e-6,
        lr_scheduler_type="constant", train_sampling_strategy="sequential", logging_strategy="no",
        save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, seed=0,
        dataloader_num_workers=0, max_grad_norm=0.0,
    )  # fmt: skip
    ends = Ends()
    trainer = ClosureTrainer(model=model, args=args, train_dataset=rows, optimizers=(opt, None),
                             callbacks=[ends])  # fmt: skip
    return trainer, ends


def intervals(ends: list[float]) -> list[float]:
    return [b - a for a, b in zip(ends, ends[1:])]


def child(mode: str, a) -> None:
    """One path in a fresh process; prints its peak resident set."""
    torch.set_num_threads(a.threads)
    import transformers  # noqa: F401  (every mode imports the same modules)

    from anyorder.integrations import ClosureTrainer  # noqa: F401
    from anyorder.optim import ZOSGD

    model, rows, tensors = load(a.seq, a.batch, a.steps)
    opt = ZOSGD(model.parameters(), lr=1e-6, mu=1e-3)
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # return the loader's freed pages
    setup = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with open("/proc/self/clear_refs", "w") as f:  # reset the high-water mark to the current RSS
        f.write("5")
    before = _status_kib("VmRSS")
    if mode == "plain":
        plain_steps(model, opt, tensors, a.batch, a.steps)
    elif mode == "trainer":
        trainer, _ = trainer_for(model, opt, rows, a.batch, a.steps, "/tmp/anyorder_trainer_overhead")
        trainer.train()
    else:  # inference: the forward passes a ZO step makes (two per step), under no_grad
        ids, mask, labels = tensors
        with torch.no_grad():
            for k in range(a.steps):
                sl = slice(a.batch * k, a.batch * (k + 1))
                for _ in range(2):
                    model(input_ids=ids[sl], attention_mask=mask[sl], labels=labels[sl])
    peak = _status_kib("VmHWM")
    print(json.dumps({"mode": mode, "peak_rss_kib": peak, "rss_before_kib": before,
                      "setup_maxrss_kib": setup}))  # fmt: skip


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--child", choices=["plain", "trainer", "inference"])
    a = p.parse_args()
    if a.child:
        child(a.child, a)
        return

    torch.set_num_threads(a.threads)
    from anyorder.bench.measure import peak_memory_bytes
    from anyorder.optim import ZOSGD

    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, load {os.getloadavg()}",
          flush=True)  # fmt: skip
    model, rows, tensors = load(a.seq, a.batch, a.steps)
    opt = ZOSGD(model.parameters(), lr=1e-6, mu=1e-3)
    plain_t, trainer_t = [], []
    for r in range(a.rounds):
        plain_t += intervals(plain_steps(model, opt, tensors, a.batch, a.steps))
        trainer, ends = trainer_for(model, opt, rows, a.batch, a.steps, "/tmp/anyorder_trainer_overhead")
        trainer.train()
        trainer_t += intervals(ends.ends)
        print(f"round {r}: plain {statistics.median(plain_t[-(a.steps - 1):]):.3f} s, trainer "
              f"{statistics.median(trainer_t[-(a.steps - 1):]):.3f} s, load {os.getloadavg()[0]:.1f}",
              flush=True)  # fmt: skip
    plain_med, trainer_med = statistics.median(plain_t), statistics.median(trainer_t)

    ids, mask, labels = tensors
    b0 = {"input_ids": ids[: a.batch], "attention_mask": mask[: a.batch], "labels": labels[: a.batch]}

    def forward():
        with torch.no_grad():
            model(**b0)

    inference_peak = peak_memory_bytes(forward)
    plain_peak = peak_memory_bytes(lambda: plain_steps(model, opt, tensors, a.batch, a.steps))
    trainer, _ = trainer_for(model, opt, rows, a.batch, a.steps, "/tmp/anyorder_trainer_overhead")
    trainer_peak = peak_memory_bytes(trainer.train)

    rss = {}
    for mode in ("plain", "trainer", "inference"):
        cmd = [sys.executable, __file__, "--child", mode, "--steps", str(a.steps),
               "--batch", str(a.batch), "--seq", str(a.seq), "--threads", str(a.threads)]  # fmt: skip
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        rss[mode] = json.loads(out.strip().splitlines()[-1])

    result = {
        "batch": a.batch, "seq": a.seq, "steps_per_block": a.steps, "rounds": a.rounds,
        "threads": a.threads, "load_end": os.getloadavg(),
        "plain_step_s": plain_med, "trainer_step_s": trainer_med,
        "time_ratio_trainer_to_plain": trainer_med / plain_med,
        "tensor_peak_bytes": {"inference_forward": inference_peak, "plain": plain_peak,
                              "trainer": trainer_peak},
        "tensor_peak_ratio_trainer_to_plain": trainer_peak / plain_peak,
        "peak_rss_kib": {m: rss[m]["peak_rss_kib"] for m in rss},
        "rss_before_steps_kib": {m: rss[m]["rss_before_kib"] for m in rss},
        "peak_rss_ratio_trainer_to_plain": rss["trainer"]["peak_rss_kib"] / rss["plain"]["peak_rss_kib"],
    }  # fmt: skip
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
