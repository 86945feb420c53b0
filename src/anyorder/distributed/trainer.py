"""``ZOTrainer``: distributed zeroth-order training that exchanges seeds and scalars, not gradients.

"Just One Byte (per gradient)": in a process group of N ranks, each rank measures one two-point
SPSA query on its own data, ``g_r = (L(w + mu z_r) - L(w - mu z_r)) / (2 mu)``, with a direction
``z_r`` keyed by its own query seed. The ranks all-gather the ``(seed, g)`` pairs (8 bytes per rank,
5 with 8-bit scalars) and every rank applies the same update, the N-query estimate
``(1/N) sum_r g_r z_r`` fed to the wrapped optimizer's rule, regenerating each ``z_r`` from its
seed, in rank order. No gradient or weight is ever sent, and replicas stay bit-identical:

* directions are drawn on the CPU by a counter-based keyed generator (the wrapped optimizer's
  ``portable_directions`` is switched on), so every rank draws the same numbers on any device;
* each rank evaluates its perturbed weights and then **copies the weights back** from a buffer
  instead of subtracting ``mu z`` (MeZO's in-place restore rounds differently for every ``z``, so
  replicas would drift apart by ulps). The price: one copy of the weights in memory;
* a cheap periodic check all-gathers an 8-byte hash of the weights and raises
  :class:`ReplicaDivergenceError` if they differ.

Fault tolerance: rank 0 appends every step's pairs to a seed log before the update and writes
atomic checkpoints; :meth:`ZOTrainer.resume` loads the last checkpoint and replays the log, so a
restarted group (after a crash, or a change of membership: ``torchrun --nnodes=MIN:MAX`` restarts
all workers, which then resume) continues from the last logged step with nothing lost. A rank that
dies makes the others' next collective fail; they raise :class:`WorkerLostError` and leave the
checkpoint and log intact.
"""

from __future__ import annotations

import copy
import hashlib
import math
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from anyorder.core.files import CheckpointError, load_checkpoint
from anyorder.core.rng import derive_seed
from anyorder.distributed.payload import ScalarCodec, decode, encode
from anyorder.distributed.seedlog import SeedLog, SeedLogError, atomic_save
from anyorder.optim.zo import _ZeroOrderOptimizer

__all__ = ["ZOTrainer", "WorkerLostError", "ReplicaDivergenceError", "replay", "DEFAULT_TIMEOUT"]

#: Process-group timeout we recommend (``dist.init_process_group(timeout=...)``): a dead peer is
#: usually detected at once (connection reset), at the latest after this.
DEFAULT_TIMEOUT = timedelta(seconds=60)

#: Words in gloo's / NCCL's errors when a peer is gone (anything else is re-raised as is).
_LOST_PEER = ("connection", "closed", "reset", "timed out", "timeout", "peer", "broken pipe")

CHECKPOINT = "checkpoint.pt"
SEED_LOG = "seeds.jsonl"


class WorkerLostError(RuntimeError):
    """A peer left the process group (killed, crashed or timed out) during a collective."""


class ReplicaDivergenceError(RuntimeError):
    """The ranks' weights are no longer bit-identical."""


def _check_checkpoint(state: Any, path: Path) -> None:
    """A loaded checkpoint must be the trainer's: a dict with these entries."""
    keys = {"model", "optimizer", "codec", "step"}
    if not isinstance(state, dict) or not keys <= set(state):
        got = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(
            f"checkpoint {str(path)!r} is not a ZOTrainer checkpoint: expected the entries "
            f"{sorted(keys)}, got {got}"
        )


def replay(
    optimizer: _ZeroOrderOptimizer,
    entries: Any,
    codec: ScalarCodec | None = None,
) -> int:
    """Apply logged steps ``(step, queries, values)`` in order; returns the number applied.

    One process replaying the sequence the ranks exchanged reproduces their weights bit for bit
    (the same :meth:`~anyorder.optim.zo._ZeroOrderOptimizer.apply_queries` calls in the same
    order). ``codec``: keep an 8-bit codec's shared scale in step, as the live run did.
    """
    count = 0
    for step, queries, values in entries:
        if codec is not None:
            codec.observe(values)
        if queries:
            optimizer.apply_queries(step, queries, values)
        else:
            optimizer.global_state["step"] = step + 1
        count += 1
    return count


