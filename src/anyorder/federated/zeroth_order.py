"""Federated zeroth-order optimization that sends seeds and scalars instead of weights.

Each client runs K local ZO-SGD steps (MeZO's two-point SPSA estimate through
:class:`anyorder.optim.ZOSGD`) from the global model. A local step is fully described by its query
seeds and the projected gradients ``g = (L(w + mu z) - L(w - mu z)) / (2 mu)`` measured there, so
the client uploads those pairs (:mod:`anyorder.distributed.payload`: a 4-byte seed and a float32
or 8-bit scalar per query) instead of its weights: ``K * Q * 8`` bytes, not ``4 d``. Whoever holds
the round's global model (the server, and every client) *replays* each client's pairs from it
(``apply_queries``, the rule of :func:`anyorder.distributed.replay`) and gets that client's local
model bit for bit; the new global model is FedAvg's (:func:`anyorder.federated.fedavg.
weighted_mean_update` of the replayed updates, weighted by client size). With ``sync="pairs"`` the
downlink is the previous round's pairs too, and every client folds them into its copy of the
global model exactly as the server did, so no weights travel after round 0 (in either direction).

This is the "Just One Byte" exchange of :mod:`anyorder.distributed` carried over to federated
rounds (the seed-and-scalar protocol of FedKSeed / DeComFL) in the setting of "Federated
Zeroth-Order Optimization using Trajectory-Informed Surrogate Gradients" (FZooS), without FZooS's
surrogate correction and without its reference server's "keep the old model if the global loss
did not improve" (a real server cannot evaluate the global loss).

Bit-exactness (tested): a client measures each query on its weights and restores them by copying
back (MeZO's in-place ``-mu z`` restore rounds differently per direction), then updates with the
*decoded* scalar it sends, through the same ``apply_queries`` call the replay makes; the fold of a
round is one function run by server and clients alike.

Departures and costs: directions are drawn over the flat model vector (one tensor, index 0, not
per parameter; the client evaluates the model at views of it through ``torch.func.
functional_call``); the clients' local optimizer state (momentum) starts afresh every round; a
query whose loss is not finite is sent as NaN and dropped by everyone, and a local step whose
queries were all dropped leaves the weights alone. Replaying costs a pass over the weights per
query: the server replays ``m K Q`` queries a round (m arrived clients), and with
``sync="pairs"`` so does every client. ``sync="pairs"`` needs every client in every round (a
client that missed a round cannot rebuild the model from one round's pairs and raises); with
partial participation use ``sync="model"`` (the model travels down, the pairs up).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch.func import functional_call

from anyorder.core.rng import derive_seed
from anyorder.distributed.payload import ScalarCodec, decode, encode, payload_size
from anyorder.federated.algorithm import (
    ClientContext,
    Payload,
    ServerAlgorithm,
    State,
    check_positive,
    split_like,
)
from anyorder.federated.fedavg import WEIGHTINGS, weighted_mean_update
from anyorder.optim._common import check_nonnegative
from anyorder.optim.zo import ZOSGD, _ZeroOrderOptimizer

__all__ = [
    "FedZO",
    "ZOSteps",
    "query_seed",
    "zo_local_steps",
    "replay_pairs",
    "fold_round",
    "encode_pairs",
    "decode_pairs",
]

_QUERY_TAG = 0xFED0
SYNCS = ("pairs", "model")


def query_seed(client_seed: int, step: int, query: int) -> int:
    """The 32-bit query seed of ``client_seed``'s ``query``-th direction at global step ``step``."""
    return derive_seed(int(client_seed), int(step), int(query), _QUERY_TAG) & 0xFFFFFFFF


def encode_pairs(
    codec: ScalarCodec, queries: Sequence[Sequence[int]], values: Sequence[Sequence[float]]
) -> torch.Tensor:
    """Pairs of local steps as one uint8 tensor, step by step (:func:`anyorder.distributed.
    payload.encode` per query)."""
    parts = [encode(codec, q, g) for qs, gs in zip(queries, values) for q, g in zip(qs, gs)]
    return torch.cat(parts) if parts else torch.empty(0, dtype=torch.uint8)


def decode_pairs(
    codec: ScalarCodec, payload: torch.Tensor, queries: int
) -> tuple[list[list[int]], list[list[float]]]:
    """Inverse of :func:`encode_pairs` for ``queries`` queries per step."""
    size = payload_size(codec) * queries
    if payload.dtype != torch.uint8 or payload.dim() != 1 or payload.numel() % size:
        raise ValueError(
            f"pairs of {queries} queries per step are a 1-D uint8 tensor of a multiple of {size} "
            f"bytes, got shape {tuple(payload.shape)} of {payload.dtype}"
        )
    steps = payload.numel() // size
    seeds, values = decode(codec, payload.reshape(steps * queries, payload_size(codec)))
    qs = [seeds[k * queries : (k + 1) * queries] for k in range(steps)]
    gs = [values[k * queries : (k + 1) * queries] for k in range(steps)]
    return qs, gs


