"""Moving federated messages between processes over ``torch.distributed``, counting every byte.

A message is a tree (dicts, lists, tuples) of tensors and Python numbers. On the wire it is a
*body* (every tensor's bytes, then every number as 8 bytes, in tree order) and a *header* (the
tree's structure, dtypes and shapes, pickled), sent as one uint8 buffer preceded by its 8-byte
length. :class:`Transport` sends such buffers point to point (``send``/``recv``, so the byte
counts are exact: nothing is padded), broadcasts them from a root, and all-reduces tensors; it
counts the bytes this process sends and receives (``stats``). gloo works on CPU tensors; with the
NCCL backend the buffers are moved to this rank's GPU for the collective and back.
"""

from __future__ import annotations

import pickle
import struct
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch.utils._pytree import tree_flatten, tree_unflatten

__all__ = ["pack", "unpack", "Transport"]

_LEN = struct.Struct("<q")
_NUMBER = struct.Struct("<d")
_INT = struct.Struct("<q")


def pack(tree: Any) -> tuple[torch.Tensor, int]:
    """``tree`` as one uint8 tensor (header length, header, body) and the body's size in bytes."""
    leaves, spec = tree_flatten(tree)
    meta, body = [], []
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            t = leaf.detach().to("cpu").contiguous()
            meta.append(("t", str(t.dtype).removeprefix("torch."), tuple(t.shape)))
            body.append(t.reshape(-1).view(torch.uint8) if t.numel() else t.new_empty(0).view(torch.uint8))
        elif isinstance(leaf, bool) or leaf is None or isinstance(leaf, str):
            meta.append(("o", leaf))  # small flags travel in the header
        elif isinstance(leaf, int):
            meta.append(("i",))
            body.append(torch.frombuffer(bytearray(_INT.pack(leaf)), dtype=torch.uint8))
        elif isinstance(leaf, float):
            meta.append(("f",))
            body.append(torch.frombuffer(bytearray(_NUMBER.pack(leaf)), dtype=torch.uint8))
        else:
            raise TypeError(
                f"a federated message holds tensors, numbers, strings and None, got {type(leaf).__name__}"
            )
    header = pickle.dumps((spec, meta), protocol=pickle.HIGHEST_PROTOCOL)
    head = torch.frombuffer(bytearray(_LEN.pack(len(header)) + header), dtype=torch.uint8)
    data = torch.cat([head, *body]) if body else head
    return data, int(data.numel() - head.numel())


def unpack(data: torch.Tensor) -> Any:
    """Inverse of :func:`pack` (tensors come back on the CPU, as fresh memory)."""
    raw = data.cpu()
    (n,) = _LEN.unpack(bytes(raw[: _LEN.size].tolist()))
    spec, meta = pickle.loads(bytes(raw[_LEN.size : _LEN.size + n].numpy().tobytes()))  # noqa: S301 - our own header
    offset = _LEN.size + n
    leaves = []
    for item in meta:
        if item[0] == "t":
            dtype = getattr(torch, item[1])
            shape = item[2]
            count = 1
            for s in shape:
                count *= s
            size = count * torch.empty(0, dtype=dtype).element_size()
            leaves.append(raw[offset : offset + size].clone().view(dtype).reshape(shape))
            offset += size
        elif item[0] == "o":
            leaves.append(item[1])
        else:
            chunk = bytes(raw[offset : offset + 8].tolist())
            leaves.append(_INT.unpack(chunk)[0] if item[0] == "i" else _NUMBER.unpack(chunk)[0])
            offset += 8
    return tree_unflatten(leaves, spec)


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

    def all_reduce_sum(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Elementwise sums over ranks of ``tensors`` (one flat buffer per dtype). Counted as the
        ring algorithm's ``2 (N - 1) / N`` of the buffer sent and received per rank."""
        out = [t.detach().clone() for t in tensors]
        by_dtype: dict[torch.dtype, list[int]] = {}
        for i, t in enumerate(out):
            by_dtype.setdefault(t.dtype, []).append(i)
        for idx in by_dtype.values():
            flat = torch.cat([out[i].reshape(-1) for i in idx]).to(self.device)
            dist.all_reduce(flat, group=self.group)
            flat = flat.cpu()
            nbytes = flat.numel() * flat.element_size()
            moved = int(round(2 * (self.world - 1) / self.world * nbytes))
            self.stats["sent"] += moved
            self.stats["received"] += moved
            self.stats["body_sent"] += moved
            offset = 0
            for i in idx:
                n = out[i].numel()
                out[i] = flat[offset : offset + n].reshape(out[i].shape).to(tensors[i].device)
                offset += n
        return out
