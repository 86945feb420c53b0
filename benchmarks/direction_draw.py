"""Cost of drawing directions, side by side: Gaussian vs Rademacher, and CPU vs accelerator.

Usage: python benchmarks/direction_draw.py [--numel 22600000] [--rounds 7] [--device cpu|cuda]

For a flat tensor of ``numel`` float32 weights (22.6M: MiniLM's size) it times, interleaved,
one pass that draws the whole direction chunk by chunk (``anyorder.core.rng.direction_chunks``)
and one pass that draws it and adds it to the weights with torch ops (what a ZO perturbation costs
without the compiled kernel), the same Rademacher pass through the compiled kernel of
``anyorder.core.native`` (what it costs by default on a CPU), and a plain in-place add of a ready
tensor (the memory-bandwidth floor of a pass). With
``--device cuda`` it also times drawing on the CPU and moving the chunks to the GPU (what
``portable_directions=True`` does) against drawing on the GPU.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from anyorder.core import native
from anyorder.core.rng import add_direction_, direction_chunks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--numel", type=int, default=22_600_000)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    weights = torch.zeros(args.numel, device=dev)
    ready = torch.ones(args.numel, device=dev)

    def draw(distribution: str, on_device: bool = True):
        def run() -> None:
            for _s, _e, _z in direction_chunks(
                args.numel, 0, 1, distribution=distribution, device=dev, draw_on_device=on_device
            ):
                pass

        return run

    def perturb(distribution: str):
        def run() -> None:
            for s, e, z in direction_chunks(
                args.numel, 0, 1, distribution=distribution, device=dev, draw_on_device=True
            ):
                weights[s:e].add_(z, alpha=1e-3)

        return run

    methods = {
        "gaussian draw": draw("gaussian"),
        "rademacher draw": draw("rademacher"),
        "gaussian draw + add": perturb("gaussian"),
        "rademacher draw + add": perturb("rademacher"),
        "add of a ready tensor": lambda: weights.add_(ready, alpha=1e-3),
    }
    if dev.type == "cpu" and native.available():
        methods["rademacher fused pass (compiled kernel)"] = lambda: add_direction_(
            weights, 1e-3, 0, 1, distribution="rademacher"
        )
    if dev.type == "cuda":
        methods["gaussian drawn on CPU, moved"] = draw("gaussian", on_device=False)
    times: dict[str, list[float]] = {k: [] for k in methods}
    for fn in methods.values():
        fn()
    for _ in range(args.rounds):
        for key, fn in methods.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times[key].append(time.perf_counter() - t0)
    print(f"torch {torch.__version__}, device {dev}, numel {args.numel:,}, rounds {args.rounds}\n")
    print("| pass | ms | ns per element |")
    print("|---|---|---|")
    for key, ts in times.items():
        t = statistics.median(ts)
        print(f"| {key} | {t * 1e3:.1f} | {t / args.numel * 1e9:.2f} |")


if __name__ == "__main__":
    main()