def _optimizer(w: torch.Tensor, lr: float, mu: float, momentum: float, weight_decay: float,
               seed: int) -> _ZeroOrderOptimizer:  # fmt: skip
    return ZOSGD([w], lr=lr, mu=mu, momentum=momentum, weight_decay=weight_decay,
                 distribution="rademacher", seed=seed, portable_directions=True)  # fmt: skip


def _apply_step(opt: _ZeroOrderOptimizer, step: int, qs: Sequence[int], gs: Sequence[float]) -> bool:
    kept = [(q, g) for q, g in zip(qs, gs) if math.isfinite(g)]
    if kept:
        opt.apply_queries(step, [q for q, _ in kept], [g for _, g in kept])
    return bool(kept)


@dataclass(frozen=True)
class ZOSteps:
    """The rule's hyperparameters: ZO-SGD step ``lr`` (``momentum``, ``weight_decay`` as in
    ``torch.optim.SGD``), perturbation ``mu``, ``queries`` two-point queries per step, direction
    ``seed``; Rademacher directions drawn on the CPU (every process and device agrees)."""

    lr: float
    mu: float
    queries: int = 1
    momentum: float = 0.0
    weight_decay: float = 0.0
    seed: int = 0

    def optimizer(self, w: torch.Tensor) -> _ZeroOrderOptimizer:
        return _optimizer(w, self.lr, self.mu, self.momentum, self.weight_decay, self.seed)


@torch.no_grad()
def zo_local_steps(
    x: torch.Tensor,
    losses: Sequence[Callable[[torch.Tensor], torch.Tensor | float]],
    rule: ZOSteps,
    codec: ScalarCodec,
    *,
    client_seed: int,
    start_step: int,
) -> tuple[torch.Tensor, torch.Tensor, list[float], int]:
    """Run one local step per ``losses[k]`` (the loss at flat weights on step k's batch) from
    the flat model ``x`` (not modified). Returns ``(x_K, pairs, mean losses, dropped steps)``;
    ``pairs`` is the uint8 upload (:func:`encode_pairs`)."""
    w = x.detach().clone().requires_grad_(True)  # the optimizer trains tensors that need grad
    opt = rule.optimizer(w)
    backup = torch.empty_like(w)
    mu = rule.mu
    parts, means, dropped = [], [], 0
    for k, loss_at in enumerate(losses):
        step = start_step + k
        qs, raw = [], []
        for j in range(rule.queries):
            seed = query_seed(client_seed, step, j)
            backup.copy_(w)
            try:
                opt.estimator.perturb_([(0, w)], step, seed, mu)
                plus = float(torch.as_tensor(loss_at(w)).double())
                opt.estimator.perturb_([(0, w)], step, seed, -2 * mu)
                minus = float(torch.as_tensor(loss_at(w)).double())
            finally:
                w.copy_(backup)  # exact restore, also when the closure raises
            means.append((plus + minus) / 2)
            qs.append(seed)
            raw.append((plus - minus) / (2 * mu))
        # Apply exactly what the others decode (float32 or 8-bit), so the replay is bit-exact.
        part = encode_pairs(codec, [qs], [raw])
        _, decoded = decode_pairs(codec, part, len(qs))
        dropped += not _apply_step(opt, step, qs, decoded[0])
        parts.append(part)
    pairs = torch.cat(parts) if parts else torch.empty(0, dtype=torch.uint8)
    return w.detach(), pairs, means, dropped


@torch.no_grad()
def replay_pairs(
    x: torch.Tensor, pairs: torch.Tensor, rule: ZOSteps, codec: ScalarCodec, start_step: int
) -> torch.Tensor:
    """The client model that produced ``pairs`` from the flat model ``x`` (bit for bit)."""
    w = x.detach().clone().requires_grad_(True)
    opt = rule.optimizer(w)
    qs, gs = decode_pairs(codec, pairs, rule.queries)
    for k, (q, g) in enumerate(zip(qs, gs)):
        _apply_step(opt, start_step + k, q, g)
    return w.detach()


