"""Memory and time of the exact restore of zeroth-order steps (issue 13), on real weights.

Usage: python benchmarks/zo_restore.py [--models text-finetune,digits-mlp] [--rounds 5]
                                       [--threads 2] [--distributions rademacher,gaussian]
                                       [--dtypes float32,bfloat16]

For each model's initial weights (the bench tasks' ``init_model(0)``: MiniLM for
``text-finetune``, the 64-hidden MLP for ``digits-mlp``), in float32 and bfloat16, with
mu = 1e-3 (1e-2 for bfloat16, whose ulp at 0.05 is 2.4e-4), it reports:

  arith a / arith b   fraction of elements that MeZO's arithmetic restore does not give back bit
                      for bit from the state after the first move (w + mu z) and after the second
                      (w + mu z - 2 mu z): what the default restore must recover
  escapes             fraction of elements the compact restore stores whole (two-sided step)
  extra / params      bytes the compact restore keeps during the step (2-bit codes + escapes) as
                      a fraction of the parameters' bytes (a copy is 1.00)
  move ms             the first move of a query with the guard's analysis, and the plain pass it
                      replaces (interleaved rounds, medians); restore ms: the exact restore
  exact               whether the restore from both states gave every element back bit for bit
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from anyorder.estimators import SPSA
from anyorder.estimators.restore import PerturbationGuard


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def weights(name: str, dtype: torch.dtype) -> list[torch.Tensor]:
    from anyorder.bench.registry import get_task

    model = get_task(name)(device="cpu").init_model(0)
    return [p.detach().to(dtype).clone() for p in model.parameters() if p.requires_grad]


def measure(ws: list[torch.Tensor], distribution: str, rounds: int) -> dict[str, float]:
    dtype = ws[0].dtype
    mu = 1e-3 if dtype != torch.bfloat16 else 1e-2
    est = SPSA(mu=mu, distribution=distribution, seed=1)
    params = list(enumerate(ws))
    numel = sum(w.numel() for w in ws)
    param_bytes = sum(w.numel() * w.element_size() for w in ws)
    start = [w.clone() for w in ws]

    def same() -> int:
        return sum(int((_bits(w) != _bits(s)).sum()) for w, s in zip(ws, start))

    # MeZO's arithmetic restore from each state
    est.perturb_(params, 0, 0, mu)
    est.perturb_(params, 0, 0, -mu)
    arith_a = same() / numel
    torch._foreach_copy_(ws, start)
    est.perturb_(params, 0, 0, mu)
    est.perturb_(params, 0, 0, -2 * mu)
    est.perturb_(params, 0, 0, mu)
    arith_b = same() / numel
    torch._foreach_copy_(ws, start)

    exact, escapes, extra = True, 0, 0
    move, plain, restore = [], [], []
    for r in range(rounds + 1):
        guard = PerturbationGuard(est, params, r)
        t0 = time.perf_counter()
        guard.first_move_(0, mu, -2 * mu)
        t1 = time.perf_counter()
        escapes, extra = guard.escape_count(), guard.nbytes()
        t2 = time.perf_counter()
        guard.restore()  # from a
        t3 = time.perf_counter()
        exact &= same() == 0
        guard.first_move_(0, mu, -2 * mu)
        est.perturb_(params, r, 0, -2 * mu)
        guard.moved(-2 * mu)
        guard.restore()  # from b
        exact &= same() == 0
        t4 = time.perf_counter()
        est.perturb_(params, r, 0, mu)  # the plain pass the guarded move replaces
        t5 = time.perf_counter()
        torch._foreach_copy_(ws, start)
        if r:  # the first round warms up
            move.append(t1 - t0)
            restore.append(t3 - t2)
            plain.append(t5 - t4)
    return {
        "arith_a": arith_a,
        "arith_b": arith_b,
        "escapes": escapes / numel,
        "extra": extra / param_bytes,
        "move_ms": statistics.median(move) * 1e3,
        "plain_ms": statistics.median(plain) * 1e3,
        "restore_ms": statistics.median(restore) * 1e3,
        "exact": exact,
        "numel": numel,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="text-finetune,digits-mlp")
    parser.add_argument("--distributions", default="rademacher,gaussian")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
        f"load {os.getloadavg()[0]:.1f}\n"
    )
    print(
        "| model | params | dtype | z | arith a | arith b | escapes | extra / params | "
        "move ms (guarded / plain) | restore ms | exact |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name in args.models.split(","):
        for dtype in (getattr(torch, d) for d in args.dtypes.split(",")):
            ws = weights(name, dtype)
            for dist in args.distributions.split(","):
                r = measure(ws, dist, args.rounds)
                print(
                    f"| {name} | {r['numel']:,} | {str(dtype)[6:]} | {dist} | "
                    f"{r['arith_a']:.2%} | {r['arith_b']:.2%} | {r['escapes']:.3%} | "
                    f"{r['extra']:.4f} | {r['move_ms']:.1f} / {r['plain_ms']:.1f} | "
                    f"{r['restore_ms']:.1f} | {'yes' if r['exact'] else 'NO'} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
