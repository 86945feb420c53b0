"""The in-process engine: every client (or gossip node) in one process, one after another,
deterministic, with bytes counted from the payloads and checkpoints of the whole federation.

:class:`Simulator` runs a :class:`~anyorder.federated.algorithm.ServerAlgorithm`;
:class:`GossipSimulator` a :class:`~anyorder.federated.algorithm.GossipAlgorithm` over a mixing
matrix. Per round each records a :class:`RoundRecord`: who took part, who dropped out (and
why), bytes up and down per client, the time the clients' own work took and the round's wall
time (so the engine's overhead is measured, not guessed), the training loss and whatever the
``evaluate`` callable returns for the global (or node-averaged) model.

Randomness: participation and dropouts are drawn from ``client_generator(seed, round, -1)``,
client ``i``'s batches from ``client_generator(seed, round, i)``: a checkpoint stores the seed
and the round, and a resumed run is bit-identical to an uninterrupted one.

Checkpoints (:meth:`Simulator.save`, :meth:`Simulator.load`) hold the server state, every
client's state, the round, the seed, the algorithm's name and hyperparameters (checked on load)
and the history; they are written with :func:`anyorder.core.files.atomic_write` and read with
``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import copy
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from anyorder.core.files import atomic_write
from anyorder.federated.algorithm import (
    ClientContext,
    ClientData,
    GossipAlgorithm,
    Payload,
    ServerAlgorithm,
    State,
    assign_,
    check_finite_payload,
    client_generator,
    flatten,
    payload_bytes,
    sample_participants,
)

__all__ = [
    "RoundRecord",
    "Simulator",
    "GossipSimulator",
    "accuracy_evaluator",
    "CheckpointError",
    "FORMAT",
]

FORMAT = "anyorder.federated.checkpoint/1"
Evaluate = Callable[[torch.Tensor], dict[str, float]]


class CheckpointError(ValueError):
    """A checkpoint that is not a federation checkpoint, or not of this federation."""


@dataclass
class RoundRecord:
    """What happened in one round (plain values, JSON-able).

    ``bytes_up`` / ``bytes_down`` map a client id (as a string, for JSON) to the bytes it sent /
    received this round, counted from the payloads. ``client_time_s`` is the time spent inside
    the clients' rules, ``wall_time_s`` the whole round without evaluation; their difference is
    the engine's overhead. ``dropped`` are clients selected but gone before uploading,
    ``rejected`` uploads with non-finite values (discarded; the client's state is kept as it
    was)."""

    round: int
    participants: list[int]
    dropped: list[int]
    rejected: list[int]
    bytes_up: dict[str, int]
    bytes_down: dict[str, int]
    client_time_s: float
    wall_time_s: float
    train_loss: float
    metrics: dict[str, float] = field(default_factory=dict)
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes_up.values()) + sum(self.bytes_down.values())

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def accuracy_evaluator(
    model: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> Evaluate:
    """``evaluate(x) -> {"accuracy", "loss"}`` of the flat model ``x`` on (inputs, targets),
    computed in a private copy of ``model``."""
    work = copy.deepcopy(model)
    params = list(work.parameters())
    loss_fn = loss_fn or nn.functional.cross_entropy

    def evaluate(x: torch.Tensor) -> dict[str, float]:
        assign_(params, x)
        work.eval()
        with torch.no_grad():
            out = work(inputs)
            return {
                "accuracy": float((out.argmax(-1) == targets).double().mean()),
                "loss": float(loss_fn(out, targets)),
            }

    return evaluate


def _check_fraction(value: Any, name: str, allow_zero: bool) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    low_ok = ok and (value >= 0 if allow_zero else value > 0)
    if not (low_ok and value <= 1 and (value < 1 or name != "dropout")):
        allowed = "[0, 1)" if name == "dropout" else "(0, 1]"
        raise ValueError(f"{name} must be a number in {allowed}, got {value!r}")
    return float(value)


class _Engine:
    """What both simulators share: contexts, history, evaluation, checkpoint plumbing."""

    kind = "engine"

    def __init__(
        self,
        algorithm: Any,
        model: nn.Module,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        clients: Sequence[ClientData],
        *,
        seed: int,
        evaluate: Evaluate | None,
        eval_every: int,
    ) -> None:
        if not clients:
            raise ValueError("a federation needs at least one client")
        for i, c in enumerate(clients):
            if not isinstance(c, ClientData):
                raise TypeError(f"clients[{i}] must be a ClientData, got {type(c).__name__}")
            if len(c) == 0:
                raise ValueError(f"client {i} has no examples")
        if not isinstance(eval_every, int) or eval_every < 1:
            raise ValueError(f"eval_every must be a positive integer, got {eval_every!r}")
        self.algorithm = algorithm
        self.workspace = copy.deepcopy(model)
        self.loss_fn = loss_fn
        self.clients = list(clients)
        self.seed = int(seed)
        self.evaluate = evaluate
        self.eval_every = eval_every
        self.round = 0
        self.history: list[RoundRecord] = []
        self.x0 = flatten(list(model.parameters()))

    @property
    def num_clients(self) -> int:
        return len(self.clients)

    def _context(self, i: int) -> ClientContext:
        return ClientContext(
            i,
            self.clients[i],
            self.workspace,
            self.loss_fn,
            client_generator(self.seed, self.round, i),
        )

    def _metrics(self, x: torch.Tensor, last: bool) -> dict[str, float]:
        if self.evaluate is None:
            return {}
        if (self.round + 1) % self.eval_every and not last:
            return {}
        return dict(self.evaluate(x))

    def run(
        self,
        rounds: int,
        *,
        checkpoint: str | os.PathLike[str] | None = None,
        checkpoint_every: int = 1,
        callback: Callable[[RoundRecord], None] | None = None,
    ) -> list[RoundRecord]:
        """Run until ``rounds`` rounds have been done in total (a resumed simulator continues
        from its round), saving a checkpoint every ``checkpoint_every`` rounds and at the end."""
        if not isinstance(rounds, int) or rounds < 0:
            raise ValueError(f"rounds must be an integer >= 0, got {rounds!r}")
        while self.round < rounds:
            record = self.step(last=self.round + 1 == rounds)
            if callback is not None:
                callback(record)
            if checkpoint is not None and (
                self.round % checkpoint_every == 0 or self.round == rounds
            ):
                self.save(checkpoint)
        return self.history

    def step(self, last: bool = False) -> RoundRecord:  # pragma: no cover - abstract
        raise NotImplementedError

    # -- checkpoints -------------------------------------------------------------------------
    def _identity(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "algorithm": self.algorithm.name,
            "hyperparameters": repr(sorted(self.algorithm.hyperparameters().items())),
            "num_clients": self.num_clients,
            "num_parameters": int(self.x0.numel()),
        }

    def _payload(self) -> dict[str, Any]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _restore(self, blob: dict[str, Any]) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """The whole federation (tensors and plain values only)."""
        return {
            "format": FORMAT,
            **self._identity(),
            "seed": self.seed,
            "round": self.round,
            "history": [r.to_dict() for r in self.history],
            **self._payload(),
        }

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write :meth:`state_dict` atomically to ``path``."""
        blob = self.state_dict()
        atomic_write(path, lambda fh: torch.save(blob, fh))

    def load_state_dict(self, blob: dict[str, Any]) -> None:
        """Restore a federation saved by :meth:`state_dict`; ``CheckpointError`` when it is not a
        checkpoint of this algorithm, hyperparameters, client count and model size. Nothing is
        changed when the check fails."""
        if not isinstance(blob, dict) or blob.get("format") != FORMAT:
            raise CheckpointError("not an anyorder federation checkpoint")
        for key, value in self._identity().items():
            if blob.get(key) != value:
                raise CheckpointError(
                    f"checkpoint {key} is {blob.get(key)!r}, this federation has {value!r}"
                )
        try:
            history = [RoundRecord(**r) for r in blob["history"]]
        except (KeyError, TypeError) as exc:
            raise CheckpointError(f"checkpoint history is malformed: {exc}") from None
        if len(history) != blob["round"]:
            raise CheckpointError(
                f"checkpoint history has {len(history)} rounds, expected {blob['round']}"
            )
        self._restore(blob)
        self.seed = int(blob["seed"])
        self.round = int(blob["round"])
        self.history = history

    def load(self, path: str | os.PathLike[str]) -> None:
        """Load a checkpoint file written by :meth:`save` (``weights_only=True``)."""
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise
        except Exception as exc:  # unpickling errors, truncated files
            raise CheckpointError(f"cannot read federation checkpoint {path}: {exc}") from exc
        self.load_state_dict(blob)


