"""Asynchronous aggregation with heterogeneous client speeds (Fraboni, Vidal, Kameni & Lorenzi,
"A General Theory for Federated Optimization with Asynchronous and Heterogeneous Clients
Updates", JMLR 2023), and FedBuff (Nguyen et al., "Federated Learning with Buffered Asynchronous
Aggregation", AISTATS 2022).

Every aggregation n: x ← x + server_lr · Σ_{i arrived} dᵢ (xᵢ received − xᵢ sent), where
"xᵢ sent" is the (possibly stale) global model client i started from; the difference is the
``delta`` a :class:`~anyorder.federated.fedavg.FedAvg`-family client uploads. Client i needs τᵢ
time units per update (:func:`skewed_times`); after uploading it gets the current global model at
once (FedBuff) or at the next aggregation (FedFix) and starts again.

* :class:`FedBuff` (c): aggregate as soon as c updates are buffered; dᵢ = 1/c.
* :class:`FedFix` (Δ): aggregate every Δ time units whatever arrived; dᵢ = ⌈τᵢ/Δ⌉ · pᵢ, which
  makes the expected weight of every client over time proportional to its importance pᵢ (the
  paper's condition for converging to the optimum of the federated objective, not of a
  speed-biased surrogate). The schedule and weights follow the paper's reference code
  (Accenture/Labs-Federated-Learning, ``clients_schedule.py`` / ``server.py``).

Staleness (the number of aggregations between the model a client started from and the one its
update is applied to) is recorded per aggregation.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from anyorder.federated.algorithm import (
    ClientData,
    Payload,
    ServerAlgorithm,
    check_finite_payload,
    check_positive,
    client_generator,
    payload_bytes,
)
from anyorder.federated.simulator import (
    CheckpointError,
    Evaluate,
    RoundRecord,
    _Engine,
)

__all__ = ["FedBuff", "FedFix", "AsyncSimulator", "skewed_times", "IMPORTANCES"]

IMPORTANCES = ("size", "uniform")


def skewed_times(num_clients: int, slower_percent: float) -> torch.Tensor:
    """The reference code's heterogeneous compute times: τᵢ = 1 − i·s/(100 (m − 1)), i.e. the
    fastest client is ``slower_percent`` % faster than the slowest (τ₀ = 1)."""
    if not isinstance(num_clients, int) or num_clients < 1:
        raise ValueError(f"num_clients must be a positive integer, got {num_clients!r}")
    if not isinstance(slower_percent, (int, float)) or not 0 <= slower_percent < 100:
        raise ValueError(f"slower_percent must be in [0, 100), got {slower_percent!r}")
    if num_clients == 1:
        return torch.ones(1, dtype=torch.float64)
    i = torch.arange(num_clients, dtype=torch.float64)
    return 1.0 - i * slower_percent / 100.0 / (num_clients - 1)


@dataclass
class FedBuff:
    """Aggregate every ``buffer_size`` arrivals with dᵢ = 1 / buffer_size."""

    buffer_size: int = 5
    server_lr: float = 1.0

    name = "fedbuff"

    def __post_init__(self) -> None:
        self.buffer_size = check_positive(self.buffer_size, "buffer_size", integer=True)
        self.server_lr = check_positive(self.server_lr, "server_lr")

    def weights(self, times: torch.Tensor, importance: torch.Tensor) -> torch.Tensor:
        return torch.full_like(times, 1.0 / self.buffer_size)


@dataclass
class FedFix:
    """Aggregate every ``period`` time units with dᵢ = ⌈τᵢ/Δ⌉ · pᵢ."""

    period: float = 1.0
    server_lr: float = 1.0

    name = "fedfix"

    def __post_init__(self) -> None:
        self.period = check_positive(self.period, "period")
        self.server_lr = check_positive(self.server_lr, "server_lr")

    def weights(self, times: torch.Tensor, importance: torch.Tensor) -> torch.Tensor:
        # a tiny tolerance so that tau = k * period counts as k windows, not k + 1
        return torch.ceil(times / self.period - 1e-9) * importance


class AsyncSimulator(_Engine):
    """Clients of a FedAvg-family algorithm (uploads ``delta`` and ``num_examples``; its
    ``aggregate`` is replaced by the asynchronous rule) with compute times ``times``, in one
    process, on a simulated clock.

    One :meth:`step` is one aggregation; its :class:`RoundRecord` lists the clients aggregated
    (``participants``), bytes up (their uploads) and down (the models sent to clients that
    start again), and in ``extra`` the simulated time, the mean and max staleness. ``staleness``
    maps each aggregated client to its staleness. Client i's k-th update draws its batches from
    ``client_generator(seed, k, i)``. ``importance`` gives pᵢ (FedFix's weights): the clients'
    example counts (``"size"``) or uniform.
    """

    kind = "async"

    def __init__(
        self,
        algorithm: ServerAlgorithm,
        rule: FedBuff | FedFix,
        model: nn.Module,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        clients: Sequence[ClientData],
        times: Any,
        *,
        seed: int = 0,
        importance: str = "size",
        evaluate: Evaluate | None = None,
        eval_every: int = 1,
    ) -> None:
        if not isinstance(algorithm, ServerAlgorithm):
            raise TypeError(f"algorithm must be a ServerAlgorithm, got {type(algorithm).__name__}")
        if not isinstance(rule, (FedBuff, FedFix)):
            raise TypeError(f"rule must be FedBuff or FedFix, got {type(rule).__name__}")
        super().__init__(
            algorithm, model, loss_fn, clients, seed=seed, evaluate=evaluate, eval_every=eval_every
        )
        times = torch.as_tensor(times, dtype=torch.float64)
        if times.shape != (self.num_clients,) or not bool((times > 0).all()) or not bool(
            torch.isfinite(times).all()
        ):
            raise ValueError(
                f"times must hold {self.num_clients} positive finite compute times, got {times}"
            )
        if importance not in IMPORTANCES:
            raise ValueError(
                f"importance must be one of {', '.join(IMPORTANCES)}, got {importance!r}"
            )
        if isinstance(rule, FedBuff) and rule.buffer_size > self.num_clients:
            raise ValueError(
                f"buffer_size={rule.buffer_size} is more than the {self.num_clients} clients"
            )
        if self.algorithm.init_client(self.x0, 0) or set(
            self.algorithm.downlink(self.algorithm.init_server(self.x0, self.num_clients))
        ) != {"model"}:
            raise TypeError(
                f"{algorithm.name} keeps client state or sends more than the model; the "
                "asynchronous engine runs stateless clients that start from the model alone "
                "(FedAvg, FedSAM)"
            )
        self.rule = rule
        self.times = times
        self.importance = importance
        sizes = torch.tensor([len(c) for c in self.clients], dtype=torch.float64)
        p = sizes / sizes.sum() if importance == "size" else torch.full_like(sizes, 1 / len(sizes))
        self.weights = rule.weights(times, p)
        self.model = self.x0.clone()
        self.clock = 0.0
        self.return_times = times.clone()
        self.sent = self.x0.repeat(self.num_clients, 1)  # the model each client works from
        self.sent_version = torch.zeros(self.num_clients, dtype=torch.int64)
        self.updates_done = torch.zeros(self.num_clients, dtype=torch.int64)
        self.staleness: list[dict[str, int]] = []

    def _identity(self) -> dict[str, Any]:
        return {
            **super()._identity(),
            "rule": repr(self.rule),
            "times": self.times.tolist(),
            "importance": self.importance,
        }

    def global_model(self) -> torch.Tensor:
        return self.model

    def _arrivals(self) -> tuple[list[int], float]:
        if isinstance(self.rule, FedFix):
            now = (self.round + 1) * self.rule.period
            ids = torch.nonzero(self.return_times <= now + 1e-12).flatten().tolist()
            return ids, now
        order = sorted(range(self.num_clients), key=lambda i: (float(self.return_times[i]), i))
        ids = sorted(order[: self.rule.buffer_size])
        return ids, float(self.return_times[ids].max())

    def step(self, last: bool = False) -> RoundRecord:
        start = time.perf_counter()
        alg = self.algorithm
        ids, now = self._arrivals()
        ups: list[tuple[int, Payload]] = []
        rejected: list[int] = []
        bytes_up: dict[str, int] = {}
        client_time = 0.0
        losses = []
        for i in ids:
            ctx = self._context(i)
            ctx.generator = client_generator(self.seed, int(self.updates_done[i]), i)
            t0 = time.perf_counter()
            up, _ = alg.client_update({"model": self.sent[i]}, {}, ctx)
            client_time += time.perf_counter() - t0
            bytes_up[str(i)] = payload_bytes(up)
            if not check_finite_payload(up):
                rejected.append(i)
                continue
            ups.append((i, up))
            if math.isfinite(ctx.metrics.get("loss", math.nan)):
                losses.append(ctx.metrics["loss"])
        model = self.model
        if ups:
            d = torch.stack([self.weights[i].to(model.dtype) for i, _ in ups])
            stacked = torch.stack([up["delta"] for _, up in ups])
            model = model + self.rule.server_lr * (d @ stacked)
        if not bool(torch.isfinite(model).all()):
            raise FloatingPointError(
                f"aggregation {self.round}: the model is not finite; the federation was left as "
                "it was"
            )
        stale = {str(i): int(self.round - self.sent_version[i]) for i in ids}
        self.model = model
        self.clock = now
        for i in ids:  # they start again from the new model
            self.sent[i] = model
            self.sent_version[i] = self.round + 1
            self.updates_done[i] += 1
            self.return_times[i] = now + self.times[i]
        down = payload_bytes(alg.downlink({"model": model}))
        wall = time.perf_counter() - start
        values = list(stale.values())
        record = RoundRecord(
            round=self.round,
            participants=ids,
            dropped=[],
            rejected=rejected,
            bytes_up=bytes_up,
            bytes_down={str(i): down for i in ids},
            client_time_s=client_time,
            wall_time_s=wall,
            train_loss=sum(losses) / len(losses) if losses else math.nan,
            extra={
                "sim_time": now,
                "mean_staleness": sum(values) / len(values) if values else 0.0,
                "max_staleness": float(max(values)) if values else 0.0,
            },
        )
        self.staleness.append(stale)
        record.metrics = self._metrics(model, last)
        self.history.append(record)
        self.round += 1
        return record

    def _payload(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "clock": self.clock,
            "return_times": self.return_times,
            "sent": self.sent,
            "sent_version": self.sent_version,
            "updates_done": self.updates_done,
            "staleness": self.staleness,
        }

    def _restore(self, blob: dict[str, Any]) -> None:
        try:
            model, sent = blob["model"], blob["sent"]
            rt, sv, ud = blob["return_times"], blob["sent_version"], blob["updates_done"]
        except KeyError as exc:
            raise CheckpointError(f"checkpoint lacks {exc}") from None
        m, d = self.num_clients, self.x0.numel()
        if (
            model.shape != (d,)
            or sent.shape != (m, d)
            or rt.shape != (m,)
            or sv.shape != (m,)
            or ud.shape != (m,)
            or not bool(torch.isfinite(model).all())
        ):
            raise CheckpointError("checkpoint tensors have the wrong shapes or are not finite")
        self.model, self.sent = model.to(self.x0.dtype), sent.to(self.x0.dtype)
        self.return_times, self.sent_version, self.updates_done = rt, sv, ud
        self.clock = float(blob["clock"])
        self.staleness = list(blob["staleness"])

