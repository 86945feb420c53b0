"""MoFedSAM (Qu, Li, Duan, Liu, Tang & Lu, "Generalized Federated Learning via Sharpness Aware
Minimization", ICML 2022): FedSAM with momentum from the server. The server keeps the last
aggregated update Δ̄ and broadcasts it with the model; every local SAM step descends along
α·g̃ + (1 − α)·m, with m = −Δ̄ / (K·lr) the previous round's mean client direction (FedCM's
client-level momentum, Xu et al. 2021); the server adds server_lr · Δ̄ of this round.

Follows FL-Simulator's ``client/mofedsam.py`` / ``server/MoFedSAM.py`` (m = 0 in round 0; the
correction is applied after SAM's second gradient, at the restored weights) except: no learning
rate decay (the reference multiplies m by lr_decay to undo its decay), no gradient clipping, and
the updates are size-weighted by default (``weighting="uniform"`` gives the reference's mean).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from anyorder.federated.algorithm import ClientContext, Payload, State, check_positive, split_like
from anyorder.federated.fedavg import FedSAM, weighted_mean_update
from anyorder.federated.local import local_train

__all__ = ["MoFedSAM"]


@dataclass
class MoFedSAM(FedSAM):
    """MoFedSAM: local SAM steps along ``alpha * g̃ + (1 - alpha) * m``; the server's momentum
    Δ̄ (last aggregated update) travels down with the model (twice FedAvg's download)."""

    alpha: float = 0.1

    name = "mofedsam"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.alpha = check_positive(self.alpha, "alpha")
        if self.alpha > 1:
            raise ValueError(f"alpha must be in (0, 1], got {self.alpha!r}")

    def init_server(self, x0: torch.Tensor, num_clients: int) -> State:
        return {"model": x0.detach().clone(), "momentum": torch.zeros_like(x0)}

    def downlink(self, server: State) -> Payload:
        return {"model": server["model"], "momentum": server["momentum"]}

    def client_update(
        self, down: Payload, client: State, ctx: ClientContext
    ) -> tuple[Payload, State]:
        x = down["model"]
        # the previous round's mean direction per local step, as a gradient
        direction = down["momentum"] * (-1.0 / (self.local_steps * self.lr))
        alpha = self.alpha
        views: list[torch.Tensor] = []

        def correct(params: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
            if not views:
                views.extend(split_like(direction, params))
            torch._foreach_mul_(grads, alpha)
            torch._foreach_add_(grads, views, alpha=1.0 - alpha)

        x_k = local_train(
            ctx,
            x,
            steps=self.local_steps,
            batch_size=self.batch_size,
            lr=self.lr,
            rho=self.rho,
            weight_decay=self.weight_decay,
            correct=correct,
        )
        up = {"delta": x_k - x, "num_examples": torch.tensor(ctx.num_examples, dtype=torch.int64)}
        return up, client

    def aggregate(
        self, server: State, ups: Sequence[tuple[int, Payload]], num_clients: int
    ) -> State:
        mean = weighted_mean_update(ups, self.weighting)
        if mean is None:
            return dict(server)
        return {"model": server["model"] + self.server_lr * mean, "momentum": mean}
