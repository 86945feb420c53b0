"""Flower adapter (optional: ``pip install anyorder[flower]``; Flower's Message API, tested with 1.42).

For users already on Flower:

* :func:`optimizer_client_app` — a Flower ``ClientApp`` that trains the received model locally with
  **any anyorder optimizer** (``ZOSGD``, ``SAM``, ``Sophia``, ...; anything with
  ``step(closure)``) and replies with the weights and ``num-examples``, so it works with Flower's
  own strategies (``flwr.serverapp.strategy.FedAvg`` and the rest).
* :class:`AlgorithmStrategy` — a Flower ``Strategy`` running any anyorder
  :class:`~anyorder.federated.algorithm.ServerAlgorithm` (its ``downlink`` / ``aggregate``), with
  :func:`algorithm_client_app` as the matching ``ClientApp`` (its ``client_update``; the client's
  state, e.g. FedSpeed's correction, is kept in the node's ``Context.state``).
  :class:`FedSAMStrategy` and :class:`FedSpeedStrategy` are the two the issue names (Flower
  ships neither).

Conversions (:func:`to_record` / :func:`from_record`) map an anyorder payload (a dict of tensors)
to an ``ArrayRecord`` and back, exactly (dtype, shape and bytes). Client ids are the nodes'
``partition-id`` (``flower-supernode --node-config "partition-id=0"``), so the aggregation order
and each client's random stream (:func:`~anyorder.federated.algorithm.client_generator` of
(seed, round, client id)) are the simulator's. Participation is drawn from the server's
generator over the connected nodes in partition order, not with Python's global ``random`` as
Flower's strategies do.

Running offline (Flower's deployment engine; its simulation engine needs Ray): set
``FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1`` and ``FLWR_TELEMETRY_ENABLED=0``, start
``flower-superlink --insecure`` and one ``flower-supernode --insecure --superlink
127.0.0.1:9092 --clientappio-api-address 127.0.0.1:<port> --node-config "partition-id=<i>"``
per client, then ``flwr run <app dir> <federation>``; stop the processes you started by their
PIDs (``flwr run`` returns while they keep running). README.md has the full recipe.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from anyorder.core.closure import call_closure
from anyorder.federated.algorithm import (
    ClientContext,
    ClientData,
    Payload,
    ServerAlgorithm,
    check_finite_payload,
    client_generator,
    flatten,
    payload_bytes,
)
from anyorder.federated.fedavg import FedSAM
from anyorder.federated.fedspeed import FedSpeed

try:  # the optional extra
    from flwr.app import (
        ArrayRecord,
        ConfigRecord,
        Context,
        Message,
        MessageType,
        MetricRecord,
        RecordDict,
    )
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid
    from flwr.serverapp.strategy import Strategy
except ImportError as exc:  # pragma: no cover - exercised without the extra
    raise ImportError(
        "anyorder.federated.flower needs Flower: pip install 'anyorder[flower]'"
    ) from exc

__all__ = [
    "to_record",
    "from_record",
    "AlgorithmStrategy",
    "FedSAMStrategy",
    "FedSpeedStrategy",
    "algorithm_client_app",
    "optimizer_client_app",
]

STATE_KEY = "anyorder-client-state"


def to_record(payload: Payload) -> ArrayRecord:
    """An anyorder payload (dict of tensors) as a Flower ``ArrayRecord`` (CPU copies)."""
    for key, value in payload.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"payload entry {key!r} is a {type(value).__name__}, not a tensor")
    return ArrayRecord({k: v.detach().cpu() for k, v in payload.items()})


def from_record(record: ArrayRecord) -> Payload:
    """The payload back from :func:`to_record` (the same dtypes, shapes and values)."""
    return {k: v.clone() for k, v in record.to_torch_state_dict().items()}


def _client_id(context: Context) -> int:
    value = context.node_config.get("partition-id")
    if value is None:
        raise ValueError(
            "the node needs a partition id: start it with "
            "flower-supernode --node-config \"partition-id=<i>\""
        )
    return int(value)


class AlgorithmStrategy(Strategy):
    """A Flower ``Strategy`` that runs an anyorder server algorithm (module docstring).

    Args:
        algorithm: the :class:`~anyorder.federated.algorithm.ServerAlgorithm` (the same one the
            ClientApps run).
        num_clients: how many clients (partitions) the federation has.
        participation: fraction of the connected nodes trained per round.
        seed: the run's seed (participation draws; the clients' batches use it too).
        min_nodes: wait until this many nodes are connected.

    The server state lives in the strategy (``self.server``); ``start`` passes the global model
    between rounds as an ``ArrayRecord`` with one flat ``"model"`` array. ``self.rounds`` records
    per round the clients that replied, failed or were rejected (non-finite upload) and the
    payload bytes up and down.
    """

    def __init__(self, algorithm: ServerAlgorithm, num_clients: int, *, participation: float = 1.0,
                 seed: int = 0, min_nodes: int | None = None) -> None:  # fmt: skip
        if not isinstance(algorithm, ServerAlgorithm):
            raise TypeError(f"algorithm must be a ServerAlgorithm, got {type(algorithm).__name__}")
        if not isinstance(num_clients, int) or num_clients < 1:
            raise ValueError(f"num_clients must be a positive integer, got {num_clients!r}")
        if not (isinstance(participation, (int, float)) and 0 < participation <= 1):
            raise ValueError(f"participation must be in (0, 1], got {participation!r}")
        self.algorithm = algorithm
        self.num_clients = num_clients
        self.participation = float(participation)
        self.seed = int(seed)
        self.min_nodes = num_clients if min_nodes is None else int(min_nodes)
        self.server: dict[str, torch.Tensor] | None = None
        self.rounds: list[dict[str, Any]] = []
        self._down_bytes = 0

    def summary(self) -> None:
        """Flower logs the strategy's configuration through this hook (nothing to add)."""

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:  # fmt: skip
        if self.server is None:
            x0 = from_record(arrays)["model"]
            self.server = self.algorithm.init_server(x0, self.num_clients)
        nodes = sorted(grid.get_node_ids())
        while len(nodes) < self.min_nodes:  # pragma: no cover - timing dependent
            time.sleep(0.5)
            nodes = sorted(grid.get_node_ids())
        gen = client_generator(self.seed, server_round - 1, -1)
        k = max(1, round(self.participation * len(nodes)))
        chosen = sorted(nodes[int(i)] for i in torch.randperm(len(nodes), generator=gen)[:k])
        down = self.algorithm.downlink(self.server)
        self._down_bytes = payload_bytes(down)
        conf = ConfigRecord({**dict(config), "server-round": server_round, "seed": self.seed})
        return [Message(RecordDict({"down": to_record(down), "config": conf}), node,
                        MessageType.TRAIN) for node in chosen]  # fmt: skip

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:  # fmt: skip
        assert self.server is not None, "configure_train runs first"
        arrived, failed, rejected, losses, up_bytes = [], 0, [], [], 0
        for msg in replies:
            if msg.has_error():
                failed += 1
                continue
            cid = int(msg.content["metrics"]["client-id"])
            up = from_record(msg.content["up"])
            up_bytes += payload_bytes(up)
            if not check_finite_payload(up):
                rejected.append(cid)
                continue
            arrived.append((cid, up))
            loss = float(msg.content["metrics"].get("train-loss", math.nan))
            if math.isfinite(loss):
                losses.append(loss)
        arrived.sort(key=lambda item: item[0])
        server = self.algorithm.aggregate(self.server, arrived, self.num_clients)
        model = self.algorithm.global_model(server)
        if not bool(torch.isfinite(model).all()):
            raise FloatingPointError(
                f"round {server_round}: the aggregated model is not finite; the server state "
                "was left as it was"
            )
        self.server = server
        self.rounds.append({"round": server_round, "clients": [c for c, _ in arrived],
                            "failed": failed, "rejected": rejected, "bytes_up": up_bytes,
                            "bytes_down_per_client": self._down_bytes})  # fmt: skip
        metrics = MetricRecord({"train-loss": sum(losses) / len(losses) if losses else math.nan,
                                "clients": len(arrived), "bytes-up": up_bytes})  # fmt: skip
        return to_record({"model": model}), metrics

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:  # fmt: skip
        """No federated evaluation: evaluate the global model centrally (``evaluate_fn``)."""
        return []

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]
                           ) -> MetricRecord | None:  # fmt: skip
        return None


