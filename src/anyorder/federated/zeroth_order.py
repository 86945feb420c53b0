"""Federated zeroth-order optimization that sends seeds and scalars instead of weights.

Each client runs K local ZO-SGD steps (MeZO's two-point SPSA estimate, :class:`anyorder.optim.ZOSGD`,
or any rule of :mod:`anyorder.optim.zo`) from the global weights. A local step is fully described by
its query seeds and the projected gradients ``g = (L(w + mu z) - L(w - mu z)) / (2 mu)`` measured
there, so the client sends those pairs (:mod:`anyorder.distributed.payload`: a 4-byte seed and a
float32 or 8-bit scalar per query) instead of its weights: a round costs ``K * Q * 8`` bytes up,
not ``4 d``. Whoever holds the round's global weights (the server, and every client) *replays*
each client's pairs from them (:func:`anyorder.distributed.replay`'s rule, ``apply_queries``) and
gets that client's local model bit for bit; the new global model is the usual FedAvg average of the
replayed models, weighted by client size. This is the "Just One Byte" exchange of
:mod:`anyorder.distributed` carried over to federated rounds (as in FedKSeed / DeComFL); the
FZooS paper ("Federated Zeroth-Order Optimization using Trajectory-Informed Surrogate Gradients")
is the federated ZO setting this belongs to, without its surrogate correction.

Bit-exactness (tested): a client measures each query on a copy of its weights and restores them by
copying back (MeZO's in-place ``-mu z`` restore rounds differently per direction), then updates
with the *decoded* scalar it sends, through the same ``apply_queries`` call the replay makes. So the
replayed model equals the client's own model exactly, and a round that exchanges seeds and scalars
gives the same global weights as FedAvg over the clients' actual weights.

Departures: the clients' local optimizer state (momentum, Adam moments) starts afresh every round
(the replay rebuilds it from the pairs); a query whose loss is not finite is sent as NaN and
dropped by everyone, and a local step whose queries were all dropped leaves the weights alone.
Client sizes (the FedAvg weights) are known to the server from the partition and are not sent.
A client that missed rounds must download the pairs of each missed round (or the weights).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from anyorder.core.closure import call_closure
from anyorder.core.rng import derive_seed
from anyorder.distributed.payload import ScalarCodec, decode, encode, payload_size
from anyorder.optim.zo import ZOSGD, _ZeroOrderOptimizer

__all__ = [
    "ZOClientMessage",
    "FedZOConfig",
    "query_seed",
    "run_zo_client",
    "replay_zo_client",
    "encode_message",
    "decode_message",
]

_QUERY_TAG = 0xFED0


def query_seed(client_seed: int, step: int, query: int) -> int:
    """The 32-bit query seed of ``client_seed``'s ``query``-th direction at global step ``step``."""
    return derive_seed(int(client_seed), int(step), int(query), _QUERY_TAG) & 0xFFFFFFFF


