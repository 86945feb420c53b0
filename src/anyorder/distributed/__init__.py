"""Distributed zeroth-order training that exchanges seeds and scalars, not gradients ("Just One
Byte (per gradient)"): :class:`ZOTrainer` on ``torch.distributed`` (gloo on CPU, NCCL on GPU),
the seed log and atomic checkpoints that make runs resumable, and :func:`launch` for N local
processes."""

from anyorder.distributed.launch import DistributedJob, DistributedRun, ddp_bytes_per_step, launch
from anyorder.distributed.payload import ScalarCodec
from anyorder.distributed.seedlog import SeedLog, SeedLogError, TornLogLineWarning, atomic_save
from anyorder.distributed.trainer import (
    DEFAULT_TIMEOUT,
    ReplicaDivergenceError,
    WorkerLostError,
    ZOTrainer,
    replay,
)

__all__ = [
    "DEFAULT_TIMEOUT",
    "ZOTrainer",
    "WorkerLostError",
    "ReplicaDivergenceError",
    "replay",
    "ScalarCodec",
    "SeedLog",
    "SeedLogError",
    "TornLogLineWarning",
    "atomic_save",
    "DistributedJob",
    "DistributedRun",
    "launch",
    "ddp_bytes_per_step",
]
