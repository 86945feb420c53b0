"""The algorithm interface every federated engine runs (DESIGN.md, federated/).

An algorithm is two pure pieces: what a **client** does with what the server sent and its own data,
and how the **server** (or a **gossip** step between neighbours) combines what came back. An engine
(the in-process simulator, a ``torch.distributed`` engine, a Flower adapter) only moves payloads
around and keeps each party's state; it never looks inside them.

Vocabulary (all tensors, so that everything checkpoints through ``torch.save`` and loads with
``weights_only=True``, and every object here pickles):

* a **model** is one flat 1-D tensor ``x`` (all parameters of a ``nn.Module`` concatenated in
  ``parameters()`` order; :func:`flatten` / :func:`assign_`). Buffers (BatchNorm statistics) are
  not federated: each workspace keeps its own.
* a :data:`Payload` is a ``dict[str, torch.Tensor]``: what travels between parties, exactly. Bytes
  are counted from it (:func:`payload_bytes`: ``numel * element_size`` summed), never estimated:
  whatever an algorithm needs on the other side (client size, momentum, ...) must be in it.
* a :data:`State` is a ``dict[str, torch.Tensor]`` kept by one party between rounds: the server's
  (global model, momentum, running means), a client's (FedSpeed's correction hᵢ), a gossip node's
  (its own model).

Server-based algorithms (:class:`ServerAlgorithm`) define, per round t::

    down  = alg.downlink(server_state)                               # same for every client
    up_i, client_state_i = alg.client_update(down, client_state_i, ctx_i)   # selected clients
    server_state = alg.aggregate(server_state, [(i, up_i) for arrived i], num_clients)

An engine picks the participating clients, runs ``client_update`` wherever client i lives, sends
``down`` and ``up_i`` (counting their bytes), drops clients that fail (the aggregate simply omits
them: the algorithm's own rule for partial participation decides what that means) and calls
``aggregate`` once with the arrivals in increasing client id (so that the float sums are the same
on every engine). Client states persist across rounds where the client lives; a client that never
took part has ``alg.init_client(x0, i)``; an engine that discards an upload (a client that drops
after computing, or whose payload is not finite: :func:`check_finite_payload`) keeps that
client's previous state, so that client and server states stay consistent.
Participants and dropouts come from :func:`sample_participants`, so every engine picks the same.

Decentralized algorithms (:class:`GossipAlgorithm`) have no server: every node keeps a state,
per round::

    node_i = alg.local_update(node_i, ctx_i)                         # every node
    repeat alg.gossip_steps times:
        msg_j = alg.message(node_j)                                   # sent to each neighbour
        node_i = alg.mix(node_i, [(w_ij, msg_j) for j with w_ij != 0, including j == i])

with ``w_ij`` a row of the doubly stochastic mixing matrix (:mod:`anyorder.federated.topology`),
given in increasing ``j`` (:func:`anyorder.federated.topology.neighbours`).

Randomness: every draw a client makes comes from ``ctx.generator``, which the engine builds with
:func:`client_generator` from (run seed, round, client id): any engine on any process gives the
same batches, and a checkpoint need only store the seed and the round. The server's draws
(participation, dropouts) use :func:`client_generator` with ``client_id=-1``.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = [
    "Payload",
    "State",
    "payload_bytes",
    "flatten",
    "assign_",
    "split_like",
    "ClientData",
    "ClientContext",
    "client_generator",
    "ServerAlgorithm",
    "GossipAlgorithm",
    "check_finite_payload",
    "sample_participants",
]

Payload = dict[str, torch.Tensor]
State = dict[str, torch.Tensor]


def payload_bytes(payload: Payload) -> int:
    """Bytes of ``payload`` as it travels: ``numel * element_size`` of every tensor, summed (the
    keys are a fixed protocol known to both sides and are not counted)."""
    total = 0
    for key, value in payload.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(
                f"payload entry {key!r} is a {type(value).__name__}; payloads hold tensors only"
            )
        total += value.numel() * value.element_size()
    return total


def check_finite_payload(payload: Payload) -> bool:
    """Whether every floating-point tensor in ``payload`` is finite (engines drop, and record,
    an upload that is not: non-finite values never reach the global model)."""
    for value in payload.values():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            return False
    return True


def flatten(params: Sequence[torch.Tensor]) -> torch.Tensor:
    """The parameters concatenated into one new 1-D tensor (a copy)."""
    with torch.no_grad():
        return torch.cat([p.detach().reshape(-1) for p in params])


def split_like(vec: torch.Tensor, params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Views of the flat ``vec`` shaped like ``params`` (no copy)."""
    sizes = [p.numel() for p in params]
    if sum(sizes) != vec.numel():
        raise ValueError(
            f"a vector of {vec.numel()} elements cannot fill parameters of {sum(sizes)} elements"
        )
    return [v.view_as(p) for v, p in zip(torch.split(vec, sizes), params)]


