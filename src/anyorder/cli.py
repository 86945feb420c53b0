"""The ``anyorder`` command-line tool.

``anyorder bench``: run the benchmark suite (see ``anyorder bench --help``).
``anyorder hessian``: Hessian spectrum, trace, density and per-layer sensitivity of a task's model.
``anyorder list``: the registered tasks and optimizers.
``anyorder bilevel``: the bilevel algorithms on the bilevel problems (see ``anyorder bilevel --help``).
``anyorder federated``: federated algorithms on one partition, seeds and round budget.

Bad input exits with code 2 and one line on stderr naming the bad value and what is allowed.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

__all__ = ["main", "build_parser"]


class UsageError(Exception):
    """Bad command-line input: printed as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2
        raise UsageError(message)


def _names(value: str) -> list[str]:
    names = [v.strip() for v in value.split(",") if v.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of names, got {value!r}")
    return names


def _number(kind: type, low: float, high: float = math.inf, *, low_open: bool = False,
            what: str) -> Callable[[str], Any]:
    """An argparse ``type=``: ``kind`` (int or float) parsed from the text, finite, in
    ``[low, high]`` (``(low, high]`` with ``low_open``); otherwise an error naming the value and
    ``what`` was expected."""

    def parse(value: str) -> Any:
        try:
            x = kind(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {value!r}") from None
        above = x > low if low_open else x >= low
        if not (above and x <= high and math.isfinite(x)):
            raise argparse.ArgumentTypeError(f"expected {what}, got {value!r}")
        return x

    return parse


_positive_int = _number(int, 1, what="a positive integer")
_seed = _number(int, 0, what="an integer >= 0")
_positive_float = _number(float, 0.0, low_open=True, what="a number > 0")
_unit_float = _number(float, 0.0, 1.0, what="a number in [0, 1]")
_cost_ratio = _number(float, 0.0, what="a number >= 0")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for documentation and tests)."""
    parser = _Parser(prog="anyorder", description=__doc__.split("\n\n")[0])
    from anyorder import __version__

    parser.add_argument("--version", action="version", version=f"anyorder {__version__}")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)
    bench = sub.add_parser(
        "bench",
        help="run every applicable optimizer on every task with the same seed, steps and data",
        description="Run the benchmark suite and write results.json, results.csv, plots and "
        "index.html to --out.",
    )
    bench.add_argument(
        "--suite",
        choices=["quick", "full"],
        default="quick",
        help="which suite (default: quick, about 2 minutes on 2 CPU cores)",
    )
    bench.add_argument(
        "--tasks", type=_names, help="comma-separated task names (default: the suite's)"
    )
    bench.add_argument(
        "--optimizers",
        type=_names,
        help="comma-separated optimizer names, or variants defined in --config "
        "(default: every registered optimizer)",
    )
    bench.add_argument(
        "--config", type=Path, help="YAML or TOML file with hyperparameters and task options"
    )
    bench.add_argument("--steps", type=_positive_int, help="steps per run (default: each task's)")
    bench.add_argument(
        "--time-budget",
        type=_positive_float,
        metavar="SECONDS",
        help="end each run after this much step time (steps is then the cap): "
        "compare at an equal wall-clock budget",
    )
    bench.add_argument(
        "--seed", type=_seed, default=0, help="seed for weights and data order (default 0)"
    )
    _add_seeded_arguments(bench)
    bench.add_argument(
        "--out",
        type=Path,
        help="output directory (default ./anyorder-bench/<timestamp>); never overwritten",
    )
    bench.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="default: cpu")
    bench.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    bench.add_argument(
        "--distributed",
        type=_positive_int,
        metavar="N",
        help="run the zeroth-order optimizers across N local processes (gloo) exchanging only "
        "seeds and scalars; reports bytes sent per step and queries per second",
    )
    bench.add_argument(
        "--monitor",
        action="store_true",
        help="record the top Hessian eigenvalue and trace against 2/lr during each run",
    )
    bench.add_argument(
        "--monitor-every",
        type=_positive_int,
        metavar="STEPS",
        help="steps between monitor checks (default: the monitor's, 100); implies --monitor",
    )
    hess = sub.add_parser(
        "hessian",
        help="Hessian spectrum, trace, density and per-layer sensitivity of a task's model",
        description="Analyse the Hessian of a bench task's loss: top and smallest eigenvalues "
        "(Lanczos), trace (Hutchinson by layer blocks, Neyman-allocated), spectral density "
        "(SLQ), per-layer traces with a HAWQ-V2 bit allocation and batch-size learning-rate "
        "advice. Writes hessian.json, density.png and layers.png to --out.",
    )
    hess.add_argument("--task", required=True, help="task name (see anyorder list)")
    hess.add_argument(
        "--checkpoint", type=Path, help="state dict of the task's model (torch.save) to analyse"
    )
    hess.add_argument(
        "--out",
        type=Path,
        help="output directory (default ./anyorder-hessian/<timestamp>); never overwritten",
    )
    hess.add_argument("--seed", type=_seed, default=0, help="seed for weights and data (default 0)")
    hess.add_argument(
        "--batches",
        type=_positive_int,
        default=8,
        help="batches of the task's stream to average over (default 8)",
    )
    hess.add_argument("--top-k", type=_positive_int, default=5, help="top eigenvalues (default 5)")
    hess.add_argument(
        "--matvecs",
        type=_positive_int,
        default=99,
        help="Hessian-vector products for the trace (default 99)",
    )
    hess.add_argument(
        "--new-batch-size",
        type=_positive_int,
        help="batch size to advise a learning rate for (default: 4x the task's)",
    )
    hess.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="default: cpu")
    hess.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    sub.add_parser("list", help="list the registered tasks and optimizers")
    from anyorder.bench.bilevel import add_bilevel_parser

    add_bilevel_parser(sub)
    _add_federated_parser(sub)
    return parser


def _add_seeded_arguments(bench: argparse.ArgumentParser) -> None:
    """Options of issue 17: seeds, user task files, budgets, targets, resume."""
    bench.add_argument(
        "--seeds",
        type=_positive_int,
        metavar="N",
        help="run every (task, optimizer) pair with N paired seeds --seed, --seed+1, ... "
        "(default: 2 for the quick suite, 1 otherwise); figures are means with 95%% t intervals",
    )
    bench.add_argument(
        "--task-file",
        type=Path,
        metavar="FILE",
        help="a Python file defining `task` or `tasks` (anyorder.bench.user_task.model_task or "
        "vector_task); its tasks run instead of the suite's unless --tasks names others",
    )
    bench.add_argument(
        "--eval-budget",
        type=_positive_float,
        metavar="COST",
        help="end each run once forward + R x backward evaluations reach COST (--steps is "
        "the cap): compare at an equal number of evaluations",
    )
    bench.add_argument(
        "--backward-cost",
        type=_cost_ratio,
        metavar="R",
        default=2.0,
        help="cost of one backward pass in forward evaluations, for --eval-budget and the "
        "evaluations to target (default 2)",
    )
    bench.add_argument(
        "--target-quantile",
        type=_unit_float,
        metavar="Q",
        default=0.5,
        help="a task's target loss is this quantile over optimizers of their median best loss, "
        "unless the task declares target_loss (default 0.5)",
    )
    bench.add_argument(
        "--resume",
        type=Path,
        metavar="DIR",
        help="continue the interrupted bench in DIR with its saved settings (give no other "
        "options but --no-progress); finished runs are not redone",
    )


#: Settings saved to bench.json for --resume (the config is saved by content).
_SAVED = (
    "suite", "tasks", "optimizers", "steps", "time_budget", "seed", "seeds", "device",
    "monitor", "monitor_every", "eval_budget", "backward_cost", "target_quantile",
)  # fmt: skip


def _restore_args(args: argparse.Namespace) -> tuple[argparse.Namespace, dict]:
    """For --resume: the saved settings as arguments, and the saved config."""
    from anyorder.bench.resume import load_settings

    defaults = build_parser().parse_args(["bench"])
    given = [
        k
        for k, v in vars(args).items()
        if k not in ("resume", "no_progress", "command") and v != getattr(defaults, k)
    ]
    if given:
        raise UsageError(
            f"--resume takes its settings from {str(args.resume / 'bench.json')!r}; drop "
            + ", ".join("--" + k.replace("_", "-") for k in given)
        )
    settings = load_settings(args.resume)
    restored = argparse.Namespace(**vars(args))
    for key in _SAVED:
        setattr(restored, key, settings.get(key, getattr(defaults, key)))
    task_file = settings.get("task_file")
    restored.task_file = Path(task_file) if task_file else None
    if task_file and _sha256(restored.task_file) != settings.get("task_file_sha256"):
        raise UsageError(
            f"--resume: the task file {task_file!r} is missing or changed since the finished runs "
            "were made; restore it or start a new --out"
        )
    restored.config = None
    restored.out = args.resume
    return restored, settings.get("config") or {}


def _sha256(path: Path) -> str | None:
    import hashlib

    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


def _settings(args: argparse.Namespace, config: dict, seeds: list[int]) -> dict:
    saved = {key: getattr(args, key) for key in _SAVED}
    saved["seeds"] = len(seeds)
    saved["task_file"] = str(args.task_file.resolve()) if args.task_file else None
    saved["task_file_sha256"] = _sha256(args.task_file) if args.task_file else None
    saved["config"] = config
    return saved


_FED_HELP = {
    "lr": "local learning rate",
    "rho": "SAM radius (FedSAM, MoFedSAM, FedSpeed, DFedSAM)",
    "lam": "FedSpeed's lambda (the prox term is (x - x_t)/lambda)",
    "momentum_alpha": "MoFedSAM's weight of the fresh SAM gradient",
    "alpha": "Dirichlet concentration (smaller: more skewed labels)",
    "participation": "fraction of clients per round",
    "dropout": "probability that a selected client drops out",
    "gossip_steps": "DFedSAM-MGS gossip steps per round",
    "buffer_size": "FedBuff's c",
    "period": "FedFix's aggregation period (slowest client: 1 time unit per update)",
    "slower_percent": "how much faster the fastest client is than the slowest, in percent",
    "hidden": "MLP hidden width",
    "threshold": "accuracy for 'rounds to threshold'",
    "zo_lr": "FedZO's local learning rate",
    "zo_mu": "FedZO's perturbation size",
    "zo_queries": "FedZO's two-point queries per local step",
}


def _add_federated_parser(sub: argparse._SubParsersAction) -> None:
    """``anyorder federated``: options mirror :class:`anyorder.bench.federated.FederatedConfig`."""
    from anyorder.bench.federated import ALGORITHMS, FederatedConfig

    d = FederatedConfig.__dataclass_fields__
    fed = sub.add_parser(
        "federated",
        help="federated algorithms on one partition, seeds and round budget",
        description="Run federated algorithms (" + ", ".join(ALGORITHMS) + ") in the in-process "
        "simulator on the same client partition, seeds and rounds; write results.json, "
        "results.csv, accuracy.png and index.html (mean and spread over seeds) to --out.",
    )
    fed.add_argument("--task", choices=["digits", "mnist"], default="digits")
    fed.add_argument("--algorithms", type=_names, help="comma-separated (default: the server-based four)")
    for name, kind in (
        ("num_clients", _positive_int), ("rounds", _positive_int), ("local_steps", _positive_int),
        ("batch_size", _positive_int), ("lr", _positive_float), ("rho", float),
        ("lam", _positive_float), ("momentum_alpha", _positive_float), ("alpha", _positive_float),
        ("classes_per_client", _positive_int), ("participation", _positive_float),
        ("dropout", float), ("gossip_steps", _positive_int), ("buffer_size", _positive_int),
        ("period", _positive_float), ("slower_percent", float), ("hidden", _positive_int),
        ("threshold", _positive_float), ("zo_lr", _positive_float), ("zo_mu", _positive_float),
        ("zo_queries", _positive_int),
    ):  # fmt: skip
        fed.add_argument("--" + name.replace("_", "-"), type=kind, default=d[name].default,
                         help=f"{_FED_HELP.get(name, name.replace('_', ' '))} (default {d[name].default})")  # fmt: skip
    fed.add_argument("--zo-bits", type=int, choices=[8], default=None,
                     help="FedZO: send each projected gradient as one byte (default: float32)")  # fmt: skip
    fed.add_argument("--partition", choices=["dirichlet", "iid", "pathological"], default="dirichlet")
    fed.add_argument("--topology", choices=["ring", "torus", "erdos-renyi", "complete"], default="ring")
    fed.add_argument("--seeds", type=_names, default="0,1,2,3,4", help="comma-separated seeds")
    fed.add_argument("--threads", type=_positive_int, default=1,
                     help="torch threads (default 1: fastest for small models)")  # fmt: skip
    fed.add_argument("--out", type=Path, help="output directory (default ./anyorder-federated/<timestamp>)")
    fed.add_argument("--quiet", action="store_true", help="no per-run progress lines")


def _cmd_federated(args: argparse.Namespace) -> int:
    import torch

    from anyorder.bench.federated import (
        SERVER,
        FederatedConfig,
        format_summary,
        run_federated,
        write_federated_report,
    )
    from anyorder.bench.report import OutDirExistsError, prepare_out_dir

    fields = FederatedConfig.__dataclass_fields__
    values = {k: getattr(args, k) for k in fields if hasattr(args, k) and k not in ("seeds", "algorithms")}
    try:
        seeds = tuple(int(s) for s in args.seeds)
    except ValueError:
        raise UsageError(f"--seeds must be comma-separated integers, got {args.seeds!r}") from None
    try:
        config = FederatedConfig(**values, seeds=seeds, algorithms=tuple(args.algorithms or SERVER))
    except (ValueError, TypeError) as err:
        raise UsageError(str(err)) from None
    out = args.out or Path("anyorder-federated") / _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    try:
        out_dir = prepare_out_dir(out)
    except OutDirExistsError as err:
        raise UsageError(str(err)) from None
    torch.set_num_threads(args.threads)
    result = run_federated(config, progress=None if args.quiet else print)
    write_federated_report(result, out_dir)
    print(format_summary(result))
    print(f"\nwrote {out_dir / 'results.json'}, results.csv, accuracy.png and index.html")
    return 0


def _cmd_list() -> int:
    from anyorder.bench.registry import all_optimizers, all_tasks

    print("tasks:")
    for name, cls in sorted(all_tasks().items()):
        print(f"  {name:24s} provides {','.join(sorted(cls.provides)):28s} {cls.description}")
    print("optimizers:")
    for name, spec in sorted(all_optimizers().items()):
        print(f"  {name:24s} requires {','.join(sorted(spec.requires)):12s} {spec.description}")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from anyorder.bench.budgets import apply_budget
    from anyorder.bench.config import load_config
    from anyorder.bench.registry import UnknownNameError
    from anyorder.bench.report import OutDirExistsError, format_table, prepare_out_dir, write_report
    from anyorder.bench.resume import RunStore, save_settings
    from anyorder.bench.runner import plan_suite, run_suite
    from anyorder.bench.summary import format_summary
    from anyorder.bench.tasks.base import MissingDataError

    out = args.out or Path("anyorder-bench") / _dt.datetime.now().strftime("%Y%m%d-%H%M%S")

    def log(message: str) -> None:
        print(message, file=sys.stderr)

    notes: list[str] = []
    try:
        saved_config = None
        if args.resume is not None:
            args, saved_config = _restore_args(args)
            out = args.resume
        if args.task_file is not None:
            from anyorder.bench.user_task import load_task_file

            file_tasks = load_task_file(args.task_file)
            args.tasks = args.tasks or file_tasks
        config = saved_config if saved_config is not None else (
            load_config(args.config) if args.config else {}
        )
        seeds = _seed_list(args)
        plan = plan_suite(
            suite=args.suite,
            tasks=args.tasks,
            optimizers=args.optimizers,
            steps=args.steps,
            device=args.device,
            config=config,
            time_budget_s=args.time_budget,
            log=notes.append,
        )
        plan = apply_budget(plan, eval_budget=args.eval_budget, backward_cost=args.backward_cost)
        if args.distributed is not None:
            if args.device != "cpu":
                raise UsageError("--distributed runs on CPU processes (gloo); drop --device")
            if len(seeds) > 1:
                raise UsageError("--distributed runs one seed; drop --seeds or set --seeds 1")
            from anyorder.bench.distributed import select_distributed

            plan = select_distributed(plan, notes.append)
        out_dir = args.resume if args.resume is not None else prepare_out_dir(out)
        if args.resume is None and args.distributed is None:
            save_settings(out_dir, _settings(args, config, seeds))
    except (UnknownNameError, ValueError, MissingDataError, OutDirExistsError) as err:
        raise UsageError(str(err)) from err
    for note in notes:  # said only once the input is good: a usage error is one line
        log(note)

    if args.distributed is not None:
        from anyorder.bench.distributed import format_distributed_table, run_distributed

        try:
            result = run_distributed(
                plan, args.distributed, out_dir, seed=args.seed, suite=args.suite, log=log
            )
        except ValueError as err:
            raise UsageError(str(err)) from err
        write_report(result, out_dir)
        print(format_table(result))
        print()
        print(format_distributed_table(result))
        print(f"\nwrote {out_dir / 'results.json'}, results.csv, plots and index.html")
        return 0

    monitor_every = args.monitor_every
    if args.monitor and monitor_every is None:
        from anyorder.hessian.monitor import DEFAULT_EVERY

        monitor_every = DEFAULT_EVERY
    store = RunStore(out_dir)
    try:
        finished = store.load()
    except ValueError as err:
        raise UsageError(str(err)) from err
    try:
        result = run_suite(
            plan,
            suite=args.suite,
            seed=args.seed,
            progress=not args.no_progress,
            log=log,
            monitor_every=monitor_every,
            seeds=seeds,
            finished=finished,
            on_result=store.save,
        )
    except KeyboardInterrupt:
        log(f"anyorder: finished runs are saved; continue with: anyorder bench --resume {out_dir}")
        raise
    declared = {r.task.name: getattr(r.task, "target_loss", None) for r in plan}
    write_report(
        result, out_dir, declared_targets=declared, target_quantile=args.target_quantile
    )
    print(format_table(result) if len(seeds) == 1 else format_summary(out_dir / "summary.json"))
    print(f"\nwrote {out_dir / 'results.json'}, summary.json, results.csv, plots and index.html")
    return 0


def _seed_list(args: argparse.Namespace) -> list[int]:
    default = 2 if args.suite == "quick" and args.distributed is None else 1
    n = args.seeds if args.seeds is not None else default
    return [args.seed + i for i in range(n)]


def _load_checkpoint(model: object, path: Path) -> None:
    from anyorder.core.files import CheckpointError, load_checkpoint

    try:  # weights_only=True; empty, truncated, foreign or unsafe files: one line naming the file
        state = load_checkpoint(path)
    except CheckpointError as err:
        raise UsageError(str(err)) from err
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise UsageError(f"checkpoint {str(path)!r} must hold a state dict")
    try:
        model.load_state_dict(state)  # type: ignore[attr-defined]
    except (RuntimeError, KeyError, TypeError) as err:
        first = " ".join(str(err).split())
        raise UsageError(
            f"checkpoint {str(path)!r} does not fit the task's model: {first}"
        ) from err


def _cmd_hessian(args: argparse.Namespace) -> int:
    from anyorder.bench.registry import UnknownNameError, get_optimizer, get_task
    from anyorder.bench.report import OutDirExistsError, prepare_out_dir
    from anyorder.bench.tasks.base import MissingDataError
    from anyorder.hessian.analysis import analyse_task, format_summary, write_hessian_report

    out = args.out or Path("anyorder-hessian") / _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    try:
        import torch

        if args.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("device 'cuda' requested but CUDA is not available; use --device cpu")
        task = get_task(args.task)(device=args.device)
        model = task.init_model(args.seed)
        if args.checkpoint is not None:
            _load_checkpoint(model, args.checkpoint)
        base_lr = {}
        for name in ("sgd", "adam"):
            hp = get_optimizer(name).hyperparameters(task.name)
            if isinstance(hp.get("lr"), (int, float)):
                base_lr[name] = float(hp["lr"])
        out_dir = prepare_out_dir(out)
    except (UnknownNameError, ValueError, MissingDataError, OutDirExistsError) as err:
        raise UsageError(str(err)) from err
    report = analyse_task(
        task,
        model,
        seed=args.seed,
        n_batches=args.batches,
        top_k=args.top_k,
        matvecs=max(5, args.matvecs),
        checkpoint=str(args.checkpoint) if args.checkpoint else None,
        base_lr=base_lr,
        new_batch_size=args.new_batch_size,
        progress=not args.no_progress,
    )
    write_hessian_report(report, out_dir)
    print(format_summary(report))
    print(f"\nwrote {out_dir / 'hessian.json'}, density.png and layers.png")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``anyorder`` command; returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.command == "bench":
            return _cmd_bench(args)
        if args.command == "hessian":
            return _cmd_hessian(args)
        if args.command == "list":
            return _cmd_list()
        if args.command == "bilevel":
            from anyorder.bench.bilevel import cli_main

            return cli_main(args)
        if args.command == "federated":
            return _cmd_federated(args)
        parser.print_help()
        return 2
    except UsageError as err:
        print(f"anyorder: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("anyorder: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