class FedSAMStrategy(AlgorithmStrategy):
    """FedSAM (Qu et al., ICML 2022) as a Flower strategy: :class:`~anyorder.federated.FedSAM`'s
    server rule; pair it with ``algorithm_client_app(strategy.algorithm, ...)``."""

    def __init__(self, num_clients: int, algorithm: FedSAM | None = None, **kwargs: Any) -> None:
        super().__init__(algorithm or FedSAM(), num_clients, **kwargs)


class FedSpeedStrategy(AlgorithmStrategy):
    """FedSpeed (Sun et al., ICLR 2023) as a Flower strategy: :class:`~anyorder.federated.
    fedspeed.FedSpeed`'s server rule; each client's correction variable stays in its node's
    ``Context.state``."""

    def __init__(self, num_clients: int, algorithm: FedSpeed | None = None, **kwargs: Any) -> None:
        super().__init__(algorithm or FedSpeed(), num_clients, **kwargs)


def algorithm_client_app(
    algorithm: ServerAlgorithm,
    model: nn.Module,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    load_data: Callable[[int], ClientData],
) -> ClientApp:
    """The ClientApp of :class:`AlgorithmStrategy`: runs ``algorithm.client_update`` on the data
    ``load_data(partition id)`` returns, from the received downlink and the state kept in the
    node's ``Context.state`` (initialised with ``algorithm.init_client`` from ``model``'s
    weights)."""
    workspace = copy.deepcopy(model)  # the user's model is never modified
    x0 = flatten(list(model.parameters()))
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        cid = _client_id(context)
        conf = msg.content["config"]
        round_index = int(conf["server-round"]) - 1
        down = from_record(msg.content["down"])
        state = (from_record(context.state[STATE_KEY]) if STATE_KEY in context.state
                 else algorithm.init_client(x0, cid))  # fmt: skip
        ctx = ClientContext(cid, load_data(cid), workspace, loss_fn,
                            client_generator(int(conf["seed"]), round_index, cid))  # fmt: skip
        up, new_state = algorithm.client_update(down, state, ctx)
        context.state[STATE_KEY] = to_record(new_state)
        metrics = MetricRecord({"client-id": cid, "num-examples": ctx.num_examples,
                                "train-loss": float(ctx.metrics.get("loss", math.nan))})  # fmt: skip
        return Message(RecordDict({"up": to_record(up), "metrics": metrics}), reply_to=msg)

    return app


