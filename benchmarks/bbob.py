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
* ``zo-adam``: ``anyorder.zo.minimize(method="zo-adam")``'s rule (SPSA with 8 directions a step,
  ``lr=0.1``: a local method, for scale), start uniform in [-4, 4]^d, its 16 evaluations a step
  in one call (:func:`run_zo`; checked against ``zo.minimize`` at start-up);
* ``--cbo NAME:key=value,...``: further ``cbo.minimize`` settings (the grid of BENCHMARKS.md).

A run stops once the last target (1e-8) is reached, as COCO's ``final_target_hit``: nothing is
left to measure. ``--jobs`` spreads the problems over processes; ``--merge`` reports JSON files
written by earlier runs (e.g. one per dimension, with their own budgets) as one table and figure.

Reproduce (BENCHMARKS.md; the table is printed, the runs go to the JSON)::

    python benchmarks/bbob.py --dims 2 5 10 --instances 1-3 --budget 5000 --jobs 2 \
        --methods cbo cbo-0.8 cbo-50 cbxpy cma-es zo-adam cbo-100 cbo-n20d cbo-s1.0 cbo-sd \
        cbo-a1.005 cbo-a1.02 cbo-b10 --cbo "cbo-100:n_particles=100" \
        "cbo-n20d:n_particles=20*d" "cbo-s1.0:sigma=1.0" "cbo-sd:sigma=min(1.3,2.9/sqrt(d))" \
        "cbo-a1.005:alpha_factor=1.005" "cbo-a1.02:alpha_factor=1.02" "cbo-b10:batch_size=10" \
        --json bbob_2_5_10.json
    python benchmarks/bbob.py --dims 20 --budget 2000 ... --json bbob_20.json   # same methods
    python benchmarks/bbob.py --merge bbob_2_5_10.json bbob_20.json --png benchmarks/bbob_ecdf.png

Needs ``pip install coco-experiment cma cbx`` (benchmark-only).
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import multiprocessing
import os
import re
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


class Solved(Exception):
    """Raised by :meth:`Recorder.batch` once the last target is reached: nothing is left to
    measure (COCO stops a run there too, ``problem.final_target_hit``)."""


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
        counts = self.evals + 1 + np.arange(len(values))
        inside = counts <= self.budget
        self.evals += len(values)
        if inside.any() and values[inside].min() < self.best:
            running = np.minimum.accumulate(np.minimum(values[inside], self.best))
            self.best = float(running[-1])
            first = np.searchsorted(-(running - self.fopt), -TARGETS)  # first index <= target
            first = np.where(first < len(running), counts[np.minimum(first, len(running) - 1)],
                             np.inf)  # fmt: skip
            self.hit = np.minimum(self.hit, first)
            if math.isfinite(self.hit[-1]):
                raise Solved
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


ZO_OPTIONS = {"lr": 0.1, "n_queries": 8}


def run_zo(rec: Recorder, d: int, seed: int) -> None:
    """``zo.minimize(method="zo-adam")`` with restarts, its 16 evaluations a step in one batch.

    The rule of :class:`anyorder.optim.ZOAdam` with ``ZO_OPTIONS`` (two-point SPSA over 8
    Rademacher directions keyed by ``(seed, step, query)`` as :mod:`anyorder.core.rng` draws them,
    then Adam), evaluated in the same order (+mu z_0, -mu z_0, +mu z_1, ...) but 16 points per call
    of the problem instead of one: ``zo.minimize`` spends ~0.2 ms of bookkeeping per evaluation,
    which made this method the slowest of the benchmark. :func:`check_zo` runs both on a smooth
    function and asserts the same iterates (to rounding: ``zo.minimize`` moves the weights in
    place, w + mu z - 2 mu z + mu z).
    """
    k = 0
    while rec.remaining > 2 * ZO_OPTIONS["n_queries"] + 1:
        x0 = np.random.default_rng(1000 * seed + k).uniform(-4.0, 4.0, d)
        zo_adam_batched(rec.batch, x0, rec.remaining, seed=1000 * seed + k)
        k += 1


