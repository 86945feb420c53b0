"""Federated and decentralized optimization: client data partitions, algorithms written once as a
client rule plus a server (or gossip) rule (:mod:`anyorder.federated.algorithm`), and engines that
only move their payloads around."""

from anyorder.federated.algorithm import (
    ClientContext,
    ClientData,
    GossipAlgorithm,
    Payload,
    ServerAlgorithm,
    State,
    assign_,
    client_generator,
    flatten,
    payload_bytes,
    split_like,
)
from anyorder.federated.fedavg import FedAvg, FedSAM
from anyorder.federated.local import local_train

__all__ = [
    "ClientContext",
    "ClientData",
    "GossipAlgorithm",
    "Payload",
    "ServerAlgorithm",
    "State",
    "assign_",
    "client_generator",
    "flatten",
    "payload_bytes",
    "split_like",
    "FedAvg",
    "FedSAM",
    "local_train",
]