def _check_states(states: Any, n: int, what: str, like: torch.Tensor) -> list[State]:
    if not isinstance(states, list) or len(states) != n:
        raise CheckpointError(f"checkpoint must hold {n} {what} states")
    for s in states:
        if not isinstance(s, dict) or not all(isinstance(v, torch.Tensor) for v in s.values()):
            raise CheckpointError(f"checkpoint {what} states must be dicts of tensors")
        for v in s.values():
            if v.is_floating_point() and v.shape == like.shape and not bool(torch.isfinite(v).all()):
                raise CheckpointError(f"checkpoint {what} state has non-finite values")
    return states


class Simulator(_Engine):
    """All clients of a server-based algorithm in one process.

    Args:
        algorithm: a :class:`ServerAlgorithm`.
        model: the architecture and the initial weights (not modified; a workspace copy trains).
        loss_fn: ``loss_fn(output, target)``.
        clients: one :class:`ClientData` per client (:func:`anyorder.federated.partition
            .client_datasets`).
        seed: the run's seed (batches, participation, dropouts).
        participation: fraction of clients selected per round (``max(1, round(p·m))``,
            uniformly without replacement).
        dropout: probability that a selected client drops out after receiving the model (it
            uploads nothing; the round aggregates the others).
        evaluate: ``evaluate(x) -> dict`` of the global flat model (e.g.
            :func:`accuracy_evaluator`), every ``eval_every`` rounds and after the last.
    """

    kind = "server"

    def __init__(
        self,
        algorithm: ServerAlgorithm,
        model: nn.Module,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        clients: Sequence[ClientData],
        *,
        seed: int = 0,
        participation: float = 1.0,
        dropout: float = 0.0,
        evaluate: Evaluate | None = None,
        eval_every: int = 1,
    ) -> None:
        if not isinstance(algorithm, ServerAlgorithm):
            raise TypeError(f"algorithm must be a ServerAlgorithm, got {type(algorithm).__name__}")
        super().__init__(
            algorithm, model, loss_fn, clients, seed=seed, evaluate=evaluate, eval_every=eval_every
        )
        self.participation = _check_fraction(participation, "participation", allow_zero=False)
        self.dropout = _check_fraction(dropout, "dropout", allow_zero=True)
        self.server: State = algorithm.init_server(self.x0, self.num_clients)
        self.client_states: list[State] = [
            algorithm.init_client(self.x0, i) for i in range(self.num_clients)
        ]

    def _identity(self) -> dict[str, Any]:
        return {
            **super()._identity(),
            "participation": self.participation,
            "dropout": self.dropout,
        }

    def global_model(self) -> torch.Tensor:
        return self.algorithm.global_model(self.server)

    def select(self) -> tuple[list[int], list[int]]:
        """This round's (participants, dropped): drawn from the server's generator."""
        return sample_participants(
            self.seed, self.round, self.num_clients, self.participation, self.dropout
        )

    def step(self, last: bool = False) -> RoundRecord:
        """One round."""
        alg = self.algorithm
        start = time.perf_counter()
        participants, dropped = self.select()
        down = alg.downlink(self.server)
        down_bytes = payload_bytes(down)
        ups: list[tuple[int, Payload]] = []
        new_states: dict[int, State] = {}
        rejected: list[int] = []
        bytes_up: dict[str, int] = {}
        bytes_down: dict[str, int] = {}
        client_time = 0.0
        losses = []
        for i in participants:
            bytes_down[str(i)] = down_bytes
            if i in dropped:
                bytes_up[str(i)] = 0
                continue
            ctx = self._context(i)
            t0 = time.perf_counter()
            up, state = alg.client_update(down, self.client_states[i], ctx)
            client_time += time.perf_counter() - t0
            bytes_up[str(i)] = payload_bytes(up)
            if not check_finite_payload(up):
                rejected.append(i)
                continue
            ups.append((i, up))
            new_states[i] = state
            if math.isfinite(ctx.metrics.get("loss", math.nan)):
                losses.append(ctx.metrics["loss"])
        server = alg.aggregate(self.server, ups, self.num_clients)
        x = alg.global_model(server)
        if not bool(torch.isfinite(x).all()):
            raise FloatingPointError(
                f"round {self.round}: the aggregated model is not finite; the federation was "
                "left as it was before the round"
            )
        self.server = server
        for i, s in new_states.items():
            self.client_states[i] = s
        wall = time.perf_counter() - start
        record = RoundRecord(
            round=self.round,
            participants=participants,
            dropped=dropped,
            rejected=rejected,
            bytes_up=bytes_up,
            bytes_down=bytes_down,
            client_time_s=client_time,
            wall_time_s=wall,
            train_loss=sum(losses) / len(losses) if losses else math.nan,
        )
        record.metrics = self._metrics(x, last)
        self.history.append(record)
        self.round += 1
        return record

    def _payload(self) -> dict[str, Any]:
        return {"server": dict(self.server), "clients": [dict(s) for s in self.client_states]}

    def _restore(self, blob: dict[str, Any]) -> None:
        server = blob.get("server")
        if not isinstance(server, dict) or not all(
            isinstance(v, torch.Tensor) for v in server.values()
        ):
            raise CheckpointError("checkpoint server state must be a dict of tensors")
        model = self.algorithm.global_model(server)
        if model.shape != self.x0.shape or not bool(torch.isfinite(model).all()):
            raise CheckpointError("checkpoint global model has the wrong size or is not finite")
        clients = _check_states(blob.get("clients"), self.num_clients, "client", self.x0)
        self.server = {k: v.to(self.x0.dtype) if v.is_floating_point() else v
                       for k, v in server.items()}  # fmt: skip
        self.client_states = [dict(s) for s in clients]