def zo_adam_batched(f: Callable[[np.ndarray], np.ndarray], x0: np.ndarray, maxfev: int, *,
                    seed: int, mu: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                    eps: float = 1e-8, callback: Callable[[np.ndarray], None] | None = None,
                    ) -> np.ndarray:  # fmt: skip
    from anyorder.functional import adam_

    q = ZO_OPTIONS["n_queries"]
    x = torch.as_tensor(np.array(x0, dtype=np.float64))
    m, v = torch.zeros_like(x), torch.zeros_like(x)
    signs = torch.tensor([1.0, -1.0], dtype=torch.float64).repeat(q)[:, None]
    nfev, step = 0, 0
    while nfev + 2 * q + 1 <= maxfev:
        z = rademacher_queries(seed, step, q, x.numel())
        values = torch.as_tensor(f((x + mu * signs * z.repeat_interleave(2, 0)).numpy()))
        nfev += 2 * q
        step += 1
        projected = (values[0::2] - values[1::2]) / (2 * mu)
        if not bool(torch.isfinite(projected).all()):
            break
        adam_([x], [projected @ z / q], [m], [v], step=step, lr=ZO_OPTIONS["lr"],
              beta1=betas[0], beta2=betas[1], eps=eps)  # fmt: skip
        if callback is not None:
            callback(x.numpy().copy())
    f(x.numpy()[None])
    return x.numpy()


def rademacher_queries(seed: int, step: int, n_queries: int, d: int) -> torch.Tensor:
    """The ``(n_queries, d)`` Rademacher directions ``anyorder.core.rng.direction(d, seed, step,
    q, 0, distribution="rademacher")``, q = 0..n_queries-1, in one computation for d <= 64 (one
    SplitMix64 word each: the per-call overhead of ``direction`` was 80% of a step)."""
    from anyorder.core import rng

    if d > 64:
        return torch.stack([rng.direction((d,), seed, step, j, 0, distribution="rademacher",
                                          dtype=torch.float64) for j in range(n_queries)])  # fmt: skip
    keys = [rng._int64((rng._prefix(seed, step, j, 0) + rng._GAMMA) & rng._MASK64)
            for j in range(n_queries)]  # fmt: skip
    words = rng._mix_(torch.tensor(keys, dtype=torch.int64))
    return rng._signs(words).view(n_queries, 64)[:, :d].to(torch.float64)


def check_zo(d: int = 10, steps: int = 40) -> float:
    """Largest difference between the iterates of :func:`zo_adam_batched` and
    ``zo.minimize(method="zo-adam")`` on a rotated ellipsoid (raises if above 1e-9)."""
    rng = np.random.default_rng(0)
    rot = np.linalg.qr(rng.normal(size=(d, d)))[0]
    scale = 10.0 ** np.linspace(0, 2, d)

    def one(x: np.ndarray) -> float:
        return float(scale @ (rot @ (x - 1.0)) ** 2)

    x0 = rng.uniform(-4, 4, d)
    maxfev = steps * 2 * ZO_OPTIONS["n_queries"] + 1
    ref: list[np.ndarray] = []
    zo_minimize(one, x0, method="zo-adam", maxfev=maxfev, callback=ref.append,
                options={**ZO_OPTIONS, "seed": 7})  # fmt: skip
    got: list[np.ndarray] = []
    zo_adam_batched(lambda xs: np.array([one(p) for p in xs]), x0, maxfev, seed=7,
                    callback=got.append)  # fmt: skip
    gap = max(float(np.abs(a - b).max()) for a, b in zip(ref, got))
    if len(ref) != len(got) or len(ref) != steps or not gap < 1e-9:
        raise AssertionError(f"batched zo-adam departs from zo.minimize: {gap:g}")
    return gap


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


