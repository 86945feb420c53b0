"""Black-box methods on the COCO/BBOB suite: runtime ECDFs at equal evaluation budgets.

The field's benchmark for derivative-free optimisers (Hansen et al., "COCO: a platform for
comparing continuous optimizers in a black-box setting", 2021): the 24 noiseless ``bbob``
functions, each instance with its own random optimum in [-4, 4]^d and random rotations, search
space [-5, 5]^d. For every (function, instance) a method spends at most ``--budget`` x d
evaluations; a target ``f_opt + 10^k`` (k = 2, 1.8, ..., -8: COCO's 51 targets) is *solved* at the
first evaluation whose best-so-far value reaches it. The runtime ECDF of a method in dimension d is
the fraction of (function, instance, target) triples solved within a given number of evaluations
(divided by d, as COCO plots it). A method that stops early (its own convergence test) is
restarted with a new seed on the remaining budget, the same for every method.

Methods:

* ``cbo``: ``anyorder.cbo.minimize`` with its defaults, particles drawn in [-5, 5]^d;
* ``cbo-0.8``: the same with the defaults before issue 13 (``sigma=0.8``, ``alpha`` 10 annealed
  x1.005 per iteration), to show what the change of defaults does;
* ``cbxpy``: CBXpy's ``cbx.dynamics.CBO`` with its documented defaults (20 particles, isotropic
  noise, ``sigma`` 5.1, ``dt`` 0.01, ``alpha`` 1 annealed by its default scheduler), particles
  drawn in [-5, 5]^d;
* ``cma-es``: pycma's ``CMAEvolutionStrategy`` with its defaults (population 4 + 3 ln d), start
  uniform in [-4, 4]^d, step size 2 (COCO's customary setting);
* ``cbo-50``: ``anyorder.cbo.minimize`` with 50 particles instead of 200, otherwise defaults;
* ``zo-adam``: ``anyorder.zo.minimize(method="zo-adam")`` (SPSA with 8 directions a step,
  ``lr=0.1``: a local method, for scale), start uniform in [-4, 4]^d.

Reproduce (prints the table of BENCHMARKS.md, writes the JSON and the ECDF figure)::

    python benchmarks/bbob.py --dims 2 5 --instances 1 --budget 5000 \
        --json bbob.json --png benchmarks/bbob_ecdf.png

Needs ``pip install coco-experiment cma cbx`` (benchmark-only).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from anyorder.cbo import SwarmDivergedError
from anyorder.cbo import minimize as cbo_minimize
from anyorder.zo import minimize as zo_minimize

#: COCO's targets: f - f_opt <= 10^k for k = 2, 1.8, ..., -8 (51 values).
TARGETS = 10.0 ** np.linspace(2, -8, 51)


class Recorder:
    """Counts evaluations of one BBOB problem and the first evaluation that reaches each target
    (only within ``budget``)."""

    def __init__(self, problem: Any, fopt: float, budget: int) -> None:
        self.problem, self.fopt, self.budget = problem, fopt, budget
        self.evals = 0
        self.best = math.inf
        self.hit = np.full(TARGETS.shape, np.inf)

    @property
    def remaining(self) -> int:
        return self.budget - self.evals

    def batch(self, points: np.ndarray) -> np.ndarray:
        points = np.atleast_2d(np.asarray(points, dtype=np.float64))
        values = np.array([self.problem(p) for p in points])
        for v in values:
            self.evals += 1
            if v < self.best and self.evals <= self.budget:
                self.best = v
                new = (v - self.fopt <= TARGETS) & np.isinf(self.hit)
                self.hit[new] = self.evals
        return values


def optimum(problem: Any) -> float:
    """f_opt: the value at the optimum, which cocoex writes to a file on request."""
    here = os.getcwd()
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)
        try:
            problem._best_parameter("print")
            with open("._bbob_problem_best_parameter.txt") as f:
                xopt = np.array([float(v) for v in f.read().split()])
        finally:
            os.chdir(here)
    return float(problem(xopt))


def run_cbo(rec: Recorder, d: int, seed: int, **settings: Any) -> None:
    def f(x: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(rec.batch(x.numpy()))

    k = 0
    while rec.remaining > settings.get("n_particles", 200) + 1:
        try:
            cbo_minimize(f, bounds=[(-5.0, 5.0)] * d, maxfev=rec.remaining, max_iters=10**9,
                         seed=1000 * seed + k, **settings)  # fmt: skip
        except SwarmDivergedError:
            pass
        k += 1


def run_cbxpy(rec: Recorder, d: int, seed: int) -> None:
    from cbx.dynamics import CBO

    k, n = 0, 20  # CBXpy's default number of particles
    while rec.remaining > n:
        rng = np.random.default_rng(1000 * seed + k)
        x = rng.uniform(-5.0, 5.0, (1, n, d))
        dyn = CBO(rec.batch, f_dim="2D", x=x, max_it=rec.remaining // n, verbosity=0,
                  seed=1000 * seed + k)  # fmt: skip
        dyn.optimize()
        k += 1


def run_cma(rec: Recorder, d: int, seed: int) -> None:
    import cma

    k = 0
    while rec.remaining > 4 + 3 * math.log(d) + 1:
        rng = np.random.default_rng(1000 * seed + k)
        opts = {"maxfevals": rec.remaining, "verbose": -9, "seed": 1000 * seed + k + 1}
        es = cma.CMAEvolutionStrategy(rng.uniform(-4.0, 4.0, d), 2.0, opts)
        while not es.stop() and rec.remaining > 0:
            xs = es.ask()
            es.tell(xs, rec.batch(np.array(xs)).tolist())
        k += 1


def run_zo(rec: Recorder, d: int, seed: int) -> None:
    k = 0
    while rec.remaining > 18:
        x0 = np.random.default_rng(1000 * seed + k).uniform(-4.0, 4.0, d)
        zo_minimize(lambda x: float(rec.batch(x)[0]), x0, method="zo-adam",
                    maxfev=rec.remaining,
                    options={"lr": 0.1, "n_queries": 8, "seed": 1000 * seed + k})  # fmt: skip
        k += 1


METHODS: dict[str, Callable[[Recorder, int, int], None]] = {
    "cbo": run_cbo,
    "cbo-0.8": lambda rec, d, seed: run_cbo(
        rec, d, seed, sigma=0.8, alpha=10.0, alpha_factor=1.005
    ),
    "cbo-50": lambda rec, d, seed: run_cbo(rec, d, seed, n_particles=50),
    "cbxpy": run_cbxpy,
    "cma-es": run_cma,
    "zo-adam": run_zo,
}


def ecdf(hits: list[np.ndarray], d: int, grid: np.ndarray) -> np.ndarray:
    """Fraction of (problem, target) pairs solved within ``grid * d`` evaluations."""
    runtimes = np.concatenate(hits)
    return np.array([(runtimes <= g * d).mean() for g in grid])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dims", type=int, nargs="+", default=[2, 5])
    parser.add_argument("--instances", default="1", help="COCO instance indices, e.g. 1-3")
    parser.add_argument("--functions", default="1-24")
    parser.add_argument("--budget", type=int, default=5_000, help="evaluations per dimension")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--json")
    parser.add_argument("--png")
    args = parser.parse_args()
    import cocoex

    torch.set_num_threads(1)
    results: dict[str, Any] = {"budget_per_dim": args.budget, "instances": args.instances,
                               "functions": args.functions, "runs": []}  # fmt: skip
    for d in args.dims:
        suite = cocoex.Suite(
            "bbob", "",
            f"dimensions:{d} function_indices:{args.functions} instance_indices:{args.instances}",
        )  # fmt: skip
        for problem in suite:
            fopt = optimum(problem)
            for name in args.methods:
                rec = Recorder(problem, fopt, args.budget * d)
                t0 = time.perf_counter()
                METHODS[name](rec, d, problem.id_instance)
                results["runs"].append({
                    "dim": d, "function": problem.id_function, "instance": problem.id_instance,
                    "method": name, "hits": [None if math.isinf(h) else int(h) for h in rec.hit],
                    "best_minus_fopt": rec.best - fopt, "seconds": time.perf_counter() - t0,
                })  # fmt: skip
            print(f"d={d} f{problem.id_function:02d} i{problem.id_instance}: " + ", ".join(
                f"{r['method']} {r['best_minus_fopt']:.1e}" for r in results["runs"][-len(args.methods):]
            ), flush=True)  # fmt: skip
    grid = np.array([10, 30, 100, 300, 1000, 3000, 10000, args.budget])
    grid = np.unique(grid[grid <= args.budget])
    table = {}
    for d in args.dims:
        for name in args.methods:
            hits = [np.array([np.inf if h is None else h for h in r["hits"]], dtype=float)
                    for r in results["runs"] if r["dim"] == d and r["method"] == name]  # fmt: skip
            table[(d, name)] = ecdf(hits, d, grid)
    results["ecdf_grid_evals_per_dim"] = grid.tolist()
    results["ecdf"] = {f"{d}/{m}": v.tolist() for (d, m), v in table.items()}
    print("\nfraction of (function, instance, target) triples solved within B x d evaluations")
    print("| d | method | " + " | ".join(f"B = {g:g}" for g in grid) + " |")
    print("| --- | --- | " + " | ".join("---" for _ in grid) + " |")
    for (d, name), v in table.items():
        print(f"| {d} | {name} | " + " | ".join(f"{x:.2f}" for x in v) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    if args.png:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fine = np.unique(np.round(np.logspace(0, math.log10(args.budget), 60)))
        fig, axes = plt.subplots(1, len(args.dims), figsize=(4.2 * len(args.dims), 3.6),
                                 sharey=True, squeeze=False)  # fmt: skip
        for ax, d in zip(axes[0], args.dims):
            for name in args.methods:
                hits = [np.array([np.inf if h is None else h for h in r["hits"]], dtype=float)
                        for r in results["runs"] if r["dim"] == d and r["method"] == name]  # fmt: skip
                ax.step(fine, ecdf(hits, d, fine), where="post", label=name)
            ax.set_xscale("log")
            ax.set_xlabel("evaluations / dimension")
            ax.set_title(f"bbob f{args.functions}, d = {d}, instances {args.instances}")
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel("fraction of (function, target) pairs")
        axes[0][-1].legend(loc="upper left", fontsize=8)
        fig.tight_layout()
        fig.savefig(args.png, dpi=110)


if __name__ == "__main__":
    main()
