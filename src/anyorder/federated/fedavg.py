"""FedAvg (McMahan et al., "Communication-Efficient Learning of Deep Networks from Decentralized
Data", AISTATS 2017) and FedSAM (Qu et al., "Generalized Federated Learning via Sharpness Aware
Minimization", ICML 2022; Caldarola et al., ECCV 2022): K local steps of SGD (FedAvg) or of SAM
(FedSAM) from the global model; the server adds the client-size-weighted mean of the updates.

Reference code: FL-Simulator (``server/FedAvg.py``, ``server/FedSAM.py``) averages the updates
uniformly and clips local gradients at norm 10; here the weights are the clients' example counts
by default (``weighting="uniform"`` gives the reference's), and nothing is clipped.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from anyorder.federated.algorithm import (
    ClientContext,
    Payload,
    ServerAlgorithm,
    State,
    check_positive,
)
from anyorder.federated.local import local_train
from anyorder.optim._common import check_nonnegative

__all__ = ["FedAvg", "FedSAM", "weighted_mean_update"]

WEIGHTINGS = ("size", "uniform")


def weighted_mean_update(
    ups: Sequence[tuple[int, Payload]], weighting: str, key: str = "delta"
) -> torch.Tensor | None:
    """Σᵢ pᵢ ups[i][key] over the arrived uploads, pᵢ ∝ ``num_examples`` (``"size"``) or equal
    (``"uniform"``), normalised over the arrivals; ``None`` when nothing arrived."""
    if not ups:
        return None
    stacked = torch.stack([up[key] for _, up in ups])
    if weighting == "size":
        counts = torch.stack([up["num_examples"] for _, up in ups]).to(stacked.dtype)
        weights = counts / counts.sum()
    else:
        weights = torch.full((len(ups),), 1.0 / len(ups), dtype=stacked.dtype)
    return weights @ stacked


@dataclass
class FedAvg(ServerAlgorithm):
    """FedAvg: ``local_steps`` SGD steps (``lr``, ``batch_size``, ``weight_decay``) from the
    global model x; upload Δᵢ = x_K − x and the example count nᵢ; server
    x ← x + server_lr · Σᵢ pᵢ Δᵢ with pᵢ = nᵢ / Σⱼ nⱼ over the clients that arrived (with
    ``server_lr=1``: the size-weighted mean of the client models)."""

    local_steps: int = 10
    batch_size: int = 32
    lr: float = 0.1
    weight_decay: float = 0.0
    server_lr: float = 1.0
    weighting: str = "size"

    name = "fedavg"

    def __post_init__(self) -> None:
        self.local_steps = check_positive(self.local_steps, "local_steps", integer=True)
        self.batch_size = check_positive(self.batch_size, "batch_size", integer=True)
        self.lr = check_positive(self.lr, "lr")
        self.weight_decay = check_nonnegative(self.weight_decay, "weight_decay")
        self.server_lr = check_positive(self.server_lr, "server_lr")
        if self.weighting not in WEIGHTINGS:
            raise ValueError(
                f"weighting must be one of {', '.join(WEIGHTINGS)}, got {self.weighting!r}"
            )

    def _rho(self) -> float:
        return 0.0

    def client_update(
        self, down: Payload, client: State, ctx: ClientContext
    ) -> tuple[Payload, State]:
        x = down["model"]
        x_k = local_train(
            ctx,
            x,
            steps=self.local_steps,
            batch_size=self.batch_size,
            lr=self.lr,
            rho=self._rho(),
            weight_decay=self.weight_decay,
        )
        up = {"delta": x_k - x, "num_examples": torch.tensor(ctx.num_examples, dtype=torch.int64)}
        return up, client

    def aggregate(
        self, server: State, ups: Sequence[tuple[int, Payload]], num_clients: int
    ) -> State:
        mean = weighted_mean_update(ups, self.weighting)
        if mean is None:
            return dict(server)
        return {**server, "model": server["model"] + self.server_lr * mean}


@dataclass
class FedSAM(FedAvg):
    """FedSAM: FedAvg whose local optimizer is SAM with radius ``rho`` (anyorder.optim.SAM, the
    ascent from the minibatch gradient, the descent with the gradient at the ascended point)."""

    rho: float = 0.05

    name = "fedsam"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.rho = check_positive(self.rho, "rho")

    def _rho(self) -> float:
        return self.rho