def assign_(params: Sequence[torch.Tensor], vec: torch.Tensor) -> None:
    """Copy the flat ``vec`` into ``params`` in place (the parameters never alias ``vec``)."""
    with torch.no_grad():
        torch._foreach_copy_(list(params), split_like(vec, params))


def client_generator(seed: int, round_index: int, client_id: int) -> torch.Generator:
    """A CPU generator for (run seed, round, client id), the same on every engine and process.

    The seed is a 63-bit hash of the three integers (``client_id=-1`` is the server)."""
    digest = hashlib.blake2b(
        f"{int(seed)}/{int(round_index)}/{int(client_id)}".encode(), digest_size=8
    ).digest()
    gen = torch.Generator()
    gen.manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))
    return gen


def sample_participants(
    seed: int, round_index: int, num_clients: int, participation: float, dropout: float
) -> tuple[list[int], list[int]]:
    """Round ``round_index``'s (participants, dropped), both sorted, from the server's generator
    ``client_generator(seed, round_index, -1)``: ``max(1, round(participation * m))`` clients
    uniformly without replacement (all of them when that is m), then each independently drops
    out with probability ``dropout``. Every engine calls this, so all pick the same clients."""
    gen = client_generator(seed, round_index, -1)
    k = max(1, round(participation * num_clients))
    if k < num_clients:
        chosen = sorted(int(i) for i in torch.randperm(num_clients, generator=gen)[:k])
    else:
        chosen = list(range(num_clients))
    drops = torch.rand(len(chosen), generator=gen, dtype=torch.float64) < dropout
    return chosen, [i for i, d in zip(chosen, drops.tolist()) if d]


@dataclass
class ClientData:
    """One client's examples as tensors (``inputs[k]`` with label ``targets[k]``)."""

    inputs: torch.Tensor
    targets: torch.Tensor

    def __post_init__(self) -> None:
        if len(self.inputs) != len(self.targets):
            raise ValueError(
                f"inputs and targets differ in length: {len(self.inputs)} != {len(self.targets)}"
            )

    def __len__(self) -> int:
        return len(self.targets)


