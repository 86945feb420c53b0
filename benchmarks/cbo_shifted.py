"""``anyorder.cbo.minimize`` on Rastrigin and Ackley with the minimiser away from the box's centre.

d = 10, particles drawn in [-3, 3]^10 (``bounds``), seeds 0..n-1; success: the final consensus
within 0.25 of the minimiser in every coordinate. Problems: the minimiser at the origin (the
centre of the start box), at (2, ..., 2), at a random point of [-2, 2]^10
(``anyorder.cbo.functions.shifted(..., rotate=False, seed=s)``) and at a random point with rotated
axes (``rotate=True``). Settings: the defaults, and the defaults of issue 6 (``sigma=0.8``, alpha
10 annealed x1.005 per iteration) that were tuned on the origin-centred problems, and the
candidates of the BBOB grid (100 particles, random batches of 10; BENCHMARKS.md).

    python benchmarks/cbo_shifted.py --seeds 20
    python benchmarks/cbo_shifted.py --seeds 20 --functions rastrigin \
        --settings defaults "100 particles, 2000 iterations"
"""

from __future__ import annotations

import argparse
import time

import torch

from anyorder.cbo import SwarmDivergedError, minimize
from anyorder.cbo.functions import FUNCTIONS, shifted

SETTINGS = {
    "defaults": {},
    "issue-6 defaults": {"sigma": 0.8, "alpha": 10.0, "alpha_factor": 1.005},
    "100 particles": {"n_particles": 100},
    "batch 10": {"batch_size": 10},
    "100 particles, batch 10": {"n_particles": 100, "batch_size": 10},
    "100 particles, 2000 iterations": {"n_particles": 100, "max_iters": 2000},
}


def problems(name: str, seed: int, d: int = 10):
    base = FUNCTIONS[name]
    two = torch.full((d,), 2.0, dtype=torch.float64)
    yield "origin", base, torch.zeros(d, dtype=torch.float64)
    yield "(2, ..., 2)", (lambda x: base(x - 2.0)), two
    for label, rotate in (("random shift", False), ("random shift + rotation", True)):
        f = shifted(name, d, rotate=rotate, seed=seed)
        yield label, f, f.minimiser()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--functions", nargs="+", default=["rastrigin", "ackley"],
                        choices=["rastrigin", "ackley"])  # fmt: skip
    parser.add_argument("--settings", nargs="+", default=[s for s in SETTINGS if "2000" not in s],
                        choices=list(SETTINGS))  # fmt: skip
    args = parser.parse_args()
    chosen = {k: SETTINGS[k] for k in args.settings}
    torch.set_num_threads(1)
    counts: dict[tuple[str, str, str], int] = {}
    t0 = time.perf_counter()
    for seed in range(args.seeds):
        for name in args.functions:
            for where, f, minimiser in problems(name, seed):
                for label, settings in chosen.items():
                    try:
                        r = minimize(f, bounds=[(-3.0, 3.0)] * 10, seed=seed, **settings)
                        ok = float((r.x - minimiser).abs().max()) < 0.25
                    except SwarmDivergedError:
                        ok = False
                    key = (name, where, label)
                    counts[key] = counts.get(key, 0) + ok
    print(f"{time.perf_counter() - t0:.0f} s")
    print("| function | minimiser | " + " | ".join(chosen) + " |")
    print("| --- | --- | " + " | ".join("---" for _ in chosen) + " |")
    for name in args.functions:
        for where in ("origin", "(2, ..., 2)", "random shift", "random shift + rotation"):
            cells = [f"{counts[(name, where, s)]}/{args.seeds}" for s in chosen]
            print(f"| {name} | {where} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
