"""Bit-exact restore of perturbed weights without a copy of them (issue 13).

A zeroth-order step moves the weights in place: ``a = fl(w + alpha_1 z)``, then (two-sided)
``b = fl(a + alpha_2 z)``. If the closure raises, or a loss is non-finite, the weights must go
back to ``w`` bit for bit. Subtracting the displacement again (MeZO's restore) misses by an ulp
for a few per cent of the elements after one move and for about half of them after two; a copy
of the weights is exact but doubles their memory. :class:`PerturbationGuard` keeps only what the
arithmetic restore loses, computed while the original chunk is at hand in the first move of
each query:

* **2 bits per element**: the low two bits of the element's *ordered key* (its bit pattern made
  monotone in its value: negative patterns have their magnitude bits flipped, so -0.0 and +0.0
  are neighbours and an ulp is a step of 1 across zero too), 16 bytes per 64 elements (byte j
  of a block holds elements j, j+16, j+32 and j+48, a layout whose packing vectorises);
* **escapes**: index and original value of the elements for which the restore from any state the
  step can leave them in (``a``, and ``b`` when two-sided) is more than one key step off, which
  happens where ``|w|`` is small against ``alpha |z|`` (zeros and tiny weights).

The restore (:meth:`PerturbationGuard.restore`) computes ``r = s - D z`` in float64 (``D`` the
displacement the weights carry) rounded to the weights' dtype, moves ``r``'s key to the nearest
key with the saved low bits (one of ``key(r) - 1``, ``key(r)``, ``key(r) + 1``), and writes the
escapes back. Because the analysis runs the very operations the later passes and the restore
run, on the same chunks, it does not depend on how a backend rounds (fused multiply-add or not):
an element either comes back within one key step, or it is an escape.

Memory: ``numel / 4`` bytes per tensor (1/16 of float32 weights, 1/8 of bfloat16 ones) plus the
escapes (index and value: 8-16 bytes each), alive during the step only. Rademacher directions
of float32/float64 CPU tensors go through the compiled kernel
(:func:`anyorder.core.native.rademacher_guard_`), which does the whole analysis inside the
first move; everything else goes through torch operations on chunks of
:data:`anyorder.core.rng.CHUNK` elements, the same numbers bit for bit (tested).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from anyorder.core.rng import _prefix, flat_view

__all__ = ["PerturbationGuard", "ordered_keys", "from_ordered_keys"]

_INT = {
    torch.float64: torch.int64,
    torch.float32: torch.int32,
    torch.bfloat16: torch.int16,
    torch.float16: torch.int16,
}


def ordered_keys(x: torch.Tensor) -> torch.Tensor:
    """Integer keys monotone in ``x``'s value, one step per representable number (-0.0 is -1,
    +0.0 is 0); int64 for float64, int32 otherwise."""
    bits = x.view(_INT[x.dtype])
    width = bits.element_size() * 8
    keys = bits ^ ((bits >> (width - 1)) & ((1 << (width - 1)) - 1))
    return keys if width >= 32 else keys.to(torch.int32)


def from_ordered_keys(keys: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The inverse of :func:`ordered_keys` (the transform is its own inverse)."""
    bits = keys.to(_INT[dtype])
    width = bits.element_size() * 8
    return (bits ^ ((bits >> (width - 1)) & ((1 << (width - 1)) - 1))).view(dtype)


def _displacement(alpha: float, dtype: torch.dtype) -> float:
    """``alpha`` as the passes apply it: rounded to float32 (the arithmetic type of float32,
    bfloat16 and float16 weights), exact for float64."""
    if dtype == torch.float64:
        return float(alpha)
    return float(torch.tensor(alpha, dtype=torch.float32))


def _reconstruct(state: torch.Tensor, z: torch.Tensor, shift: float) -> torch.Tensor:
    """``state - shift * z`` computed in float64 and rounded to ``state``'s dtype."""
    if state.dtype == torch.float64:
        return state - z * shift
    return (state.double() - z.double() * shift).to(state.dtype)


_SHIFTS = torch.tensor([0, 2, 4, 6], dtype=torch.uint8).view(1, 4, 1)


