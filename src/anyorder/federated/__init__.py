"""Federated and decentralized optimization: client data partitions, algorithms written once as a
client rule plus a server (or gossip) rule (:mod:`anyorder.federated.algorithm`), and engines that
only move their payloads around (the in-process :class:`Simulator`, :class:`GossipSimulator` and
:class:`AsyncSimulator`)."""

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
]
