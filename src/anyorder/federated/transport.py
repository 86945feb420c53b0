"""Moving federated messages between processes over ``torch.distributed``, counting every byte.

A message is a tree (dicts, lists, tuples) of tensors and Python numbers. On the wire it is a
*body* (every tensor's bytes and every number as 8 bytes, depth first) and a *header* (the
tree's structure, dtypes and shapes, as compact JSON), sent as one uint8 buffer preceded by its 8-byte
length. :class:`Transport` sends such buffers point to point (``send``/``recv``, so the byte
counts are exact: nothing is padded) and broadcasts them from a root; it counts the bytes this
process sends and receives (``stats``). gloo works on CPU tensors; with the
NCCL backend the buffers are moved to this rank's GPU for the collective and back.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["pack", "unpack", "Transport"]

_LEN = struct.Struct("<q")
_NUMBER = struct.Struct("<d")
_INT = struct.Struct("<q")


def _describe(node: Any, body: list[torch.Tensor]) -> Any:
    """The JSON structure of ``node``; appends its leaves' bytes to ``body`` depth first."""
    if isinstance(node, torch.Tensor):
        t = node.detach().to("cpu").contiguous()
        body.append(t.reshape(-1).view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8))
        return ["t", str(t.dtype).removeprefix("torch."), list(t.shape)]
    if isinstance(node, bool) or node is None or isinstance(node, str):
        return ["o", node]  # small flags travel in the header
    if isinstance(node, int):
        body.append(torch.frombuffer(bytearray(_INT.pack(node)), dtype=torch.uint8))
        return ["i"]
    if isinstance(node, float):
        body.append(torch.frombuffer(bytearray(_NUMBER.pack(node)), dtype=torch.uint8))
        return ["f"]
    if isinstance(node, dict):
        for key in node:
            if not isinstance(key, str):
                raise TypeError(f"message dict keys must be strings, got {key!r}")
        return ["d", [[k, _describe(v, body)] for k, v in node.items()]]
    if isinstance(node, (list, tuple)):
        return ["l" if isinstance(node, list) else "u", [_describe(v, body) for v in node]]
    raise TypeError(
        "a federated message holds tensors, numbers, strings, None, dicts, lists and tuples, "
        f"got {type(node).__name__}"
    )


def pack(tree: Any) -> tuple[torch.Tensor, int]:
    """``tree`` as one uint8 tensor (header length, JSON header, body) and the body's size."""
    body: list[torch.Tensor] = []
    header = json.dumps(_describe(tree, body), separators=(",", ":")).encode()
    head = torch.frombuffer(bytearray(_LEN.pack(len(header)) + header), dtype=torch.uint8)
    data = torch.cat([head, *body]) if body else head
    return data, int(data.numel() - head.numel())


def _build(desc: Any, raw: torch.Tensor, offset: list[int]) -> Any:
    kind = desc[0]
    if kind == "t":
        dtype = getattr(torch, desc[1])
        count = math.prod(desc[2])
        size = count * torch.empty(0, dtype=dtype).element_size()
        start = offset[0]
        offset[0] += size
        return raw[start : start + size].clone().view(dtype).reshape(desc[2])
    if kind == "o":
        return desc[1]
    if kind in ("i", "f"):
        chunk = bytes(raw[offset[0] : offset[0] + 8].tolist())
        offset[0] += 8
        return _INT.unpack(chunk)[0] if kind == "i" else _NUMBER.unpack(chunk)[0]
    if kind == "d":
        return {k: _build(v, raw, offset) for k, v in desc[1]}
    items = [_build(v, raw, offset) for v in desc[1]]
    return items if kind == "l" else tuple(items)


def unpack(data: torch.Tensor) -> Any:
    """Inverse of :func:`pack` (tensors come back on the CPU, as fresh memory)."""
    raw = data.cpu()
    (n,) = _LEN.unpack(bytes(raw[: _LEN.size].tolist()))
    desc = json.loads(raw[_LEN.size : _LEN.size + n].numpy().tobytes().decode())
    return _build(desc, raw, [_LEN.size + n])


