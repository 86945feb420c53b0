"""FedSpeed (Sun, Shen, Chen, Ding & Tao, "FedSpeed: Larger Local Interval, Less Communication
Round, and Higher Generalization Accuracy", ICLR 2023).

Client i, from the global model xᵗ, K steps of
    x ← x − lr · (g̃ + (x − xᵗ)/λ + hᵢ/λ)
with g̃ the SAM gradient (radius rho) of the minibatch loss, then hᵢ ← hᵢ + (x_K − xᵗ); the
server sets xᵗ⁺¹ = mean over the arrived clients of x_K + mean over all m clients of hᵢ.

hᵢ is the paper's prox-correction −λ·ĥᵢ. It is kept **on the client** across rounds (its state),
and the server keeps only the mean h̄ = (1/m) Σᵢ hᵢ, which it updates from the uploads
(h̄ ← h̄ + (1/m) Σ_arrived (x_K − xᵗ)); FL-Simulator's reference (``server/FedSpeed.py``) keeps
every hᵢ on the server and sends hᵢ − xᵗ down with the model: the same numbers, half the
download here. As there: the correction (x − xᵗ + hᵢ)/λ is added after SAM's second gradient at
the restored weights, the SAM ascent uses the minibatch gradient only, and the client models are
averaged uniformly (the mean h̄ is over all clients, so a size-weighted mean of x_K would not be
consistent with it). Not reproduced: the reference's gradient clipping at norm 10 and its learning
rate decay. The paper's α-mixing of g and g̃ is the reference's α = 1 (plain SAM).
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
    split_like,
)
from anyorder.federated.local import local_train
from anyorder.optim._common import check_nonnegative

__all__ = ["FedSpeed"]


@dataclass
class FedSpeed(ServerAlgorithm):
    """FedSpeed: prox-corrected local SAM steps with a per-client correction hᵢ kept across
    rounds (module docstring). ``lam`` is the paper's λ (FL-Simulator's ``lamb`` is 1/λ)."""

    local_steps: int = 10
    batch_size: int = 32
    lr: float = 0.1
    rho: float = 0.05
    lam: float = 10.0
    weight_decay: float = 0.0

    name = "fedspeed"

    def __post_init__(self) -> None:
        self.local_steps = check_positive(self.local_steps, "local_steps", integer=True)
        self.batch_size = check_positive(self.batch_size, "batch_size", integer=True)
        self.lr = check_positive(self.lr, "lr")
        self.rho = check_nonnegative(self.rho, "rho")
        self.lam = check_positive(self.lam, "lam")
        self.weight_decay = check_nonnegative(self.weight_decay, "weight_decay")

    def init_server(self, x0: torch.Tensor, num_clients: int) -> State:
        return {"model": x0.detach().clone(), "h_mean": torch.zeros_like(x0)}

    def init_client(self, x0: torch.Tensor, client_id: int) -> State:
        return {"h": torch.zeros_like(x0)}

    def client_update(
        self, down: Payload, client: State, ctx: ClientContext
    ) -> tuple[Payload, State]:
        x_t = down["model"]
        h = client["h"]
        offset = (h - x_t) / self.lam  # (x - x_t + h)/lam = x/lam + offset
        inv_lam = 1.0 / self.lam
        views: list[torch.Tensor] = []

        def correct(params: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
            if not views:
                views.extend(split_like(offset, params))
            torch._foreach_add_(grads, params, alpha=inv_lam)
            torch._foreach_add_(grads, views)

        x_k = local_train(
            ctx,
            x_t,
            steps=self.local_steps,
            batch_size=self.batch_size,
            lr=self.lr,
            rho=self.rho,
            weight_decay=self.weight_decay,
            correct=correct,
        )
        delta = x_k - x_t
        up = {"delta": delta, "num_examples": torch.tensor(ctx.num_examples, dtype=torch.int64)}
        return up, {"h": h + delta}

    def aggregate(
        self, server: State, ups: Sequence[tuple[int, Payload]], num_clients: int
    ) -> State:
        if not ups:
            return dict(server)
        deltas = torch.stack([up["delta"] for _, up in ups])
        h_mean = server["h_mean"] + deltas.sum(0) / num_clients
        return {"model": server["model"] + deltas.mean(0) + h_mean, "h_mean": h_mean}
