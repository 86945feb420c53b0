"""Federated and decentralized optimization: client data partitions, algorithms written once as a
client rule plus a server (or gossip) rule (:mod:`anyorder.federated.algorithm`), and engines that
only move their payloads around (the in-process :class:`Simulator`, :class:`GossipSimulator` and
:class:`AsyncSimulator`; over torch.distributed :class:`DistributedSimulator`,
:class:`DistributedGossipSimulator`, :class:`FederationSpec` and :func:`launch`, loaded on first
use so that ``python -m anyorder.federated.multiprocess`` runs cleanly). Federated zeroth-order
training that sends seeds and scalars: :class:`FedZO`."""

from typing import Any

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
    split_like,
)
from anyorder.federated.asynchronous import AsyncSimulator, FedBuff, FedFix, skewed_times
from anyorder.federated.decentralized import DFedAvg, DFedSAM, DFedSAMMGS
from anyorder.federated.fedavg import FedAvg, FedSAM
from anyorder.federated.fedspeed import FedSpeed
from anyorder.federated.local import local_train
from anyorder.federated.mofedsam import MoFedSAM
from anyorder.federated.simulator import (
    CheckpointError,
    GossipSimulator,
    RoundRecord,
    Simulator,
    accuracy_evaluator,
)
from anyorder.federated.zeroth_order import FedZO

__all__ = [
    "ClientContext",
    "ClientData",
    "GossipAlgorithm",
    "Payload",
    "ServerAlgorithm",
    "State",
    "assign_",
    "check_finite_payload",
    "client_generator",
    "flatten",
    "payload_bytes",
    "sample_participants",
    "split_like",
    "local_train",
    "FedAvg",
    "FedSAM",
    "MoFedSAM",
    "FedSpeed",
    "DFedAvg",
    "DFedSAM",
    "DFedSAMMGS",
    "FedBuff",
    "FedFix",
    "skewed_times",
    "Simulator",
    "GossipSimulator",
    "AsyncSimulator",
    "RoundRecord",
    "CheckpointError",
    "accuracy_evaluator",
    "FedZO",
    "DistributedSimulator",
    "DistributedGossipSimulator",
    "FederationSpec",
    "launch",
]

_MULTIPROCESS = {"DistributedSimulator", "DistributedGossipSimulator", "FederationSpec", "launch"}


def __getattr__(name: str) -> Any:
    if name in _MULTIPROCESS:
        from anyorder.federated import multiprocess

        return getattr(multiprocess, name)
    raise AttributeError(f"module 'anyorder.federated' has no attribute {name!r}")
