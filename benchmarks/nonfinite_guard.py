"""Cost of the non-finite guard on gradients in the standard loop (issue 13), side by side.

Usage: python benchmarks/nonfinite_guard.py [--numel 1000000,10000000] [--rounds 31] [--threads 2]

Times, interleaved round-robin, the median of:
  kernel   anyorder.functional.lion_ over the parameters (the update alone, no checks)
  step     anyorder.optim.Lion.step() on the same tensors (hyperparameter check, the max-|g|
           reduction over every gradient, one host sync, then the same kernel)
and prints step / kernel. Parameters: 10 tensors of float32 on the CPU; the gradients are set
once and the step runs without a closure (``loss.backward(); opt.step()``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from anyorder.functional import lion_
from anyorder.optim import Lion


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--numel", default="1000000,10000000")
    parser.add_argument("--rounds", type=int, default=31)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"load {os.getloadavg()[0]:.1f}, torch threads {torch.get_num_threads()}")
    for numel in (int(n) for n in args.numel.split(",")):
        gen = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(numel // 10, generator=gen)) for _ in range(10)]
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen) * 1e-3
        opt = Lion(params, lr=1e-9)
        bufs = [torch.zeros_like(p) for p in params]

        def kernel(params=params, bufs=bufs) -> None:
            with torch.no_grad():
                lion_(params, [p.grad for p in params], bufs, lr=1e-9, beta1=0.9, beta2=0.99)

        times: dict[str, list[float]] = {"kernel": [], "step": []}
        for r in range(args.rounds + 1):
            for name, fn in (("kernel", kernel), ("step", opt.step)):
                t0 = time.perf_counter()
                fn()
                if r:
                    times[name].append(time.perf_counter() - t0)
        k, s = (statistics.median(times[n]) for n in ("kernel", "step"))
        print(
            f"numel {numel:>10}: kernel {k * 1e3:7.2f} ms  step {s * 1e3:7.2f} ms  step/kernel {s / k:.2f}"
        )


if __name__ == "__main__":
    main()