def fold_round(
    x: torch.Tensor,
    uploads: Sequence[tuple[torch.Tensor, torch.Tensor]],
    rule: ZOSteps,
    codec: ScalarCodec,
    *,
    start_step: int,
    weighting: str,
    server_lr: float,
) -> torch.Tensor:
    """One round's new global model from the old one and the arrived uploads ``(pairs,
    num_examples)`` in client order: FedAvg over the replayed client models. Server and clients
    run this same function, so they agree bit for bit. Then the codec observes the round's
    values (the shared 8-bit scale)."""
    ups = []
    for i, (pairs, count) in enumerate(uploads):
        x_i = replay_pairs(x, pairs, rule, codec, start_step)
        ups.append((i, {"delta": x_i - x, "num_examples": count}))
    mean = weighted_mean_update(ups, weighting)
    values = [g for pairs, _ in uploads for gs in decode_pairs(codec, pairs, rule.queries)[1]
              for g in gs]  # fmt: skip
    codec.observe(values)
    return x.clone() if mean is None else x + server_lr * mean


def _codec(bits: int | None, scale: torch.Tensor) -> ScalarCodec:
    codec = ScalarCodec(bits=bits)
    value = float(scale)
    codec.mean_abs = None if math.isnan(value) else value
    return codec


def _scale(codec: ScalarCodec) -> torch.Tensor:
    return torch.tensor(math.nan if codec.mean_abs is None else codec.mean_abs, dtype=torch.float64)