class Transport:
    """Point-to-point and collective moves of packed messages with byte counters.

    ``stats``: ``sent``/``received`` (every byte this process put on or took off the wire,
    lengths and headers included), ``body_sent`` (tensor and number bytes only) and the number
    of ``messages`` sent.
    """

    def __init__(self, group: Any = None) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("Transport needs an initialised torch.distributed process group")
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.backend = dist.get_backend(group)
        self.device = (
            torch.device("cuda", torch.cuda.current_device())
            if self.backend == "nccl"
            else torch.device("cpu")
        )
        self.stats = {"sent": 0, "received": 0, "body_sent": 0, "messages": 0}

    def _global(self, rank: int) -> int:
        return rank if self.group is None else dist.get_global_rank(self.group, rank)

    # -- point to point ------------------------------------------------------------------------
    def send(self, tree: Any, dst: int) -> None:
        """Send one message to ``dst`` (blocking)."""
        data, body = pack(tree)
        size = torch.tensor([data.numel()], dtype=torch.int64, device=self.device)
        dist.send(size, self._global(dst), group=self.group)
        dist.send(data.to(self.device), self._global(dst), group=self.group)
        self.stats["sent"] += 8 + data.numel()
        self.stats["body_sent"] += body
        self.stats["messages"] += 1

    def recv(self, src: int) -> Any:
        """Receive one message from ``src`` (blocking)."""
        size = torch.empty(1, dtype=torch.int64, device=self.device)
        dist.recv(size, self._global(src), group=self.group)
        data = torch.empty(int(size.item()), dtype=torch.uint8, device=self.device)
        dist.recv(data, self._global(src), group=self.group)
        self.stats["received"] += 8 + data.numel()
        return unpack(data)

    def exchange(self, outgoing: dict[int, Any], incoming: Sequence[int]) -> dict[int, Any]:
        """Send ``outgoing[dst]`` to each ``dst`` and receive one message from each rank in
        ``incoming``, all at once (non-blocking pairs, so neighbours in a ring cannot deadlock)."""
        packed = {dst: pack(tree) for dst, tree in outgoing.items()}
        ops, sizes_in = [], {}
        for dst, (data, _) in packed.items():
            size = torch.tensor([data.numel()], dtype=torch.int64, device=self.device)
            ops.append(dist.P2POp(dist.isend, size, self._global(dst), self.group))
        for src in incoming:
            sizes_in[src] = torch.empty(1, dtype=torch.int64, device=self.device)
            ops.append(dist.P2POp(dist.irecv, sizes_in[src], self._global(src), self.group))
        for work in dist.batch_isend_irecv(ops) if ops else []:
            work.wait()
        ops, buffers = [], {}
        for dst, (data, body) in packed.items():
            ops.append(dist.P2POp(dist.isend, data.to(self.device), self._global(dst), self.group))
            self.stats["sent"] += 8 + data.numel()
            self.stats["body_sent"] += body
            self.stats["messages"] += 1
        for src in incoming:
            buffers[src] = torch.empty(int(sizes_in[src].item()), dtype=torch.uint8,
                                       device=self.device)  # fmt: skip
            ops.append(dist.P2POp(dist.irecv, buffers[src], self._global(src), self.group))
        for work in dist.batch_isend_irecv(ops) if ops else []:
            work.wait()
        out = {}
        for src, data in buffers.items():
            self.stats["received"] += 8 + data.numel()
            out[src] = unpack(data)
        return out

    # -- collectives ---------------------------------------------------------------------------
    def gather(self, tree: Any, root: int = 0) -> list[Any] | None:
        """Every rank's message at ``root`` (in rank order; ``None`` elsewhere), sent point to
        point so nothing is padded."""
        if self.rank != root:
            self.send(tree, root)
            return None
        return [tree if r == root else self.recv(r) for r in range(self.world)]

    def broadcast(self, tree: Any, root: int = 0) -> Any:
        """``root``'s message on every rank. Counted as ``root`` sending it to each other rank
        (what a star sends; gloo's broadcast moves the same bytes per receiver)."""
        if self.rank == root:
            data, body = pack(tree)
            size = torch.tensor([data.numel()], dtype=torch.int64, device=self.device)
        else:
            size = torch.empty(1, dtype=torch.int64, device=self.device)
        dist.broadcast(size, self._global(root), group=self.group)
        if self.rank != root:
            data = torch.empty(int(size.item()), dtype=torch.uint8, device=self.device)
        buf = data.to(self.device)
        dist.broadcast(buf, self._global(root), group=self.group)
        if self.rank == root:
            self.stats["sent"] += (self.world - 1) * (8 + data.numel())
            self.stats["body_sent"] += (self.world - 1) * body
            self.stats["messages"] += self.world - 1
            return tree
        self.stats["received"] += 8 + buf.numel()
        return unpack(buf)
