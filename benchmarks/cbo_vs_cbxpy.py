"""anyorder.cbo.minimize against CBXpy (and CMA-ES) on Rastrigin and Ackley, side by side.

For every function, dimension and seed, all methods start from the same particles drawn uniformly
in [-3, 3]^d and run the same number of particles and iterations. Success: the final consensus
within 0.25 of the global minimiser (the origin) in the sup-norm. Methods:

* ``anyorder``: ``anyorder.cbo.minimize`` with its defaults of issue 6, pinned here (anisotropic
  noise, random batches of 5 interacting particles, dt 0.1, sigma 0.8, alpha 10 annealed x1.005
  per step; issue 13 changed the defaults, see ``benchmarks/bbob.py``);
* ``cbxpy-default``: ``cbx.dynamics.CBO`` with its documented defaults (isotropic noise, dt 0.01,
  sigma 5.1, alpha 1 annealed x1.05 per step by its default scheduler, all particles interacting);
* ``cbxpy-aniso``: CBXpy with our noise, dt, sigma and alpha schedule but no random batches
  (CBXpy's ``batch_args`` draw one batch per step that all particles follow, another algorithm);
* ``cma-es``: CMA-ES (pycma, the implementation nevergrad's ``CMA`` wraps, driven directly with
  one vectorised evaluation per generation because nevergrad's per-candidate ask/tell costs about
  2.7 ms per evaluation here), population = particles, the same evaluation budget, start at the
  mean of the same initial particles with step size 2 (the uniform's standard deviation is 1.7).

Wall times are per run, single-threaded (``torch.set_num_threads(1)``; NumPy's element-wise code is
single-threaded too). Reproduce (about 6 minutes on 2 cores)::

    python benchmarks/cbo_vs_cbxpy.py --out cbo_vs_cbxpy.json

Needs ``pip install cbx cma`` (benchmark-only; nevergrad pulls in cma).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable

import numpy as np
import torch

from anyorder.cbo import minimize
from anyorder.cbo.functions import ackley, rastrigin

TORCH_FUNCTIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "rastrigin": rastrigin,
    "ackley": ackley,
}


def np_rastrigin(x: np.ndarray) -> np.ndarray:
    return 10.0 * x.shape[-1] + (x**2 - 10.0 * np.cos(2.0 * np.pi * x)).sum(-1)


def np_ackley(x: np.ndarray) -> np.ndarray:
    return (
        -20.0 * np.exp(-0.2 * np.sqrt((x**2).mean(-1)))
        - np.exp(np.cos(2.0 * np.pi * x).mean(-1))
        + 20.0
        + np.e
    )


RECORD_EVERY = 10
NUMPY_FUNCTIONS = {"rastrigin": np_rastrigin, "ackley": np_ackley}


def run_anyorder(name: str, x0: np.ndarray, iters: int, seed: int) -> np.ndarray:
    # the defaults of issue 6, pinned (issue 13 changed sigma to 1.3 and the annealing to 1.01)
    result = minimize(TORCH_FUNCTIONS[name], torch.as_tensor(x0), max_iters=iters, tol=0.0, record_every=RECORD_EVERY,
                      seed=seed, sigma=0.8, alpha=10.0, alpha_factor=1.005)  # fmt: skip
    return result.x.numpy()


def run_cbxpy(name: str, x0: np.ndarray, iters: int, seed: int, aniso: bool) -> np.ndarray:
    from cbx.dynamics import CBO
    from cbx.scheduler import multiply, scheduler

    kwargs = dict(x=x0[None].copy(), f_dim="3D", max_it=iters, verbosity=0, seed=seed)
    if aniso:
        dyn = CBO(NUMPY_FUNCTIONS[name], noise="anisotropic", dt=0.1, sigma=0.8, alpha=10.0,
                  **kwargs)  # fmt: skip
        dyn.optimize(sched=scheduler([multiply(name="alpha", factor=1.005, maximum=1e6)]))
    else:
        dyn = CBO(NUMPY_FUNCTIONS[name], **kwargs)
        dyn.optimize()
    return np.asarray(dyn.consensus).reshape(-1)


def run_cma(name: str, x0: np.ndarray, iters: int, seed: int) -> np.ndarray:
    import cma

    n = x0.shape[0]
    fn = NUMPY_FUNCTIONS[name]
    es = cma.CMAEvolutionStrategy(
        x0.mean(0), 2.0,
        {"popsize": n, "maxfevals": n * iters, "verbose": -9, "seed": seed + 1, "tolfun": 0,
         "tolx": 0, "tolfunhist": 0, "tolstagnation": 10 * iters},
    )  # fmt: skip
    while not es.stop():
        candidates = es.ask()
        es.tell(candidates, list(fn(np.asarray(candidates))))
    return np.asarray(es.result.xfavorite)


METHODS = {
    "anyorder": run_anyorder,
    "cbxpy-default": lambda n, x0, it, s: run_cbxpy(n, x0, it, s, aniso=False),
    "cbxpy-aniso": lambda n, x0, it, s: run_cbxpy(n, x0, it, s, aniso=True),
    "cma-es": run_cma,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--functions", default="rastrigin,ackley")
    parser.add_argument("--dims", default="10,30")
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--cma-seeds", type=int, default=5, help="CMA-ES is slow: fewer seeds")
    parser.add_argument("--particles", type=int, default=200)
    parser.add_argument("--iters", type=int, default=1000)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--out", default="cbo_vs_cbxpy.json")
    parser.add_argument(
        "--record-every", type=int, default=10, help="anyorder's record_every (its default: 10)"
    )
    args = parser.parse_args()
    global RECORD_EVERY
    RECORD_EVERY = args.record_every
    torch.set_num_threads(1)
    rows = []
    methods = args.methods.split(",")
    for name in args.functions.split(","):
        for dim in map(int, args.dims.split(",")):
            distances: dict[str, list[float]] = {m: [] for m in methods}
            times: dict[str, list[float]] = {m: [] for m in methods}
            for seed in range(args.seeds):
                x0 = np.random.default_rng(1000 + seed).uniform(-3, 3, (args.particles, dim))
                # methods interleaved per seed, so that they share the machine's load alike
                for method in methods:
                    if method == "cma-es" and seed >= args.cma_seeds:
                        continue
                    start = time.perf_counter()
                    x = METHODS[method](name, x0, args.iters, seed)
                    times[method].append(time.perf_counter() - start)
                    distances[method].append(float(np.abs(x).max()))
            for method in methods:
                row = {
                    "function": name,
                    "dim": dim,
                    "method": method,
                    "seeds": len(distances[method]),
                    "successes": int(sum(d < 0.25 for d in distances[method])),
                    "median_distance": float(np.median(distances[method])),
                    "median_time_s": float(np.median(times[method])),
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
    with open(args.out, "w") as fh:
        json.dump({"particles": args.particles, "iters": args.iters, "rows": rows}, fh, indent=1)
    print(
        "\n| function | d | method | success | median sup-distance | time / run (s) | vs anyorder |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    base = {
        (r["function"], r["dim"]): r["median_time_s"] for r in rows if r["method"] == "anyorder"
    }
    for r in rows:
        ratio = r["median_time_s"] / base.get((r["function"], r["dim"]), math.nan)
        print(
            f"| {r['function']} | {r['dim']} | {r['method']} | {r['successes']}/{r['seeds']} | "
            f"{r['median_distance']:.3f} | {r['median_time_s']:.2f} | {ratio:.2f}x |"
        )


if __name__ == "__main__":
    main()