def parse_variant(text: str) -> tuple[str, dict[str, Any]]:
    """``NAME:key=value,key=value`` -> a CBO variant (values read as Python literals; ``sigma``
    may be an expression in the dimension ``d``, e.g. ``1.3*sqrt(5/d)``; ``seed_offset=k`` runs
    the same settings with other seeds)."""
    name, _, rest = text.partition(":")
    settings: dict[str, Any] = {}
    for item in filter(None, re.split(r",(?=\w+=)", rest)):
        key, _, value = item.partition("=")
        settings[key] = value if "d" in value else ast.literal_eval(value)
    return name, settings


def cbo_variant(settings: dict[str, Any]) -> Callable[[Recorder, int, int], None]:
    def run(rec: Recorder, d: int, seed: int) -> None:
        per_d = {k: eval(v, {"sqrt": math.sqrt, "d": d}) if isinstance(v, str) else v
                 for k, v in settings.items()}  # fmt: skip
        offset = per_d.pop("seed_offset", 0)  # other seeds: the spread between repeats
        run_cbo(rec, d, seed + 100 * offset, **per_d)

    return run


def ecdf(hits: list[np.ndarray], d: int, grid: np.ndarray) -> np.ndarray:
    """Fraction of (problem, target) pairs solved within ``grid * d`` evaluations."""
    runtimes = np.concatenate(hits)
    return np.array([(runtimes <= g * d).mean() for g in grid])


def run_problem(task: tuple[int, int, int, int, list[str], list[str]]) -> list[dict[str, Any]]:
    """Every method on one (dimension, function, instance): a list of run records."""
    import cocoex

    d, fid, iid, budget, names, variants = task
    torch.set_num_threads(1)
    methods = dict(METHODS)
    for text in variants:
        name, settings = parse_variant(text)
        methods[name] = cbo_variant(settings)
    suite = cocoex.Suite("bbob", "", f"dimensions:{d} function_indices:{fid} instance_indices:{iid}")
    problem = suite[0]
    fopt = optimum(problem)
    runs = []
    for name in names:
        rec = Recorder(problem, fopt, budget * d)
        t0 = time.perf_counter()
        try:
            methods[name](rec, d, problem.id_instance)
        except Solved:
            pass
        runs.append({
            "dim": d, "function": fid, "instance": iid, "method": name,
            "hits": [None if math.isinf(h) else int(h) for h in rec.hit],
            "best_minus_fopt": rec.best - fopt, "evals": min(rec.evals, rec.budget),
            "seconds": time.perf_counter() - t0,
        })  # fmt: skip
    print(f"d={d} f{fid:02d} i{iid}: " + ", ".join(
        f"{r['method']} {r['best_minus_fopt']:.1e} ({r['seconds']:.1f} s)" for r in runs
    ), flush=True)  # fmt: skip
    return runs


def indices(text: str) -> list[int]:
    out: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out.extend(range(int(lo), int(hi or lo) + 1))
    return out