@dataclass
class ClientContext:
    """What a client rule may use besides the payload and its state.

    ``model`` is a workspace module of the federation's architecture: the client rule writes the
    parameters it starts from into it (:func:`assign_`), so its previous contents never matter.
    ``generator`` is the client's random stream for this round (:func:`client_generator`).
    ``metrics`` is filled by the rule for the engine's logs (local loss, skipped steps); it never
    travels and never changes the maths.
    """

    client_id: int
    data: ClientData
    model: nn.Module
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    generator: torch.Generator
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def num_examples(self) -> int:
        return len(self.data)

    def batches(self, steps: int, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``steps`` minibatches of ``min(batch_size, n)`` examples: the client's data is shuffled
        (with ``generator``) and cut into consecutive batches, reshuffled when it runs out (a
        batch never straddles two shuffles)."""
        n = len(self.data)
        if n == 0:
            raise ValueError(f"client {self.client_id} has no examples")
        size = min(int(batch_size), n)
        order = torch.randperm(n, generator=self.generator)
        pos = 0
        for _ in range(int(steps)):
            if pos + size > n:
                order = torch.randperm(n, generator=self.generator)
                pos = 0
            idx = order[pos : pos + size]
            pos += size
            yield self.data.inputs[idx], self.data.targets[idx]


class ServerAlgorithm:
    """A server-based federated algorithm: a client rule and a server rule (module docstring).

    Subclasses are dataclasses of hyperparameters (picklable, no tensors of a run) and implement
    the four rules below; all are pure functions of their arguments except that ``client_update``
    uses ``ctx.model`` as scratch space and ``ctx.generator`` for its draws. Returned states are
    new dicts (inputs are never modified in place), so an engine may keep the old ones for a
    checkpoint or a retry.
    """

    name: str = "server-algorithm"

    def init_server(self, x0: torch.Tensor, num_clients: int) -> State:
        """The server's state before round 0 (``x0``: the initial flat model)."""
        return {"model": x0.detach().clone()}

    def init_client(self, x0: torch.Tensor, client_id: int) -> State:
        """A client's state before it first takes part (empty for stateless clients)."""
        return {}

    def downlink(self, server: State) -> Payload:
        """What the server sends to every selected client this round."""
        return {"model": server["model"]}

    def client_update(
        self, down: Payload, client: State, ctx: ClientContext
    ) -> tuple[Payload, State]:
        """Local work on ``ctx.data`` from ``down``: returns (upload, new client state)."""
        raise NotImplementedError

    def aggregate(
        self, server: State, ups: Sequence[tuple[int, Payload]], num_clients: int
    ) -> State:
        """The server's new state from the uploads that arrived (client id, payload), in
        increasing client id; ``ups`` may be empty (every selected client dropped)."""
        raise NotImplementedError

    def global_model(self, server: State) -> torch.Tensor:
        """The flat model to evaluate."""
        return server["model"]

    def hyperparameters(self) -> dict[str, Any]:
        """The hyperparameters as a JSON-able dict (for reports and checkpoints)."""
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}


class GossipAlgorithm:
    """A decentralized algorithm: a local rule and a gossip (mixing) rule (module docstring)."""

    name: str = "gossip-algorithm"
    gossip_steps: int = 1

    def init_node(self, x0: torch.Tensor, node_id: int) -> State:
        """Node ``node_id``'s state before round 0 (every node starts from ``x0``)."""
        return {"model": x0.detach().clone()}

    def local_update(self, node: State, ctx: ClientContext) -> State:
        """The node's local work on its own data."""
        raise NotImplementedError

    def message(self, node: State) -> Payload:
        """What the node sends to each neighbour in one gossip step."""
        return {"model": node["model"]}

    def mix(self, node: State, received: Sequence[tuple[float, Payload]]) -> State:
        """One gossip step: ``received`` holds (w_ij, message of j) for every j with w_ij != 0,
        the node itself included, in increasing j. Default: the weighted sum of the models."""
        models = [m["model"] for _, m in received]
        weights = torch.tensor([float(w) for w, _ in received], dtype=models[0].dtype)
        mixed = weights @ torch.stack(models)
        return {**node, "model": mixed}

    def node_model(self, node: State) -> torch.Tensor:
        return node["model"]

    def hyperparameters(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}


def check_positive(value: Any, name: str, integer: bool = False) -> Any:
    """``value`` if it is a positive (finite) number, else ``ValueError`` naming it."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if integer:
        ok = ok and float(value) == int(value)
    if not ok or not math.isfinite(value) or value <= 0:
        kind = "a positive integer" if integer else "a positive number"
        raise ValueError(f"{name} must be {kind}, got {value!r}")
    return int(value) if integer else float(value)