def optimizer_client_app(
    model: nn.Module,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    make_optimizer: Callable[[Iterable[torch.Tensor]], torch.optim.Optimizer],
    load_data: Callable[[int], ClientData],
    *,
    local_steps: int = 10,
    batch_size: int = 32,
    seed: int = 0,
) -> ClientApp:
    """A ClientApp for Flower's own strategies: loads the received ``"arrays"`` (a state dict)
    into ``model``, takes ``local_steps`` steps of ``make_optimizer(model.parameters())`` (a
    fresh optimizer each round) on minibatches of ``batch_size`` (drawn from the client's
    generator of (seed, round, partition id)), with closures following anyorder's contract, and
    replies with the weights and ``num-examples`` / ``train-loss`` metrics."""

    model = copy.deepcopy(model)  # the user's model is never modified
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        cid = _client_id(context)
        conf = msg.content["config"]
        round_index = int(conf.get("server-round", 1)) - 1
        arrays = msg.content["arrays"]
        model.load_state_dict(arrays.to_torch_state_dict(), strict=True)
        model.train()
        data = load_data(cid)
        ctx = ClientContext(cid, data, model, loss_fn, client_generator(seed, round_index, cid))
        opt = make_optimizer(model.parameters())
        losses = []
        for inputs, targets in ctx.batches(local_steps, batch_size):

            def closure(backward: bool = True, inputs=inputs, targets=targets) -> torch.Tensor:
                loss = loss_fn(model(inputs), targets)
                if backward:
                    opt.zero_grad()
                    loss.backward()
                return loss

            with torch.enable_grad():
                loss = opt.step(closure)
            if loss is None:  # an optimizer whose step does not return the loss
                loss = call_closure(closure, backward=False)
            losses.append(float(torch.as_tensor(loss).detach().double()))
        finite = [v for v in losses if math.isfinite(v)]
        metrics = MetricRecord({"num-examples": len(data),
                                "train-loss": sum(finite) / len(finite) if finite else math.nan})  # fmt: skip
        reply = RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": metrics})
        return Message(reply, reply_to=msg)

    return app
