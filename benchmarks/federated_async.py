"""Asynchronous aggregation under skewed client speeds, at an equal simulated time budget.

Digits, Dirichlet(0.3) over 20 clients, 64-64-10 MLP, 10 local SGD steps, batch 32, lr 0.1;
client i needs tau_i = 1 - 0.8 i / 19 time units per update (the fastest 5x faster than the
slowest; the paper's reference code's "F-80" scenario). Within T time units:
synchronous FedAvg does T / max(tau) rounds (every round waits for the slowest client);
FedFix(Delta) aggregates every Delta; FedBuff(c) whenever c updates are buffered.

    python benchmarks/federated_async.py --time 30 --seeds 0,1,2,3,4 --out async.png
"""

from __future__ import annotations

import argparse
import statistics

import torch
from torch import nn

from anyorder.bench.federated import build_model, load_task
from anyorder.federated import FedAvg
from anyorder.federated.asynchronous import AsyncSimulator, FedBuff, FedFix, skewed_times
from anyorder.federated.partition import client_datasets, dirichlet
from anyorder.federated.simulator import Simulator, accuracy_evaluator


def run(seed: int, horizon: float, alpha: float, slower: float):
    x_tr, y_tr, x_te, y_te = load_task("digits")
    clients = client_datasets((x_tr, y_tr), dirichlet(y_tr, 20, alpha, torch.Generator().manual_seed(seed)))
    model = build_model(64, 64, 10, seed)
    ev = accuracy_evaluator(model, x_te, y_te)
    loss = nn.functional.cross_entropy
    times = skewed_times(20, slower)
    alg = FedAvg(lr=0.1)
    out = {}
    sync = Simulator(alg, model, loss, clients, seed=seed, evaluate=ev)
    rounds = int(horizon / float(times.max()))
    sync.run(rounds)
    out["fedavg (sync)"] = [((t + 1) * float(times.max()), r.metrics["accuracy"], 20, 0.0)
                            for t, r in enumerate(sync.history)]  # fmt: skip
    for name, rule in (("fedfix(0.5)", FedFix(0.5)), ("fedfix(0.25)", FedFix(0.25)),
                       ("fedbuff(5)", FedBuff(5)), ("fedbuff(10)", FedBuff(10))):  # fmt: skip
        sim = AsyncSimulator(alg, rule, model, loss, clients, times, seed=seed, evaluate=ev)
        while not sim.history or sim.history[-1].extra["sim_time"] < horizon:
            sim.step()
        out[name] = [(r.extra["sim_time"], r.metrics["accuracy"], len(r.participants),
                      r.extra["mean_staleness"]) for r in sim.history]  # fmt: skip
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--time", type=float, default=30.0)
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--alpha", type=float, default=0.3)
    ap.add_argument("--slower", type=float, default=80.0)
    ap.add_argument("--out", default=None, help="PNG of accuracy against simulated time")
    args = ap.parse_args()
    torch.set_num_threads(1)
    seeds = [int(s) for s in args.seeds.split(",")]
    results = [run(s, args.time, args.alpha, args.slower) for s in seeds]
    print("| method | aggregations | client updates | mean staleness | acc % at T/3 | acc % at T (mean ± sd) |")
    print("|---|---|---|---|---|---|")
    for name in results[0]:
        def at(curve, t):
            best = [a for (s, a, _, _) in curve if s <= t + 1e-9]
            return best[-1] if best else float("nan")
        fin = [100 * at(r[name], args.time) for r in results]
        third = [100 * at(r[name], args.time / 3) for r in results]
        aggs = statistics.fmean(sum(1 for p in r[name] if p[0] <= args.time + 1e-9) for r in results)
        upd = statistics.fmean(sum(p[2] for p in r[name] if p[0] <= args.time + 1e-9) for r in results)
        stale = statistics.fmean(statistics.fmean(p[3] for p in r[name]) for r in results)
        sd = statistics.stdev(fin) if len(fin) > 1 else 0.0
        print(f"| {name} | {aggs:.0f} | {upd:.0f} | {stale:.2f} | {statistics.fmean(third):.1f} | "
              f"{statistics.fmean(fin):.1f} ± {sd:.1f} |")
    if args.out:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.2), constrained_layout=True)
        for name in results[0]:
            grid = torch.linspace(0, args.time, 121)
            curves = []
            for r in results:
                pts = r[name]
                curves.append([next((a for s, a, _, _ in reversed(pts) if s <= g + 1e-9), float("nan")) for g in grid.tolist()])
            c = torch.tensor(curves) * 100
            ax.plot(grid, c.nanmean(0), label=name)
        ax.set_xlabel("simulated time (slowest client: 1 unit per update)")
        ax.set_ylabel("test accuracy % (mean over seeds)")
        ax.set_ylim(50, 100)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.savefig(args.out, dpi=90)


if __name__ == "__main__":
    main()