def _pack(codes: torch.Tensor) -> torch.Tensor:
    """2-bit codes (values 0..3) of a chunk starting at a multiple of 64, 16 bytes per 64
    elements: byte j of a block holds elements j, j+16, j+32, j+48 (the kernel's layout)."""
    n = codes.numel()
    padded = torch.zeros((n + 63) // 64 * 64, dtype=torch.uint8, device=codes.device)
    padded[:n] = codes
    quads = padded.view(-1, 4, 16) << _SHIFTS.to(codes.device)
    return (quads[:, 0] | quads[:, 1] | quads[:, 2] | quads[:, 3]).view(-1)


def _unpack(packed: torch.Tensor, n: int) -> torch.Tensor:
    return ((packed.view(-1, 1, 16) >> _SHIFTS.to(packed.device)) & 3).view(-1)[:n]


def _far(steps: torch.Tensor) -> torch.Tensor:
    """Key differences of more than one step (wrapped differences compare as the kernel's)."""
    return (steps > 1) | (steps < -1)


def _fix(r: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """The number nearest ``r`` (within one key step) whose key has the low bits ``codes``."""
    keys = ordered_keys(r)
    step = ((codes.to(keys.dtype) - keys + 1) & 3) - 1
    return from_ordered_keys(keys + step, r.dtype)


class PerturbationGuard:
    """Exact-restore bookkeeping for the moves of one SPSA step (see the module docstring).

    ``estimator`` supplies the directions (:meth:`anyorder.estimators.SPSA.chunks`); ``params``
    are the ``(index, tensor)`` pairs being moved. Call :meth:`first_move_` for the first move of
    each query (it applies ``w += alpha_1 z``, exactly as the estimator's pass would, and
    analyses the states ``a`` and, if ``alpha_2`` is given, ``b = a + alpha_2 z``), report the
    second move with :meth:`moved`, and call :meth:`restore` to put the step's starting weights
    back bit for bit from whichever of those states the weights are in.
    """

    def __init__(self, estimator: Any, params: Sequence[tuple[int, torch.Tensor]], step: int):
        self.estimator = estimator
        self.params = list(params)
        self.step = step
        self.query: int | None = None
        self.alphas: list[float] = []
        self.codes: dict[int, torch.Tensor] = {}
        self.escapes: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    # -- bookkeeping --------------------------------------------------------------------------
    def nbytes(self) -> int:
        """Bytes held now (codes and escapes)."""
        total = sum(c.numel() for c in self.codes.values())
        for index, values in self.escapes.values():
            total += index.numel() * index.element_size() + values.numel() * values.element_size()
        return total

    def escape_count(self) -> int:
        """Elements of the current query stored whole."""
        return sum(values.numel() for _, values in self.escapes.values())

    def _native(self, p: torch.Tensor) -> bool:
        from anyorder.core import native

        return (
            self.estimator.resolve_distribution(p.device) == "rademacher"
            and native.guard_applies(p)
        )

    # -- the first move of a query --------------------------------------------------------------
    @torch.no_grad()
    def first_move_(self, query: int, alpha_1: float, alpha_2: float | None) -> None:
        """``w += alpha_1 z_query`` on every tensor, recording what the restore from ``a`` (and
        from ``b = a + alpha_2 z``) needs. The weights must be the step's starting weights."""
        first = not self.codes
        self.escapes = {}
        self.query, self.alphas = query, []
        for t, (index, p) in enumerate(self.params):
            flat = flat_view(p)
            n = flat.numel()
            if first:
                self.codes[t] = torch.empty((n + 63) // 64 * 16, dtype=torch.uint8, device=p.device)
            shifts = [_displacement(alpha_1, p.dtype)]
            if alpha_2 is not None:
                shifts.append(shifts[0] + _displacement(alpha_2, p.dtype))
            if self._native(flat):
                from anyorder.core import native

                key = _prefix(self.estimator.seed, self.step, query, index)
                found = native.rademacher_guard_(
                    flat, key, alpha_1, alpha_2, shifts, self.codes[t] if first else None
                )
            else:
                found = self._first_move_torch(t, index, p, flat, query, alpha_1, alpha_2, shifts, first)
            if found is not None and found[0].numel():
                self.escapes[t] = found
        self.alphas.append(alpha_1)

    def _first_move_torch(self, t, index, p, flat, query, alpha_1, alpha_2, shifts, first):
        found_index, found_values = [], []
        for start, end, z in self.estimator.chunks(index, p, self.step, query):
            w = flat[start:end]
            w0 = w.clone()
            k0 = ordered_keys(w0)
            if first:
                self.codes[t][start // 4 : (end + 63) // 64 * 16] = _pack(k0 & 3)
            w.add_(z, alpha=alpha_1)  # the move itself, as the estimator's pass makes it
            bad = _far(ordered_keys(_reconstruct(w, z, shifts[0])) - k0)
            if alpha_2 is not None:
                b = w.clone().add_(z, alpha=alpha_2)  # the second pass, on the same chunk
                bad |= _far(ordered_keys(_reconstruct(b, z, shifts[1])) - k0)
            where = bad.nonzero().view(-1)
            if where.numel():
                found_index.append(where + start)
                found_values.append(w0[where])
        if not found_index:
            return None
        index_dtype = torch.int32 if flat.numel() < 2**31 else torch.int64
        return torch.cat(found_index).to(index_dtype), torch.cat(found_values)

    def moved(self, alpha: float) -> None:
        """Record a further pass ``w += alpha z_query`` made by the estimator."""
        self.alphas.append(alpha)

    # -- the restore ----------------------------------------------------------------------------
    @torch.no_grad()
    def restore(self) -> None:
        """Put the step's starting weights back, bit for bit, from the state the moves of the
        current query left them in (nothing to do before the first move)."""
        if self.query is None or not self.alphas:
            return
        query = self.query
        for t, (index, p) in enumerate(self.params):
            flat = flat_view(p)
            shift = 0.0
            for alpha in self.alphas:
                shift += _displacement(alpha, p.dtype)
            if self._native(flat):
                from anyorder.core import native

                key = _prefix(self.estimator.seed, self.step, query, index)
                native.rademacher_unguard_(flat, key, shift, self.codes[t])
            else:
                codes = self.codes[t]
                for start, end, z in self.estimator.chunks(index, p, self.step, query):
                    w = flat[start:end]
                    r = _reconstruct(w, z, shift)
                    packed = codes[start // 4 : (end + 63) // 64 * 16]
                    w.copy_(_fix(r, _unpack(packed, end - start)))
            escaped = self.escapes.get(t)
            if escaped is not None:
                flat[escaped[0].long()] = escaped[1]
        self.alphas = []
        self.escapes = {}

