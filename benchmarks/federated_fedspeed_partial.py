"""FedSpeed at partial participation: the reference code's server rule (mean of the arrived x_K
plus the mean of h over ALL clients, what anyorder.federated.FedSpeed does) against the paper's
Algorithm 1 as written (mean over the arrived clients of x̂ᵢ = x_K + hᵢ, so hᵢ of absent
clients is not used). Digits, Dirichlet(0.3), 20 clients, 10 local steps, batch 32, lr 0.1,
rho 0.05, lambda 10, 60 rounds.

    python benchmarks/federated_fedspeed_partial.py --participation 0.5 --seeds 0,1,2,3,4
"""

from __future__ import annotations

import argparse
import statistics
from dataclasses import dataclass

import torch
from torch import nn

from anyorder.bench.federated import build_model, load_task
from anyorder.federated import FedSpeed, Simulator, accuracy_evaluator
from anyorder.federated.partition import client_datasets, dirichlet


@dataclass
class FedSpeedPaper(FedSpeed):
    """The server averages x̂ᵢ = x_K + hᵢ over the arrived clients only (the client uploads
    x_K − xᵗ + hᵢ)."""

    name = "fedspeed-paper"

    def client_update(self, down, client, ctx):
        up, state = super().client_update(down, client, ctx)
        return {**up, "delta": up["delta"] + state["h"]}, state

    def aggregate(self, server, ups, num_clients):
        if not ups:
            return dict(server)
        mean = torch.stack([u["delta"] for _, u in ups]).mean(0)
        return {**server, "model": server["model"] + mean}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--participation", type=float, default=0.5)
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--rounds", type=int, default=60)
    args = ap.parse_args()
    torch.set_num_threads(1)
    x_tr, y_tr, x_te, y_te = load_task("digits")
    finals: dict[str, list[float]] = {}
    worst: dict[str, list[float]] = {}
    for seed in [int(s) for s in args.seeds.split(",")]:
        gen = torch.Generator().manual_seed(seed)
        clients = client_datasets((x_tr, y_tr), dirichlet(y_tr, 20, 0.3, gen))
        model = build_model(64, 64, 10, seed)
        ev = accuracy_evaluator(model, x_te, y_te)
        for alg in (FedSpeed(lr=0.1, rho=0.05, lam=10.0), FedSpeedPaper(lr=0.1, rho=0.05, lam=10.0)):
            sim = Simulator(alg, model, nn.functional.cross_entropy, clients, seed=seed,
                            participation=args.participation, evaluate=ev)  # fmt: skip
            acc = [100 * r.metrics["accuracy"] for r in sim.run(args.rounds)]
            finals.setdefault(alg.name, []).append(acc[-1])
            # instability: the largest drop between consecutive rounds after round 20
            worst.setdefault(alg.name, []).append(max(a - b for a, b in zip(acc[19:], acc[20:])))
    print("| server rule | final acc % (mean ± sd) | min-max | largest round-to-round drop after round 20 (mean over seeds) |")
    print("|---|---|---|---|")
    for name, v in finals.items():
        print(f"| {name} | {statistics.fmean(v):.1f} ± {statistics.stdev(v):.1f} | "
              f"{min(v):.1f}-{max(v):.1f} | {statistics.fmean(worst[name]):.1f} |")


if __name__ == "__main__":
    main()
