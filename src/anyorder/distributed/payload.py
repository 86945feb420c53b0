"""What one process sends per step: its query seed and its projected gradient, optionally in one byte.

"Just One Byte (per gradient)" (the zeroth-order analogue of gradient compression) observes that a
process's contribution to a zeroth-order step is a random seed and one scalar. The scalar can be
quantised to 8 bits with a scale every process agrees on without sending it: here the scale is
derived from the values all processes have already received (an exponential moving average of
|g|), so it is the same everywhere.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["ScalarCodec", "encode", "decode", "payload_size"]

_SEED = struct.Struct("<I")  # 4-byte query seed
_FLOAT = struct.Struct("<f")  # 4-byte float32 scalar
NAN_CODE = -128  # int8 code for a non-finite value (the query is dropped everywhere)


@dataclass
class ScalarCodec:
    """Encodes the projected gradient as float32 (``bits=None``) or as an int8 code
    ``round(127 * clamp(g / scale, -1, 1))`` (``bits=8``).

    ``scale`` is ``headroom`` times an exponential moving average (``beta``) of the |g| every
    process decoded so far; until one value has been seen the codec sends float32. The state
    lives in the trainer's checkpoints, so a resumed run quantises exactly as before.
    """

    bits: int | None = None
    beta: float = 0.9
    headroom: float = 3.0
    mean_abs: float | None = None
    stats: dict[str, float] = field(
        default_factory=lambda: {"sent": 0, "abs_error": 0.0, "abs_value": 0.0, "rel_error": 0.0,
                                 "clipped": 0}
    )  # fmt: skip

    def __post_init__(self) -> None:
        if self.bits not in (None, 8):
            raise ValueError(f"bits must be None (float32) or 8, got {self.bits!r}")

    @property
    def quantised(self) -> bool:
        """Whether this step's scalars travel as one byte."""
        return self.bits == 8 and self.mean_abs is not None and self.mean_abs > 0

    @property
    def scale(self) -> float:
        return self.headroom * float(self.mean_abs or 0.0)

    def scalar_size(self) -> int:
        """Bytes of the scalar this step (1 when quantised, 4 otherwise)."""
        return 1 if self.quantised else 4

    def encode_scalar(self, g: float) -> bytes:
        if not self.quantised:
            return _FLOAT.pack(g if math.isfinite(g) else math.nan)
        if not math.isfinite(g):
            return struct.pack("<b", NAN_CODE)
        ratio = g / self.scale
        code = int(round(127 * max(-1.0, min(1.0, ratio))))
        decoded = code * self.scale / 127
        self.stats["sent"] += 1
        self.stats["abs_error"] += abs(decoded - g)
        self.stats["abs_value"] += abs(g)
        self.stats["rel_error"] += abs(decoded - g) / max(abs(g), 1e-30)
        self.stats["clipped"] += int(abs(ratio) > 1)
        return struct.pack("<b", code)

    def decode_scalar(self, data: bytes) -> float:
        if not self.quantised:
            return float(_FLOAT.unpack(data)[0])
        (code,) = struct.unpack("<b", data)
        return math.nan if code == NAN_CODE else code * self.scale / 127

    def observe(self, values: list[float]) -> None:
        """Update the shared scale from this step's decoded values (identical on every process)."""
        finite = [abs(v) for v in values if math.isfinite(v)]
        if not finite:
            return
        mean = sum(finite) / len(finite)
        self.mean_abs = mean if self.mean_abs is None else (
            self.beta * self.mean_abs + (1 - self.beta) * mean
        )  # fmt: skip

    def error_report(self) -> dict[str, float]:
        """Quantisation error of the scalars this process sent: mean absolute error, that error
        relative to the mean |g| (``normalised_error``), the mean per-scalar relative error
        (large for g near 0) and the fraction clipped at the scale."""
        n = max(int(self.stats["sent"]), 1)
        return {
            "quantised_scalars": int(self.stats["sent"]),
            "mean_abs_error": self.stats["abs_error"] / n,
            "normalised_error": self.stats["abs_error"] / max(self.stats["abs_value"], 1e-30),
            "mean_rel_error": self.stats["rel_error"] / n,
            "clipped_fraction": self.stats["clipped"] / n,
        }

    def state_dict(self) -> dict[str, Any]:
        return {"bits": self.bits, "beta": self.beta, "headroom": self.headroom,
                "mean_abs": self.mean_abs}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.bits, self.beta = state["bits"], state["beta"]
        self.headroom, self.mean_abs = state["headroom"], state["mean_abs"]


def payload_size(codec: ScalarCodec) -> int:
    """Bytes one process contributes this step: the 4-byte query seed and the scalar."""
    return _SEED.size + codec.scalar_size()


def encode(codec: ScalarCodec, query: int, g: float) -> torch.Tensor:
    """This process's payload as a uint8 tensor of :func:`payload_size` bytes."""
    raw = _SEED.pack(query) + codec.encode_scalar(g)
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8)


def decode(codec: ScalarCodec, gathered: torch.Tensor) -> tuple[list[int], list[float]]:
    """Split the all-gathered payloads ``(world, payload_size)`` into (queries, values)."""
    queries, values = [], []
    for row in gathered:
        raw = bytes(row.tolist())
        queries.append(_SEED.unpack(raw[: _SEED.size])[0])
        values.append(codec.decode_scalar(raw[_SEED.size :]))
    return queries, values
