"""Markdown tables of a seeded bench's summary.json (for BENCHMARKS.md): the ranking with its
spread and profile score, then per task the target, the best and the fastest optimizer with
their intervals and times to target.

    python benchmarks/summary_to_markdown.py DIR/summary.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.4g}"


def _ci(iv: dict) -> str:
    if iv["mean"] is None:
        return "-"
    if iv["low"] is None:
        return _num(iv["mean"])
    return f"{_num(iv['mean'])} [{_num(iv['low'])}, {_num(iv['high'])}]"


def main(path: str) -> None:
    s = json.loads(Path(path).read_text(encoding="utf-8"))
    print(f"Ranking by {s['measure']} to target over (task, seed), seeds {s['seeds']}:\n")
    print("| # | optimizer | mean rank | median | IQR | tasks | profile score |")
    print("|---|---|---|---|---|---|---|")
    for i, r in enumerate(s["ranking"], 1):
        print(
            f"| {i} | {r['optimizer']} | {r['mean_rank']:.2f} | {r['median_rank']:g} | "
            f"{r['rank_q25']:g}-{r['rank_q75']:g} | {r['tasks']} | {_num(r['profile_score'])} |"
        )
    print("\n| task | target loss | best (final loss, 95% t) | fastest to target | its evals "
          "to target | reached |")
    print("|---|---|---|---|---|---|")
    for task, info in s["tasks"].items():
        best, fast = info["best_optimizer"], info["fastest_optimizer"]
        b = info["optimizers"][best]
        evals = reached = "-"
        if fast is not None:
            f = info["optimizers"][fast]
            evals = _num(f["time_to_target"]["evaluations"]["median"])
            reached = f"{f['reached_fraction']:.0%}"
        print(
            f"| {task} | {_num(info['target'])} | {best}: {_ci(b['final_loss'])} | {fast} | "
            f"{evals} | {reached} |"
        )


if __name__ == "__main__":
    main(sys.argv[1])