class ZOTrainer:
    """Wraps a :class:`~anyorder.optim.ZOSGD` / :class:`~anyorder.optim.ZOAdam` for a process group.

    Args:
        model: the module whose parameters the optimizer trains (checkpoints save it).
        optimizer: a zeroth-order optimizer with ``n_queries=1`` and two-point estimates; its
            ``mu``, ``lr`` and rule are used as is, its seed keys the directions.
        quantize_bits: ``None`` (float32 scalars) or ``8`` (one byte, with a scale every rank
            derives from the values already exchanged; error in :meth:`report`).
        check_every: all-gather a weight hash every this many steps (0: never).
        checkpoint_dir: where rank 0 keeps ``checkpoint.pt`` and the seed log (``None``: no fault
            tolerance). Every rank must be able to read it to :meth:`resume`.
        checkpoint_every: steps between checkpoints (the log covers the steps in between).
        worker_seed: this rank's seed for its query seeds (default: its rank).
        group: the process group (default: the world; without an initialised process group the
            trainer runs as a single rank).

    ``step(closure)`` returns this rank's mean loss of the step (the losses at ``w ± mu z_r``).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: _ZeroOrderOptimizer,
        *,
        quantize_bits: int | None = None,
        check_every: int = 100,
        checkpoint_dir: str | Path | None = None,
        checkpoint_every: int = 100,
        worker_seed: int | None = None,
        group: Any = None,
        fsync_log: bool = False,
    ) -> None:
        if not isinstance(optimizer, _ZeroOrderOptimizer):
            raise TypeError(
                f"optimizer must be anyorder's ZOSGD or ZOAdam, got {type(optimizer).__name__}"
            )
        est = optimizer.estimator
        if est.n_queries != 1 or est.one_sided:
            raise ValueError(
                "each rank measures one two-point query: build the optimizer with n_queries=1 and "
                f"one_sided=False (got n_queries={est.n_queries}, one_sided={est.one_sided})"
            )
        for name, value in (("check_every", check_every), ("checkpoint_every", checkpoint_every)):
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
        est.portable = True  # the same directions on every rank, whatever its device
        self.model = model
        self.optimizer = optimizer
        self.group = group
        self.distributed = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank(group) if self.distributed else 0
        self.world = dist.get_world_size(group) if self.distributed else 1
        self.worker_seed = self.rank if worker_seed is None else int(worker_seed)
        self.codec = ScalarCodec(bits=quantize_bits)
        self.check_every = check_every
        self.checkpoint_every = checkpoint_every
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.log = (
            SeedLog(self.checkpoint_dir / SEED_LOG, fsync=fsync_log)
            if self.checkpoint_dir is not None and self.rank == 0
            else None
        )
        self._backup: list[torch.Tensor] | None = None
        self._dir_checked = self.checkpoint_dir is None  # see _check_unclaimed_dir
        self.stats = {"steps": 0, "skipped_queries": 0, "payload_bytes": 0, "wire_bytes": 0,
                      "check_bytes": 0, "compute_s": 0.0, "exchange_s": 0.0, "update_s": 0.0}  # fmt: skip

    # -- pieces --------------------------------------------------------------------------------
    def query_seed(self, step: int) -> int:
        """This rank's 32-bit query seed at ``step`` (the directions' query key)."""
        return derive_seed(self.worker_seed, step, 0xD157) & 0xFFFFFFFF

    def _params(self) -> list[tuple[int, torch.Tensor]]:
        return [(i, p) for i, p, _ in self.optimizer._indexed()]

    def _all_gather(self, payload: torch.Tensor, step: int) -> torch.Tensor:
        if not self.distributed:
            return payload[None]
        out = torch.empty(self.world * payload.numel(), dtype=torch.uint8)
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        try:
            gather(out, payload, group=self.group)
        except RuntimeError as err:  # gloo/NCCL raise RuntimeError subclasses on a lost peer
            text = str(err)
            if not any(k in text.lower() for k in _LOST_PEER):
                raise
            where = f"; restart all ranks and call resume() on {str(self.checkpoint_dir)!r}"
            raise WorkerLostError(
                f"rank {self.rank}: a peer left the process group during step {step} "
                f"({type(err).__name__}: {text.splitlines()[0] if text else ''})"
                + (where if self.checkpoint_dir is not None else "")
            ) from err
        return out.view(self.world, payload.numel())

    def weights_digest(self) -> bytes:
        """An 8-byte BLAKE2 hash of every trainable tensor's bytes."""
        h = hashlib.blake2b(digest_size=8)
        for _, p in self._params():
            h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().data)
        return h.digest()

    def check_replicas(self) -> None:
        """All-gather the weight hash; raise :class:`ReplicaDivergenceError` if ranks differ."""
        digest = torch.frombuffer(bytearray(self.weights_digest()), dtype=torch.uint8)
        gathered = self._all_gather(digest, int(self.optimizer.global_state["step"]))
        self.stats["check_bytes"] += digest.numel() * (self.world - 1)
        rows = [bytes(r.tolist()) for r in gathered]
        if len(set(rows)) > 1:
            groups: dict[bytes, list[int]] = {}
            for rank, row in enumerate(rows):
                groups.setdefault(row, []).append(rank)
            raise ReplicaDivergenceError(
                "replicas differ at step "
                f"{self.optimizer.global_state['step']}: ranks grouped by weight hash "
                f"{sorted(groups.values())}; they must start from the same weights and apply the "
                "same updates (same optimizer seed, hyperparameters and code on every rank)"
            )

    # -- the step ------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[..., Any]) -> float:
        """One distributed step (see the module docstring); returns this rank's mean loss."""
        if closure is None:
            raise ValueError("ZOTrainer.step needs a closure evaluating this rank's batch")
        if not self._dir_checked:
            self._check_unclaimed_dir()
        opt = self.optimizer
        step = int(opt.global_state["step"])
        params = self._params()
        tensors = [p for _, p in params]
        if self._backup is None:
            self._backup = [torch.empty_like(p) for p in tensors]
        mu = opt.estimator.mu
        query = self.query_seed(step)

        t0 = time.perf_counter()
        evaluations = opt.global_state["evaluations"]
        torch._foreach_copy_(self._backup, tensors)
        try:  # the one evaluation path checks what the closure returns
            opt.estimator.perturb_(params, step, query, mu)
            plus = float(opt.evaluate(closure, backward=False).double())
            opt.estimator.perturb_(params, step, query, -2 * mu)
            minus = float(opt.evaluate(closure, backward=False).double())
        except BaseException:  # incl. KeyboardInterrupt: weights and counters as they were
            opt.global_state["evaluations"] = evaluations
            raise
        finally:
            torch._foreach_copy_(tensors, self._backup)  # exact restore: replicas stay identical
        g = (plus - minus) / (2 * mu)

        t1 = time.perf_counter()
        payload = encode(self.codec, query, g)
        gathered = self._all_gather(payload, step)
        queries, values = decode(self.codec, gathered)
        keep = [(q, v) for q, v in zip(queries, values) if math.isfinite(v)]
        self.stats["skipped_queries"] += len(queries) - len(keep)
        self.stats["payload_bytes"] += payload.numel()
        self.stats["wire_bytes"] += payload.numel() * (self.world - 1)  # ring all-gather

        t2 = time.perf_counter()
        kept_q, kept_g = [q for q, _ in keep], [v for _, v in keep]
        if self.log is not None:
            self.log.append(step, kept_q, kept_g)
        replay(opt, [(step, kept_q, kept_g)], self.codec)
        if not keep:
            opt.global_state["skipped_steps"] += 1
        self.stats["steps"] += 1
        t3 = time.perf_counter()
        self.stats["compute_s"] += t1 - t0
        self.stats["exchange_s"] += t2 - t1
        self.stats["update_s"] += t3 - t2

        done = step + 1
        if self.check_every and done % self.check_every == 0:
            self.check_replicas()
        if (
            self.checkpoint_every
            and self.checkpoint_dir is not None
            and done % self.checkpoint_every == 0
        ):
            self.save_checkpoint()
        return (plus + minus) / 2

    # -- checkpoints -----------------------------------------------------------------------------
    def save_checkpoint(self) -> None:
        """Rank 0 writes model, optimizer and codec state atomically, then trims the log."""
        if self.checkpoint_dir is None:
            raise ValueError("no checkpoint_dir was given")
        if self.rank != 0:
            return
        step = int(self.optimizer.global_state["step"])
        atomic_save(
            {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
             "codec": self.codec.state_dict(), "step": step},
            self.checkpoint_dir / CHECKPOINT,
        )  # fmt: skip
        if self.log is not None:
            self.log.truncate_before(step)

    def resume(self) -> int:
        """Load the last checkpoint (if any) and replay the seed log after it; every rank calls
        this before training. Returns the step training continues from.

        The checkpoint is loaded with ``weights_only=True`` (it holds only tensors, containers,
        numbers and strings). Nothing is lost silently: a damaged log or a gap between the
        checkpoint and the log raises :class:`~anyorder.distributed.seedlog.SeedLogError`, an
        unreadable checkpoint :class:`~anyorder.core.files.CheckpointError`, both naming the file,
        before the model, the optimizer or any file is changed. Only a torn last log line (a
        crash while writing it) is dropped, with a warning, and rank 0 removes it from the file.
        Without a checkpoint, a log that starts at step 0 is replayed in full on the model's
        current (initial) weights, which must then be the run's initial weights, as for a fresh
        start; a log that starts later (its first steps live only in the missing checkpoint)
        raises.
        """
        if self.checkpoint_dir is None:
            raise ValueError("no checkpoint_dir was given")
        path = self.checkpoint_dir / CHECKPOINT
        log = SeedLog(self.checkpoint_dir / SEED_LOG)
        entries = list(log.entries())  # checked in full first: raises on damage or a gap
        state = load_checkpoint(path) if path.exists() else None
        if state is not None:
            _check_checkpoint(state, path)
            start = int(state["step"])
        else:
            start = 0
            if int(self.optimizer.global_state["step"]) != 0 and entries:
                raise ValueError(
                    f"no checkpoint in {str(self.checkpoint_dir)!r}, so the seed log is replayed "
                    "from step 0, but the optimizer is at step "
                    f"{self.optimizer.global_state['step']}: resume() a freshly built model and "
                    "optimizer"
                )
        if entries and entries[0][0] > start:
            where = (
                f"the checkpoint {str(path)!r} is at step {start}"
                if state is not None
                else f"there is no checkpoint {str(path)!r}"
            )
            raise SeedLogError(
                f"seed log {str(log.path)!r} starts at step {entries[0][0]} but {where}: steps "
                f"{start}..{entries[0][0] - 1} are in neither, and resuming would lose them; "
                "restore the checkpoint (nothing was changed)"
            )
        if state is not None:
            self._load_state(state, path)
        if self.rank == 0:
            (self.log or log).drop_torn_tail()
        replay(self.optimizer, [e for e in entries if e[0] >= start], self.codec)
        self._dir_checked = True
        if self.distributed:
            self.check_replicas()
        return int(self.optimizer.global_state["step"])

    def _check_unclaimed_dir(self) -> None:
        """Before the first step of a run that did not :meth:`resume`: refuse a checkpoint folder
        holding another run's checkpoint or seed log (training would replace the checkpoint and
        mix the two logs)."""
        assert self.checkpoint_dir is not None
        found = [
            name
            for name in (CHECKPOINT, SEED_LOG)
            if (self.checkpoint_dir / name).exists()
            and (self.checkpoint_dir / name).stat().st_size > 0
        ]
        if found:
            raise ValueError(
                f"checkpoint_dir {str(self.checkpoint_dir)!r} holds a previous run "
                f"({', '.join(found)}): call resume() to continue it, or train in an empty folder "
                "(nothing was changed)"
            )
        self._dir_checked = True

    def _load_state(self, state: dict[str, Any], path: Path) -> None:
        """Load a checkpoint's states; if one does not fit, put everything back and raise."""
        backup = (
            copy.deepcopy(self.model.state_dict()),
            copy.deepcopy(self.optimizer.state_dict()),
            self.codec.state_dict(),
        )
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.codec.load_state_dict(state["codec"])
        except Exception as err:
            self.model.load_state_dict(backup[0])
            self.optimizer.load_state_dict(backup[1])
            self.codec.load_state_dict(backup[2])
            first = " ".join(str(err).split())[:300]
            raise CheckpointError(
                f"checkpoint {str(path)!r} does not fit this trainer's model and optimizer "
                f"({type(err).__name__}: {first}); nothing was changed"
            ) from err
        self.optimizer.estimator.portable = True

    # -- reporting -------------------------------------------------------------------------------
    def report(self) -> dict[str, Any]:
        """Bytes per step (this rank's payload and the ring all-gather's wire bytes), queries per
        second, time split, and the 8-bit quantisation error."""
        steps = max(int(self.stats["steps"]), 1)
        total = self.stats["compute_s"] + self.stats["exchange_s"] + self.stats["update_s"]
        out = {
            "world_size": self.world,
            "steps": self.stats["steps"],
            "bytes_sent_per_step": self.stats["payload_bytes"] / steps,
            "wire_bytes_per_step": self.stats["wire_bytes"] / steps,
            "check_bytes": self.stats["check_bytes"],
            "queries_per_second": self.world * self.stats["steps"] / total if total else None,
            "compute_s": self.stats["compute_s"],
            "exchange_s": self.stats["exchange_s"],
            "update_s": self.stats["update_s"],
            "skipped_queries": self.stats["skipped_queries"],
        }
        if self.codec.bits is not None:
            out["quantization"] = self.codec.error_report()
        return out

    def close(self) -> None:
        if self.log is not None:
            self.log.close()
