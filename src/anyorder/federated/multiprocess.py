"""Federated rounds across processes over ``torch.distributed``: the same algorithms, seeds and
records as the in-process :mod:`~anyorder.federated.simulator`, with clients living on ranks.

* :class:`DistributedSimulator` runs a :class:`~anyorder.federated.algorithm.ServerAlgorithm`
  with rank ``root`` (0) as the server. Client ``i`` lives on rank ``i % world`` (rank 0 hosts
  clients too). Per round the server broadcasts the downlink, every rank draws the same
  participants and dropouts (from the run's seed, as the simulator does), runs its clients'
  rules, and sends their uploads to the server point to point; the server aggregates them in
  increasing client id with the algorithm's own ``aggregate`` and tells the owners which uploads
  it accepted (so that they keep those clients' new states). The result is the simulator's, bit
  for bit: the same client rules on the same batches, the same aggregation in the same order.
* :class:`DistributedGossipSimulator` runs a :class:`~anyorder.federated.algorithm.GossipAlgorithm`:
  node ``i`` lives on rank ``i % world``; each gossip step every rank sends each of its nodes'
  messages once to every other rank hosting a neighbour of that node (``send``/``recv`` pairs,
  by the mixing matrix), and every node mixes its inbox in increasing neighbour id with the
  algorithm's ``mix``: again the simulator's numbers, bit for bit.
* :func:`launch` starts N local processes (gloo) and returns the root's result;
  ``torchrun --nproc-per-node N -m anyorder.federated.multiprocess --spec pkg.mod:make_spec``
  runs a :class:`FederationSpec` that your function returns under torchrun (any backend: with
  ``nccl`` the messages cross through each rank's GPU; the clients compute where the model is).

Bytes: every record keeps the simulator's logical bytes per client (payload sizes), and adds in
``extra`` the bytes that crossed between processes as the server (or, for gossip, the ranks
together) sent and received them: buffers, 8-byte lengths and message headers included; messages
between clients on the same rank as the server do not cross. A gossip run with ``monitor=True``
also gathers every node's model on the root after each round for the consensus distance and the
evaluation; those bytes are counted apart (``extra["monitor_bytes"]``).

Departures from the simulator: the server state lives on the root only (``global_model()`` on
another rank is not kept up to date); checkpoints gather every client's state on the root, which
writes the file (every rank must be able to read it to resume).
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import pickle
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from anyorder.core.files import atomic_write
from anyorder.distributed.launch import exit_finished_worker
from anyorder.federated.algorithm import (
    ClientData,
    GossipAlgorithm,
    Payload,
    ServerAlgorithm,
    State,
    check_finite_payload,
    payload_bytes,
)
from anyorder.federated.simulator import (
    Evaluate,
    GossipSimulator,
    RoundRecord,
    Simulator,
)
from anyorder.federated.transport import Transport

__all__ = [
    "DistributedSimulator",
    "DistributedGossipSimulator",
    "FederationSpec",
    "launch",
    "main",
]


def _wire(transport: Transport) -> tuple[int, int]:
    return transport.stats["sent"], transport.stats["received"]


class DistributedSimulator(Simulator):
    """A :class:`~anyorder.federated.simulator.Simulator` whose clients live on the ranks of an
    initialised process group (module docstring). Every rank builds it with the same arguments
    (the whole partition: a rank only reads its own clients' data) and calls :meth:`step` /
    :meth:`run` together. Records, evaluation and the global model are the root's; another
    rank's records hold the round's draw and its own clients' bytes and time only.

    The server's control message after aggregating (which uploads it accepted) crosses too and
    is counted in ``extra["wire_sent_by_server"]``."""

    def __init__(
        self,
        algorithm: ServerAlgorithm,
        model: nn.Module,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        clients: Sequence[ClientData],
        *,
        seed: int = 0,
        participation: float = 1.0,
        dropout: float = 0.0,
        evaluate: Evaluate | None = None,
        eval_every: int = 1,
        group: Any = None,
        root: int = 0,
    ) -> None:
        super().__init__(algorithm, model, loss_fn, clients, seed=seed,
                         participation=participation, dropout=dropout, evaluate=evaluate,
                         eval_every=eval_every)  # fmt: skip
        self.transport = Transport(group)
        self.rank, self.world = self.transport.rank, self.transport.world
        if not isinstance(root, int) or not 0 <= root < self.world:
            raise ValueError(f"root must be a rank in [0, {self.world}), got {root!r}")
        self.root = root

    def owner(self, client: int) -> int:
        """The rank client ``client`` lives on."""
        return client % self.world

    @property
    def is_root(self) -> bool:
        return self.rank == self.root

    def step(self, last: bool = False) -> RoundRecord:
        """One round on every rank (all ranks call it)."""
        alg, tr = self.algorithm, self.transport
        start = time.perf_counter()
        sent0, recv0 = _wire(tr)
        participants, dropped = self.select()
        down = tr.broadcast(alg.downlink(self.server) if self.is_root else None, self.root)
        down_bytes = payload_bytes(down)
        ids, ups, states, times, losses = [], [], {}, [], []
        for i in participants:
            if i in dropped or self.owner(i) != self.rank:
                continue
            ctx = self._context(i)
            t0 = time.perf_counter()
            up, state = alg.client_update(down, self.client_states[i], ctx)
            times.append(time.perf_counter() - t0)
            ids.append(i)
            ups.append(up)
            states[i] = state
            losses.append(float(ctx.metrics.get("loss", math.nan)))
        mine = {"ids": ids, "ups": ups, "losses": losses, "times": times}
        gathered = tr.gather(mine, self.root)
        status: dict[str, Any] = {}
        if self.is_root:
            status = self._aggregate(gathered, participants, dropped, down_bytes, start, last)
        status = tr.broadcast(status if self.is_root else None, self.root)
        if not status["ok"]:
            raise FloatingPointError(
                f"round {self.round}: the aggregated model is not finite; the federation was "
                "left as it was before the round"
            )
        for i in status["accepted"]:
            if i in states:
                self.client_states[i] = states[i]
        if self.is_root:
            record = self._pending
            record.extra["wire_sent_by_server"] = float(tr.stats["sent"] - sent0)
            record.extra["wire_received_by_server"] = float(tr.stats["received"] - recv0)
        else:  # what this rank knows: the round's draw and its own clients
            accepted = set(status["accepted"])
            record = RoundRecord(
                round=self.round,
                participants=participants,
                dropped=dropped,
                rejected=[i for i in ids if i not in accepted],
                bytes_up={str(i): payload_bytes(up) for i, up in zip(ids, ups)},
                bytes_down={str(i): down_bytes for i in participants if self.owner(i) == self.rank},
                client_time_s=sum(times),
                wall_time_s=time.perf_counter() - start,
                train_loss=math.nan,
            )
        self.history.append(record)
        self.round += 1
        return record

    def _aggregate(self, gathered, participants, dropped, down_bytes, start, last) -> dict:
        alg = self.algorithm
        arrived: dict[int, tuple[Payload, float, float]] = {}
        for msg in gathered:
            for i, up, loss, t in zip(msg["ids"], msg["ups"], msg["losses"], msg["times"]):
                arrived[int(i)] = (up, loss, t)
        ups, rejected, losses, bytes_up, bytes_down = [], [], [], {}, {}
        client_time = 0.0
        for i in participants:
            bytes_down[str(i)] = down_bytes
            if i in dropped:
                bytes_up[str(i)] = 0
                continue
            up, loss, t = arrived[i]
            client_time += t
            bytes_up[str(i)] = payload_bytes(up)
            if not check_finite_payload(up):
                rejected.append(i)
                continue
            ups.append((i, up))
            if math.isfinite(loss):
                losses.append(loss)
        server = alg.aggregate(self.server, ups, self.num_clients)
        x = alg.global_model(server)
        if not bool(torch.isfinite(x).all()):
            return {"ok": False}
        self.server = server
        record = RoundRecord(
            round=self.round,
            participants=participants,
            dropped=dropped,
            rejected=rejected,
            bytes_up=bytes_up,
            bytes_down=bytes_down,
            client_time_s=client_time,
            wall_time_s=time.perf_counter() - start,
            train_loss=sum(losses) / len(losses) if losses else math.nan,
        )
        record.metrics = self._metrics(x, last)
        self._pending = record
        return {"ok": True, "accepted": [i for i, _ in ups]}

    # -- checkpoints: the root gathers every client's state ------------------------------------
    def _payload(self) -> dict[str, Any]:
        mine = {i: dict(s) for i, s in enumerate(self.client_states) if self.owner(i) == self.rank}
        gathered = self.transport.gather({str(i): s for i, s in mine.items()}, self.root)
        if not self.is_root:
            return {"server": {}, "clients": []}
        clients = [dict(s) for s in self.client_states]
        for part in gathered:
            for i, s in part.items():
                clients[int(i)] = s
        return {"server": dict(self.server), "clients": clients}

    def save(self, path: str | os.PathLike[str]) -> None:
        """Gather the federation on the root, which writes it atomically (all ranks call)."""
        blob = self.state_dict()
        if self.is_root:
            atomic_write(path, lambda fh: torch.save(blob, fh))
        dist.barrier(group=self.transport.group)


class DistributedGossipSimulator(GossipSimulator):
    """A :class:`~anyorder.federated.simulator.GossipSimulator` whose nodes live on the ranks of
    an initialised process group (module docstring). ``monitor``: gather every node's model on
    the root after each round for the consensus distance, the mean model's evaluation and
    :meth:`mean_model` (counted in ``extra["monitor_bytes"]``); without it records carry no
    consensus and ``evaluate`` is not called."""

    def __init__(
        self,
        algorithm: GossipAlgorithm,
        model: nn.Module,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        clients: Sequence[ClientData],
        mixing: torch.Tensor,
        *,
        seed: int = 0,
        evaluate: Evaluate | None = None,
        eval_every: int = 1,
        group: Any = None,
        root: int = 0,
        monitor: bool = True,
    ) -> None:
        super().__init__(algorithm, model, loss_fn, clients, mixing, seed=seed, evaluate=evaluate,
                         eval_every=eval_every)  # fmt: skip
        self.transport = Transport(group)
        self.rank, self.world = self.transport.rank, self.transport.world
        if not isinstance(root, int) or not 0 <= root < self.world:
            raise ValueError(f"root must be a rank in [0, {self.world}), got {root!r}")
        self.root = root
        self.monitor = bool(monitor)
        self.mine = [i for i in range(self.num_clients) if self.owner(i) == self.rank]
        # ranks that need node j's message: the owners of j's neighbours (j itself excluded)
        self.readers = {
            j: sorted({self.owner(i) for i in range(self.num_clients)
                       if i != j and self.mixing[i, j] != 0} - {self.rank})
            for j in self.mine
        }  # fmt: skip
        self.sources = sorted({self.owner(j) for i in self.mine for j, _ in self.neighbours[i]}
                              - {self.rank})  # fmt: skip

    def owner(self, node: int) -> int:
        return node % self.world

    @property
    def is_root(self) -> bool:
        return self.rank == self.root

    def step(self, last: bool = False) -> RoundRecord:
        alg, tr = self.algorithm, self.transport
        start = time.perf_counter()
        sent0, recv0 = _wire(tr)
        m = self.num_clients
        nodes: dict[int, State] = {}
        times, losses = [], []
        for i in self.mine:
            ctx = self._context(i)
            t0 = time.perf_counter()
            nodes[i] = alg.local_update(self.nodes[i], ctx)
            times.append(time.perf_counter() - t0)
            losses.append(float(ctx.metrics.get("loss", math.nan)))
        sizes: dict[int, int] = {}
        for _ in range(alg.gossip_steps):
            messages = {i: alg.message(nodes[i]) for i in self.mine}
            outgoing: dict[int, dict[str, Payload]] = {}
            for j in self.mine:
                sizes[j] = payload_bytes(messages[j])
                for r in self.readers[j]:
                    outgoing.setdefault(r, {})[str(j)] = messages[j]
            for part in tr.exchange(outgoing, self.sources).values():
                for j, msg in part.items():
                    messages[int(j)] = msg
            nodes = {i: alg.mix(nodes[i], [(w, messages[j]) for j, w in self.neighbours[i]])
                     for i in self.mine}  # fmt: skip
        finite = all(bool(torch.isfinite(alg.node_model(n)).all()) for n in nodes.values())
        bad = torch.tensor([int(not finite)], device=tr.device)
        dist.all_reduce(bad, op=dist.ReduceOp.MAX, group=tr.group)
        if int(bad):
            raise FloatingPointError(
                f"round {self.round}: a node's model is not finite; the federation was left as "
                "it was before the round"
            )
        for i, n in nodes.items():
            self.nodes[i] = n
        sent, received = _wire(tr)
        wall = time.perf_counter() - start
        # logical bytes per node, as the simulator counts them
        per = {i: payload_bytes(alg.message(n)) for i, n in nodes.items()}
        report = {"times": times, "losses": losses, "per": {str(i): b for i, b in per.items()},
                  "wire": [sent - sent0, received - recv0]}  # fmt: skip
        gathered = tr.gather(report, self.root)
        monitor_bytes = 0
        if self.monitor:
            before = tr.stats["sent"] + tr.stats["received"]
            models = tr.gather({str(i): alg.node_model(nodes[i]) for i in self.mine}, self.root)
            monitor_bytes = tr.stats["sent"] + tr.stats["received"] - before
            if self.is_root:  # the root's copies of other ranks' nodes: their models only
                for part in models:
                    for i, x in part.items():
                        if int(i) not in nodes:
                            self.nodes[int(i)] = {**self.nodes[int(i)], "model": x}
        record = None
        if self.is_root:
            client_time, size = 0.0, {}
            by_node: dict[int, float] = {}
            for part, owner_rank in zip(gathered, range(self.world)):
                client_time += sum(part["times"])
                owned = [i for i in range(m) if self.owner(i) == owner_rank]
                for i, loss in zip(owned, part["losses"]):
                    by_node[i] = loss
                size.update({int(i): b for i, b in part["per"].items()})
            all_losses = [by_node[i] for i in range(m) if math.isfinite(by_node[i])]
            sent_b = [0] * m
            recv_b = [0] * m
            for _ in range(alg.gossip_steps):
                for i in range(m):
                    for j, _ in self.neighbours[i]:
                        if j != i:
                            sent_b[j] += size[j]
                            recv_b[i] += size[j]
            wire_sent = sum(part["wire"][0] for part in gathered)
            record = RoundRecord(
                round=self.round,
                participants=list(range(m)),
                dropped=[],
                rejected=[],
                bytes_up={str(i): b for i, b in enumerate(sent_b)},
                bytes_down={str(i): b for i, b in enumerate(recv_b)},
                client_time_s=client_time,
                wall_time_s=wall,
                train_loss=sum(all_losses) / len(all_losses) if all_losses else math.nan,
                extra={"wire_bytes": float(wire_sent), "monitor_bytes": float(monitor_bytes)},
            )
            if self.monitor:
                record.extra["consensus"] = self.consensus_distance()
                record.metrics = self._metrics(self.mean_model(), last)
        # every rank keeps the root's record (a few hundred bytes, not counted as gossip traffic)
        record = RoundRecord(**tr.broadcast(record.to_dict() if self.is_root else None, self.root))
        self.history.append(record)
        self.round += 1
        return record

    def _payload(self) -> dict[str, Any]:
        gathered = self.transport.gather({str(i): dict(self.nodes[i]) for i in self.mine}, self.root)
        if not self.is_root:
            return {"nodes": []}
        nodes = [dict(n) for n in self.nodes]
        for part in gathered:
            for i, n in part.items():
                nodes[int(i)] = n
        return {"nodes": nodes}

    def save(self, path: str | os.PathLike[str]) -> None:
        blob = self.state_dict()
        if self.is_root:
            atomic_write(path, lambda fh: torch.save(blob, fh))
        dist.barrier(group=self.transport.group)


# -- running it: N local processes, or torchrun -------------------------------------------------


@dataclass
class FederationSpec:
    """Everything a rank needs to build the same federation (picklable: a spawned process
    receives it whole): the algorithm, the model (initial weights), the loss, every client's
    data, the run's seed, and for a gossip algorithm the mixing matrix; for a server algorithm
    ``participation`` and ``dropout``."""

    algorithm: ServerAlgorithm | GossipAlgorithm
    model: nn.Module
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    clients: Sequence[ClientData]
    seed: int = 0
    mixing: torch.Tensor | None = None
    participation: float = 1.0
    dropout: float = 0.0
    evaluate: Evaluate | None = None
    eval_every: int = 1

    def simulator(self) -> Simulator | GossipSimulator:
        """The in-process engine of this federation."""
        if isinstance(self.algorithm, GossipAlgorithm):
            return GossipSimulator(self.algorithm, self.model, self.loss_fn, self.clients,
                                   self._mixing(), seed=self.seed, evaluate=self.evaluate,
                                   eval_every=self.eval_every)  # fmt: skip
        return Simulator(self.algorithm, self.model, self.loss_fn, self.clients, seed=self.seed,
                         participation=self.participation, dropout=self.dropout,
                         evaluate=self.evaluate, eval_every=self.eval_every)  # fmt: skip

    def engine(self, group: Any = None) -> DistributedSimulator | DistributedGossipSimulator:
        """The multi-process engine of this federation, in the initialised process group."""
        if isinstance(self.algorithm, GossipAlgorithm):
            return DistributedGossipSimulator(self.algorithm, self.model, self.loss_fn,
                                              self.clients, self._mixing(), seed=self.seed,
                                              evaluate=self.evaluate, eval_every=self.eval_every,
                                              group=group)  # fmt: skip
        return DistributedSimulator(self.algorithm, self.model, self.loss_fn, self.clients,
                                    seed=self.seed, participation=self.participation,
                                    dropout=self.dropout, evaluate=self.evaluate,
                                    eval_every=self.eval_every, group=group)  # fmt: skip

    def _mixing(self) -> torch.Tensor:
        if self.mixing is None:
            raise ValueError("a gossip algorithm needs FederationSpec(mixing=...)")
        return self.mixing


def _result(engine: Any, wall: float) -> dict[str, Any]:
    if isinstance(engine, DistributedGossipSimulator):
        models = [engine.algorithm.node_model(n) for n in engine.nodes]
        final = {"node_models": torch.stack(models), "model": engine.mean_model()}
    else:
        final = {"model": engine.global_model()}
    return {
        **final,
        "world": engine.world,
        "rounds": engine.round,
        "wall_time_s": wall,
        "history": [r.to_dict() for r in engine.history],
        "transport": dict(engine.transport.stats),
    }


def _worker(rank: int, world: int, spec: FederationSpec, rounds: int, out: str, init: str,
            backend: str, timeout_s: float, threads: int, checkpoint: str | None) -> None:  # fmt: skip
    torch.set_num_threads(threads)
    if backend == "nccl":
        torch.cuda.set_device(rank % torch.cuda.device_count())
    dist.init_process_group(backend, init_method=f"file://{init}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=timeout_s))  # fmt: skip
    try:
        engine = spec.engine()
        if checkpoint is not None and Path(checkpoint).exists():
            engine.load(checkpoint)  # every rank reads it; each keeps its own clients' states
        t0 = time.perf_counter()
        engine.run(rounds, checkpoint=checkpoint)
        wall = time.perf_counter() - t0
        if engine.is_root:
            blob = _result(engine, wall)
            atomic_write(Path(out) / "result.pt", lambda fh: torch.save(blob, fh))
        dist.barrier()
    except BaseException:
        (Path(out) / f"rank{rank}.err").write_text(traceback.format_exc())
        dist.destroy_process_group()
        raise
    # every rank passed the barrier and the result is on disk: leave without tearing gloo down
    # (a finished rank is now and then aborted there, exit code -6; see distributed.launch)
    exit_finished_worker()


def launch(
    world: int,
    spec: FederationSpec,
    rounds: int,
    out_dir: str | os.PathLike[str] | None = None,
    *,
    backend: str = "gloo",
    timeout_s: float = 60.0,
    threads: int = 1,
    checkpoint: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Run ``spec`` until ``rounds`` rounds are done on ``world`` local processes and return the
    root's result: the final model (``node_models`` too for gossip), the round records (dicts),
    the root's transport counters and the wall time of the rounds. ``checkpoint``: a file the
    federation is saved to after every round and, when it exists, resumed from (the world size
    may differ from the run that wrote it). Raises ``RuntimeError`` with the failing ranks'
    tracebacks when a rank fails."""
    if not isinstance(world, int) or isinstance(world, bool) or world < 1:
        raise ValueError(f"world must be a positive integer, got {world!r}")
    if not isinstance(rounds, int) or isinstance(rounds, bool) or rounds < 0:
        raise ValueError(f"rounds must be an integer >= 0, got {rounds!r}")
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
    try:
        pickle.dumps(spec)
    except Exception as exc:  # a lambda or a closure (e.g. an evaluate function) in the spec
        raise TypeError(
            "launch() sends the FederationSpec to spawned processes, so it must pickle: use "
            f"module-level functions, not lambdas or closures ({type(exc).__name__}: {exc})"
        ) from exc
    with tempfile.TemporaryDirectory(prefix="anyorder-fed-") as tmp:
        out = Path(out_dir) if out_dir is not None else Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        (out / "result.pt").unlink(missing_ok=True)
        init = os.path.join(tmp, "store")
        ckpt = None if checkpoint is None else str(checkpoint)
        ctx = mp.start_processes(_worker, args=(world, spec, rounds, str(out), init, backend,
                                                timeout_s, threads, ckpt),
                                 nprocs=world, join=False, start_method="spawn")  # fmt: skip
        for p in ctx.processes:
            p.join()
        failed = {r: p.exitcode for r, p in enumerate(ctx.processes) if p.exitcode != 0}
        if failed:
            errors = "\n".join(f.read_text() for f in sorted(out.glob("rank*.err")))
            raise RuntimeError(f"federated ranks failed with exit codes {failed}:\n{errors}")
        return torch.load(out / "result.pt", map_location="cpu", weights_only=True)


def main(argv: Sequence[str] | None = None) -> int:
    """``torchrun --nproc-per-node N -m anyorder.federated.multiprocess --spec pkg.mod:fn
    --rounds R --out DIR``: ``fn()`` returns the :class:`FederationSpec` (every rank calls it);
    the root writes ``DIR/result.pt``."""
    parser = argparse.ArgumentParser(prog="python -m anyorder.federated.multiprocess")
    parser.add_argument("--spec", required=True, help="module:function returning a FederationSpec")
    parser.add_argument("--rounds", type=int, required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--backend", default="gloo", choices=["gloo", "nccl"])
    args = parser.parse_args(argv)
    module, _, name = args.spec.partition(":")
    if not module or not name:
        parser.error(f"--spec must be module:function, got {args.spec!r}")
    spec = getattr(importlib.import_module(module), name)()
    if not isinstance(spec, FederationSpec):
        parser.error(f"{args.spec} returned {type(spec).__name__}, not a FederationSpec")
    if args.backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(args.backend)
    try:
        engine = spec.engine()
        t0 = time.perf_counter()
        engine.run(args.rounds)
        wall = time.perf_counter() - t0
        if engine.is_root:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            blob = _result(engine, wall)
            atomic_write(Path(args.out) / "result.pt", lambda fh: torch.save(blob, fh))
        dist.barrier()
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":  # pragma: no cover - torchrun entry point
    # Run the imported module's main, so that FederationSpec is the class users import (under
    # ``-m`` this file is also loaded as ``__main__``, with classes of its own).
    from anyorder.federated.multiprocess import main as _main

    raise SystemExit(_main())