@dataclass
class FedZO(ServerAlgorithm):
    """Federated zeroth-order SGD over seeds and scalars (module docstring).

    ``local_steps`` ZO-SGD steps (``lr``, ``mu``, ``queries`` per step, ``momentum``,
    ``weight_decay``) on minibatches of ``batch_size``; upload: the pairs and the example count;
    server: ``x <- x + server_lr * sum_i p_i (x_i - x)`` with ``x_i`` replayed from the pairs and
    ``p_i`` by ``weighting`` (as :class:`~anyorder.federated.FedAvg`). ``seed`` keys the
    directions (client i's query seeds are derived from ``(seed, i)``); ``quantize_bits=8`` sends
    each scalar as one byte (:class:`anyorder.distributed.ScalarCodec`, with the scale every party
    derives from the earlier rounds' values). ``sync``: ``"pairs"`` (the downlink is the last
    round's pairs; every client must take part in every round) or ``"model"`` (the downlink is the
    model).
    """

    local_steps: int = 10
    batch_size: int = 32
    lr: float = 1e-3
    mu: float = 1e-3
    queries: int = 1
    momentum: float = 0.0
    weight_decay: float = 0.0
    server_lr: float = 1.0
    weighting: str = "size"
    seed: int = 0
    quantize_bits: int | None = None
    sync: str = "pairs"

    name = "fedzo"
    #: the last fold a client computed (in one process, every client folds the same round from
    #: the same model: the simulator and a rank hosting several clients do it once); a memo of
    #: a pure function, keyed by digests of its inputs, never part of the hyperparameters
    _memo: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.local_steps = check_positive(self.local_steps, "local_steps", integer=True)
        self.batch_size = check_positive(self.batch_size, "batch_size", integer=True)
        self.queries = check_positive(self.queries, "queries", integer=True)
        self.lr = check_positive(self.lr, "lr")
        self.mu = check_positive(self.mu, "mu")
        self.weight_decay = check_nonnegative(self.weight_decay, "weight_decay")
        self.server_lr = check_positive(self.server_lr, "server_lr")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise ValueError(f"seed must be an integer >= 0, got {self.seed!r}")
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {', '.join(WEIGHTINGS)}, got {self.weighting!r}")
        if self.quantize_bits not in (None, 8):
            raise ValueError(f"quantize_bits must be None (float32) or 8, got {self.quantize_bits!r}")
        if self.sync not in SYNCS:
            raise ValueError(f"sync must be one of {', '.join(SYNCS)}, got {self.sync!r}")

    @property
    def rule(self) -> ZOSteps:
        return ZOSteps(self.lr, self.mu, self.queries, self.momentum, self.weight_decay, self.seed)

    def upload_bytes(self) -> int:
        """Bytes of one client's upload: its pairs and its 8-byte example count."""
        per_query = payload_size(ScalarCodec(bits=self.quantize_bits, mean_abs=1.0))
        return self.local_steps * self.queries * per_query + 8

    def _fold(self, x: torch.Tensor, pairs: torch.Tensor, counts: torch.Tensor, scale: torch.Tensor,
              round_index: int) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        codec = _codec(self.quantize_bits, scale)
        per_client = self.local_steps * self.queries * payload_size(codec)
        uploads = [(pairs[k * per_client : (k + 1) * per_client], counts[k])
                   for k in range(counts.numel())]  # fmt: skip
        new = fold_round(x, uploads, self.rule, codec, start_step=round_index * self.local_steps,
                         weighting=self.weighting, server_lr=self.server_lr)  # fmt: skip
        return new, _scale(codec)

    def _client_fold(self, client: State, down: Payload, have: int) -> tuple[torch.Tensor, torch.Tensor]:
        digest = hashlib.blake2b(digest_size=16)
        for t in (client["model"], client["scale"], down["pairs"], down["counts"]):
            digest.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
        key = (have, str(client["model"].dtype), digest.hexdigest())
        if key not in self._memo:
            self._memo.clear()
            self._memo[key] = self._fold(client["model"], down["pairs"], down["counts"],
                                         client["scale"], have)  # fmt: skip
        x, scale = self._memo[key]
        return x.clone(), scale.clone()

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_memo": {}}  # the memo never travels

    # -- the interface -------------------------------------------------------------------------
    def init_server(self, x0: torch.Tensor, num_clients: int) -> State:
        return {"model": x0.detach().clone(), "round": torch.tensor(0, dtype=torch.int64),
                "pairs": torch.empty(0, dtype=torch.uint8),
                "counts": torch.empty(0, dtype=torch.int64),
                "scale": torch.tensor(math.nan, dtype=torch.float64)}  # fmt: skip

    def init_client(self, x0: torch.Tensor, client_id: int) -> State:
        if self.sync == "model":
            return {}
        return {"model": x0.detach().clone(), "round": torch.tensor(0, dtype=torch.int64),
                "scale": torch.tensor(math.nan, dtype=torch.float64)}  # fmt: skip

    def downlink(self, server: State) -> Payload:
        if self.sync == "model":
            down = {"model": server["model"], "round": server["round"]}
            if self.quantize_bits is not None:
                down["scale"] = server["scale"]
            return down
        return {"round": server["round"], "pairs": server["pairs"], "counts": server["counts"]}

    def client_update(
        self, down: Payload, client: State, ctx: ClientContext
    ) -> tuple[Payload, State]:
        r = int(down["round"])
        if self.sync == "model":
            x = down["model"]
            scale = down.get("scale", torch.tensor(math.nan, dtype=torch.float64))
        else:
            have = int(client["round"])
            if have == r:
                x, scale = client["model"], client["scale"]
            elif have == r - 1:
                x, scale = self._client_fold(client, down, have)
            else:
                raise ValueError(
                    f"client {ctx.client_id} holds the model of round {have} but the server is at "
                    f"round {r}: sync='pairs' needs every client in every round; use "
                    "sync='model' with partial participation"
                )
        params = list(ctx.model.parameters())
        names = [n for n, _ in ctx.model.named_parameters()]
        ctx.model.train()

        def loss_on(inputs: torch.Tensor, targets: torch.Tensor):
            def loss_at(w: torch.Tensor) -> torch.Tensor:
                views = dict(zip(names, split_like(w, params)))
                return ctx.loss_fn(functional_call(ctx.model, views, (inputs,)), targets)

            return loss_at

        losses = [loss_on(i, t) for i, t in ctx.batches(self.local_steps, self.batch_size)]
        codec = _codec(self.quantize_bits, scale)
        _, pairs, means, dropped = zo_local_steps(
            x, losses, self.rule, codec, client_seed=derive_seed(self.seed, ctx.client_id),
            start_step=r * self.local_steps,
        )  # fmt: skip
        finite = [v for v in means if math.isfinite(v)]
        ctx.metrics["loss"] = sum(finite) / len(finite) if finite else float("nan")
        ctx.metrics["skipped_steps"] = float(dropped)
        up = {"pairs": pairs, "num_examples": torch.tensor(ctx.num_examples, dtype=torch.int64)}
        if self.sync == "model":
            return up, client
        return up, {"model": x, "round": torch.tensor(r, dtype=torch.int64), "scale": scale}

    def aggregate(
        self, server: State, ups: Sequence[tuple[int, Payload]], num_clients: int
    ) -> State:
        r = int(server["round"])
        pairs = torch.cat([up["pairs"] for _, up in ups]) if ups else torch.empty(0, dtype=torch.uint8)
        counts = (torch.stack([up["num_examples"].reshape(()) for _, up in ups]) if ups
                  else torch.empty(0, dtype=torch.int64))  # fmt: skip
        x, scale = self._fold(server["model"], pairs, counts, server["scale"], r)
        return {"model": x, "round": torch.tensor(r + 1, dtype=torch.int64), "pairs": pairs,
                "counts": counts, "scale": scale}  # fmt: skip