def report(results: dict[str, Any], png: str | None, plot: list[str] | None = None) -> None:
    runs = results["runs"]
    dims = sorted({r["dim"] for r in runs})
    names = list(dict.fromkeys(r["method"] for r in runs))
    budget = max(results["budget_per_dim"].values())
    grid = np.array([10, 30, 100, 300, 1000, 3000, 10000, *results["budget_per_dim"].values()])
    grid = np.unique(grid[grid <= budget])

    def hits_of(d: int, name: str) -> list[np.ndarray]:
        return [np.array([np.inf if h is None else h for h in r["hits"]], dtype=float)
                for r in runs if r["dim"] == d and r["method"] == name]  # fmt: skip

    print("\nfraction of (function, instance, target) triples solved within B x d evaluations")
    print("| d | method | problems | " + " | ".join(f"B = {g:g}" for g in grid) + " |")
    print("| --- | --- | --- | " + " | ".join("---" for _ in grid) + " |")
    results["ecdf_grid_evals_per_dim"] = grid.tolist()
    results["ecdf"] = {}
    for d in dims:
        for name in names:
            hits = hits_of(d, name)
            if not hits:
                continue
            v = ecdf(hits, d, grid)
            v[grid > results["budget_per_dim"][str(d)]] = np.nan
            results["ecdf"][f"{d}/{name}"] = v.tolist()
            print(f"| {d} | {name} | {len(hits)} | " + " | ".join(
                "" if math.isnan(x) else f"{x:.2f}" for x in v) + " |")  # fmt: skip
    if png:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, len(dims), figsize=(4.2 * len(dims), 3.6), sharey=True,
                                 squeeze=False)  # fmt: skip
        for ax, d in zip(axes[0], dims):
            b = results["budget_per_dim"][str(d)]
            fine = np.unique(np.round(np.logspace(0, math.log10(b), 60)))
            instances = sorted({r["instance"] for r in runs if r["dim"] == d})
            for name in plot or names:
                if hits_of(d, name):
                    ax.step(fine, ecdf(hits_of(d, name), d, fine), where="post", label=name)
            ax.set_xscale("log")
            ax.set_xlabel("evaluations / dimension")
            ax.set_title(f"bbob f1-24, d = {d}, instances {instances[0]}-{instances[-1]}",
                         fontsize=9)  # fmt: skip
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel("fraction of (function, target) pairs")
        axes[0][-1].legend(loc="upper left", fontsize=7)
        fig.tight_layout()
        fig.savefig(png, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dims", type=int, nargs="+", default=[2, 5])
    parser.add_argument("--instances", default="1", help="COCO instance indices, e.g. 1-3")
    parser.add_argument("--functions", default="1-24")
    parser.add_argument("--budget", type=int, default=5_000, help="evaluations per dimension")
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--cbo", nargs="*", default=[], metavar="NAME:key=value,...",
                        help="extra cbo.minimize variants, e.g. cbo-s1:sigma=1.0,n_particles=50")
    parser.add_argument("--jobs", type=int, default=1, help="processes (one problem each)")
    parser.add_argument("--json", help="write the runs here")
    parser.add_argument("--merge", nargs="+", help="only report: combine these JSON files")
    parser.add_argument("--png")
    parser.add_argument("--plot", nargs="+", help="methods drawn in the figure (default: all)")
    args = parser.parse_args()
    if args.merge:
        results: dict[str, Any] = {"budget_per_dim": {}, "runs": []}
        for path in args.merge:
            with open(path) as f:
                part = json.load(f)
            results["budget_per_dim"].update(part["budget_per_dim"])
            results["runs"].extend(part["runs"])
        report(results, args.png, args.plot)
        return
    variants = [parse_variant(t)[0] for t in args.cbo]
    unknown = set(args.methods) - set(METHODS) - set(variants)
    if unknown:
        parser.error(f"unknown methods {sorted(unknown)}; choose from {list(METHODS)} or --cbo")
    torch.set_num_threads(1)
    if "zo-adam" in args.methods:
        print(f"batched zo-adam against zo.minimize: largest difference {check_zo():.1e}")
    tasks = [(d, fid, iid, args.budget, args.methods, args.cbo) for d in args.dims
             for fid in indices(args.functions) for iid in indices(args.instances)]  # fmt: skip
    t0 = time.perf_counter()
    if args.jobs > 1:
        with multiprocessing.get_context("spawn").Pool(args.jobs) as pool:
            parts = pool.map(run_problem, tasks, chunksize=1)
    else:
        parts = [run_problem(t) for t in tasks]
    results = {"budget_per_dim": {str(d): args.budget for d in args.dims},
               "instances": args.instances, "functions": args.functions,
               "seconds": time.perf_counter() - t0,
               "runs": [r for part in parts for r in part]}  # fmt: skip
    print(f"{results['seconds']:.0f} s")
    report(results, args.png, args.plot)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