class GossipSimulator(_Engine):
    """All nodes of a decentralized algorithm in one process, mixing with ``W``.

    ``mixing`` is a doubly stochastic (m, m) matrix (:mod:`anyorder.federated.topology`): node i
    receives node j's message when ``W[i, j] != 0`` (j ≠ i), so a gossip step costs each node
    its message size times its number of neighbours, both ways. ``evaluate`` sees the mean of
    the node models; ``extra["consensus"]`` is (1/m) Σᵢ ‖xᵢ − x̄‖² after the round.
    """

    kind = "gossip"

    def __init__(
        self,
        algorithm: GossipAlgorithm,
        model: nn.Module,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        clients: Sequence[ClientData],
        mixing: torch.Tensor,
        *,
        seed: int = 0,
        evaluate: Evaluate | None = None,
        eval_every: int = 1,
    ) -> None:
        if not isinstance(algorithm, GossipAlgorithm):
            raise TypeError(f"algorithm must be a GossipAlgorithm, got {type(algorithm).__name__}")
        super().__init__(
            algorithm, model, loss_fn, clients, seed=seed, evaluate=evaluate, eval_every=eval_every
        )
        from anyorder.federated.topology import check_mixing, neighbours

        self.mixing = check_mixing(mixing, self.num_clients)
        self.neighbours = neighbours(self.mixing)
        self.nodes: list[State] = [algorithm.init_node(self.x0, i) for i in range(self.num_clients)]

    def _identity(self) -> dict[str, Any]:
        return {**super()._identity(), "mixing": self.mixing.tolist()}

    def mean_model(self) -> torch.Tensor:
        return torch.stack([self.algorithm.node_model(n) for n in self.nodes]).mean(0)

    def global_model(self) -> torch.Tensor:
        return self.mean_model()

    def consensus_distance(self) -> float:
        models = torch.stack([self.algorithm.node_model(n) for n in self.nodes])
        return float(((models - models.mean(0)) ** 2).sum(1).mean())

    def step(self, last: bool = False) -> RoundRecord:
        alg = self.algorithm
        start = time.perf_counter()
        m = self.num_clients
        client_time = 0.0
        losses = []
        nodes = []
        for i in range(m):
            ctx = self._context(i)
            t0 = time.perf_counter()
            nodes.append(alg.local_update(self.nodes[i], ctx))
            client_time += time.perf_counter() - t0
            if math.isfinite(ctx.metrics.get("loss", math.nan)):
                losses.append(ctx.metrics["loss"])
        sent = [0] * m
        received = [0] * m
        for _ in range(alg.gossip_steps):
            messages = [alg.message(n) for n in nodes]
            sizes = [payload_bytes(msg) for msg in messages]
            mixed = []
            for i in range(m):
                inbox = [(w, messages[j]) for j, w in self.neighbours[i]]
                for j, _ in self.neighbours[i]:
                    if j != i:
                        sent[j] += sizes[j]
                        received[i] += sizes[j]
                mixed.append(alg.mix(nodes[i], inbox))
            nodes = mixed
        for i, n in enumerate(nodes):
            if not bool(torch.isfinite(alg.node_model(n)).all()):
                raise FloatingPointError(
                    f"round {self.round}: node {i}'s model is not finite; the federation was "
                    "left as it was before the round"
                )
        self.nodes = nodes
        wall = time.perf_counter() - start
        record = RoundRecord(
            round=self.round,
            participants=list(range(m)),
            dropped=[],
            rejected=[],
            bytes_up={str(i): b for i, b in enumerate(sent)},
            bytes_down={str(i): b for i, b in enumerate(received)},
            client_time_s=client_time,
            wall_time_s=wall,
            train_loss=sum(losses) / len(losses) if losses else math.nan,
            extra={"consensus": self.consensus_distance()},
        )
        record.metrics = self._metrics(self.mean_model(), last)
        self.history.append(record)
        self.round += 1
        return record

    def _payload(self) -> dict[str, Any]:
        return {"nodes": [dict(n) for n in self.nodes]}

    def _restore(self, blob: dict[str, Any]) -> None:
        nodes = _check_states(blob.get("nodes"), self.num_clients, "node", self.x0)
        for n in nodes:
            if self.algorithm.node_model(n).shape != self.x0.shape:
                raise CheckpointError("checkpoint node model has the wrong size")
        self.nodes = [dict(n) for n in nodes]