@dataclass(frozen=True)
class FedZOConfig:
    """The clients' zeroth-order rule: ``rule`` ``"sgd"`` (:class:`~anyorder.optim.ZOSGD`, with
    ``momentum`` and ``weight_decay``) with step ``lr`` and perturbation ``mu``; ``queries``
    two-point queries per local step; ``local_steps`` steps per round; ``distribution`` of the
    directions (``"auto"`` is Rademacher: directions are drawn on the CPU so every process and
    device agrees); ``seed`` keys the directions; ``quantize_bits`` ``None`` (float32 scalars) or
    ``8`` (one byte with a scale every process derives from the pairs of earlier rounds)."""

    lr: float = 1e-3
    mu: float = 1e-3
    queries: int = 1
    local_steps: int = 10
    momentum: float = 0.0
    weight_decay: float = 0.0
    distribution: str = "auto"
    seed: int = 0
    quantize_bits: int | None = None

    def __post_init__(self) -> None:
        for name in ("queries", "local_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if self.quantize_bits not in (None, 8):
            raise ValueError(f"quantize_bits must be None or 8, got {self.quantize_bits!r}")
        # The optimizer validates lr, mu, momentum, weight_decay, distribution and seed.
        self.optimizer([torch.zeros(1, requires_grad=True)])

    def optimizer(self, params: Iterable[torch.Tensor]) -> _ZeroOrderOptimizer:
        """A fresh client optimizer over ``params`` (portable directions, one query per probe)."""
        return ZOSGD(
            params,
            lr=self.lr,
            mu=self.mu,
            momentum=self.momentum,
            weight_decay=self.weight_decay,
            distribution=self.distribution,
            seed=self.seed,
            portable_directions=True,
        )

    def message_size(self, codec: ScalarCodec) -> int:
        """Bytes of one client's message this round (``local_steps * queries`` payloads)."""
        return self.local_steps * self.queries * payload_size(codec)


@dataclass(frozen=True)
class ZOClientMessage:
    """What one client sends up in one round: per local step, its query seeds and the decoded
    projected gradients (NaN for a dropped query), and the encoded bytes that carry them."""

    client: int
    start_step: int
    queries: tuple[tuple[int, ...], ...]
    values: tuple[tuple[float, ...], ...]
    payload: torch.Tensor = field(repr=False)
    losses: tuple[float, ...] = ()

    @property
    def nbytes(self) -> int:
        """Bytes on the wire (the payload only)."""
        return int(self.payload.numel())

    @classmethod
    def received(
        cls,
        codec: ScalarCodec,
        payload: torch.Tensor,
        config: FedZOConfig,
        *,
        client: int,
        start_step: int,
    ) -> ZOClientMessage:
        """The message as the receiver decodes it from ``payload`` (the bytes that crossed)."""
        qs, gs = decode_message(codec, payload, config.local_steps, config.queries)
        return cls(client, start_step, qs, gs, payload)


def encode_message(
    codec: ScalarCodec, queries: Sequence[Sequence[int]], values: Sequence[Sequence[float]]
) -> torch.Tensor:
    """All pairs of one client's round as one uint8 tensor, local step by local step."""
    parts = [encode(codec, q, g) for qs, gs in zip(queries, values) for q, g in zip(qs, gs)]
    return torch.cat(parts) if parts else torch.empty(0, dtype=torch.uint8)


def decode_message(
    codec: ScalarCodec, payload: torch.Tensor, local_steps: int, queries: int
) -> tuple[tuple[tuple[int, ...], ...], tuple[tuple[float, ...], ...]]:
    """Inverse of :func:`encode_message`: ``(queries, values)`` per local step."""
    size = payload_size(codec)
    expected = local_steps * queries * size
    if payload.dtype != torch.uint8 or payload.numel() != expected:
        raise ValueError(
            f"a message of {local_steps} steps x {queries} queries is {expected} uint8 bytes, "
            f"got {payload.numel()} of {payload.dtype}"
        )
    seeds, values = decode(codec, payload.reshape(local_steps * queries, size))
    qs = tuple(tuple(seeds[k * queries : (k + 1) * queries]) for k in range(local_steps))
    gs = tuple(tuple(values[k * queries : (k + 1) * queries]) for k in range(local_steps))
    return qs, gs


def _apply_step(opt: _ZeroOrderOptimizer, step: int, qs: Sequence[int], gs: Sequence[float]) -> None:
    kept = [(q, g) for q, g in zip(qs, gs) if math.isfinite(g)]
    if kept:
        opt.apply_queries(step, [q for q, _ in kept], [g for _, g in kept])


@torch.no_grad()
def run_zo_client(
    model: nn.Module,
    closures: Iterable[Callable[..., Any]],
    config: FedZOConfig,
    codec: ScalarCodec,
    *,
    client: int,
    client_seed: int,
    start_step: int,
) -> ZOClientMessage:
    """Run one client's local steps on ``model`` (in place, from the global weights it holds),
    one closure per local step, and return the message it sends.

    ``start_step`` is the global step key of the first local step (round index times
    ``local_steps``), so every round and client draws fresh directions.
    """
    closures = list(closures)
    if len(closures) != config.local_steps:
        raise ValueError(
            f"need one closure per local step ({config.local_steps}), got {len(closures)}"
        )
    opt = config.optimizer([p for p in model.parameters() if p.requires_grad])
    params = [(i, p) for i, p, _ in opt._indexed()]
    tensors = [p for _, p in params]
    backup = [torch.empty_like(p) for p in tensors]
    mu = opt.estimator.mu
    all_q: list[tuple[int, ...]] = []
    all_g: list[tuple[float, ...]] = []
    losses: list[float] = []
    parts: list[torch.Tensor] = []
    for k, closure in enumerate(closures):
        step = start_step + k
        qs, raw = [], []
        for j in range(config.queries):
            seed = query_seed(client_seed, step, j)
            torch._foreach_copy_(backup, tensors)
            try:
                opt.estimator.perturb_(params, step, seed, mu)
                plus = float(torch.as_tensor(call_closure(closure, backward=False)).double())
                opt.estimator.perturb_(params, step, seed, -2 * mu)
                minus = float(torch.as_tensor(call_closure(closure, backward=False)).double())
            finally:
                torch._foreach_copy_(tensors, backup)  # exact restore, also on an exception
            losses.append((plus + minus) / 2)
            qs.append(seed)
            raw.append((plus - minus) / (2 * mu))
        # Apply exactly what the others will decode (float32 or 8-bit), so replay is bit-exact.
        part = encode_message(codec, [qs], [raw])
        _, decoded = decode_message(codec, part, 1, len(qs))
        _apply_step(opt, step, qs, decoded[0])
        parts.append(part)
        all_q.append(tuple(qs))
        all_g.append(decoded[0])
    payload = torch.cat(parts)
    return ZOClientMessage(client, start_step, tuple(all_q), tuple(all_g), payload, tuple(losses))


@torch.no_grad()
def replay_zo_client(
    model: nn.Module,
    message: ZOClientMessage,
    config: FedZOConfig,
) -> None:
    """Apply a client's pairs to ``model`` (holding the round's global weights), in place: the
    result is that client's local model, bit for bit."""
    opt = config.optimizer([p for p in model.parameters() if p.requires_grad])
    for k, (qs, gs) in enumerate(zip(message.queries, message.values)):
        _apply_step(opt, message.start_step + k, qs, gs)


def observe_round(codec: ScalarCodec, messages: Sequence[ZOClientMessage]) -> None:
    """Advance the 8-bit codec's shared scale with every value exchanged this round (all
    processes call this with the messages in the same order)."""
    codec.observe([g for m in messages for gs in m.values for g in gs])
