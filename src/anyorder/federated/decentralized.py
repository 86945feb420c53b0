"""Decentralized (gossip) algorithms: every node trains locally from its own model, then mixes
with its neighbours through a doubly stochastic matrix W (:mod:`anyorder.federated.topology`).

* DFedAvg (Sun, Li & Wang, "Decentralized Federated Averaging", TPAMI 2022, without its
  momentum): K local SGD steps, one gossip step.
* DFedSAM and DFedSAM-MGS (Shi, Shen, Li, Sun, Wang & Tao, "Improving the Model Consistency of
  Decentralized Federated Learning", ICML 2023): K local SAM steps, then one (DFedSAM) or Q
  (DFedSAM-MGS, multiple gossip steps) mixing steps zᵢ ← Σⱼ wᵢⱼ zⱼ.

Every node takes part in every round (the papers' setting).
"""

from __future__ import annotations

from dataclasses import dataclass

from anyorder.federated.algorithm import (
    ClientContext,
    GossipAlgorithm,
    State,
    check_positive,
)
from anyorder.federated.local import local_train
from anyorder.optim._common import check_nonnegative

__all__ = ["DFedAvg", "DFedSAM", "DFedSAMMGS"]


@dataclass
class DFedAvg(GossipAlgorithm):
    """K local SGD steps from the node's model, then ``gossip_steps`` mixing steps."""

    local_steps: int = 10
    batch_size: int = 32
    lr: float = 0.1
    weight_decay: float = 0.0
    gossip_steps: int = 1

    name = "dfedavg"

    def __post_init__(self) -> None:
        self.local_steps = check_positive(self.local_steps, "local_steps", integer=True)
        self.batch_size = check_positive(self.batch_size, "batch_size", integer=True)
        self.lr = check_positive(self.lr, "lr")
        self.weight_decay = check_nonnegative(self.weight_decay, "weight_decay")
        self.gossip_steps = check_positive(self.gossip_steps, "gossip_steps", integer=True)

    def _rho(self) -> float:
        return 0.0

    def local_update(self, node: State, ctx: ClientContext) -> State:
        x = local_train(
            ctx,
            node["model"],
            steps=self.local_steps,
            batch_size=self.batch_size,
            lr=self.lr,
            rho=self._rho(),
            weight_decay=self.weight_decay,
        )
        return {**node, "model": x}


@dataclass
class DFedSAM(DFedAvg):
    """DFedSAM: DFedAvg with SAM (radius ``rho``) as the local optimizer."""

    rho: float = 0.05

    name = "dfedsam"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.rho = check_positive(self.rho, "rho")

    def _rho(self) -> float:
        return self.rho


@dataclass
class DFedSAMMGS(DFedSAM):
    """DFedSAM-MGS: DFedSAM with Q = ``gossip_steps`` mixing steps per round (default 4)."""

    gossip_steps: int = 4

    name = "dfedsam-mgs"
