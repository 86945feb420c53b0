"""The in-process simulator's cost over the clients' own work, measured two ways, side by side:

1. inside the simulator: (round wall time - time inside the clients' rules) / client time;
2. against a plain-torch FedAvg round written here (copy the global weights into the model,
   SGD steps on the same batches, size-weighted average of the client models), interleaved
   round by round with the simulator's FedAvg round on the same clients; the models agree.

Digits, Dirichlet(0.3) over 20 clients, 64-64-10 MLP, 10 local steps, batch 32, one torch thread.
Run under ``flock /work/bench.lock`` on a shared machine:

    flock /work/bench.lock python benchmarks/federated_overhead.py --rounds 30
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from torch import nn

from anyorder.bench.federated import build_model, load_task
from anyorder.federated import FedAvg, client_generator, flatten
from anyorder.federated.fedspeed import FedSpeed
from anyorder.federated.partition import client_datasets, dirichlet
from anyorder.federated.simulator import Simulator


def plain_round(model, opt_lr, clients, x, seed, t, steps, bs):
    """What a user would write without a framework (same batches as ClientContext.batches)."""
    params = list(model.parameters())
    total = torch.zeros_like(x)
    count = 0
    for i, data in enumerate(clients):
        with torch.no_grad():
            torch.nn.utils.vector_to_parameters(x.clone(), params)
        opt = torch.optim.SGD(params, lr=opt_lr)
        gen = client_generator(seed, t, i)
        n = len(data)
        size = min(bs, n)
        order = torch.randperm(n, generator=gen)
        pos = 0
        for _ in range(steps):
            if pos + size > n:
                order, pos = torch.randperm(n, generator=gen), 0
            idx = order[pos : pos + size]
            pos += size
            opt.zero_grad()
            nn.functional.cross_entropy(model(data.inputs[idx]), data.targets[idx]).backward()
            opt.step()
        total += n * torch.nn.utils.parameters_to_vector(params).detach()
        count += n
    return total / count


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    x_tr, y_tr, _, _ = load_task("digits")
    clients = client_datasets((x_tr, y_tr), dirichlet(y_tr, 20, 0.3, torch.Generator().manual_seed(0)))
    model = build_model(64, 64, 10, 0)
    sims = {
        "fedavg": Simulator(FedAvg(lr=0.1), model, nn.functional.cross_entropy, clients),
        "fedspeed": Simulator(FedSpeed(lr=0.1), model, nn.functional.cross_entropy, clients),
    }
    work = build_model(64, 64, 10, 0)
    x = flatten(list(model.parameters()))
    sims["fedavg"].step(), sims["fedspeed"].step()  # warm-up
    x = plain_round(work, 0.1, clients, x, 0, 0, 10, 32)
    plain_t, sim_t = [], []
    for t in range(1, args.rounds + 1):
        t0 = time.perf_counter()
        x = plain_round(work, 0.1, clients, x, 0, t, 10, 32)
        plain_t.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        sims["fedavg"].step()
        sim_t.append(time.perf_counter() - t0)
        sims["fedspeed"].step()
    diff = float((x - sims["fedavg"].global_model()).abs().max())
    print(f"load: {os.getloadavg()}, torch threads {torch.get_num_threads()}")
    print(f"plain-torch FedAvg vs simulator models: max |diff| = {diff:.2e}")
    med_plain, med_sim = statistics.median(plain_t), statistics.median(sim_t)
    print(f"round, median over {args.rounds}: plain torch {1e3 * med_plain:.1f} ms, "
          f"simulator {1e3 * med_sim:.1f} ms, ratio {med_sim / med_plain:.3f}")
    ratios = [s / p for s, p in zip(sim_t, plain_t)]
    print(f"per-round ratio simulator/plain: median {statistics.median(ratios):.3f}, "
          f"quartiles {statistics.quantiles(ratios, n=4)[0]:.3f}-{statistics.quantiles(ratios, n=4)[2]:.3f}")
    for name, sim in sims.items():
        h = sim.history[1:]
        over = [(r.wall_time_s - r.client_time_s) / r.client_time_s for r in h]
        print(f"{name}: engine overhead over client time per round: median "
              f"{100 * statistics.median(over):.2f}%, max {100 * max(over):.2f}%; "
              f"round {1e3 * statistics.median(r.wall_time_s for r in h):.1f} ms")


if __name__ == "__main__":
    main()
