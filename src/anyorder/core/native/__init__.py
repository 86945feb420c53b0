"""An optional compiled kernel for the hot pass of zeroth-order steps on the CPU.

A ZO step passes over every weight three times, each pass adding ``alpha * z`` for a random
direction ``z``. With torch ops a Rademacher pass costs a random draw, an unpacking gather and an
add, about 0.7 ns per element on a 2-core CPU; :file:`rademacher.c` computes the direction's random
words on the fly and applies them in the same loop, about 0.25 ns per element (BENCHMARKS.md).

The C file ships with the package and is compiled on first use with the system's C compiler
(``$CC``, ``cc`` or ``gcc``) into a cache folder (``$ANYORDER_CACHE`` or ``~/.cache/anyorder``,
falling back to the temporary folder), once per source version. Where no compiler is found,
compilation fails, or ``ANYORDER_NATIVE=0`` is set, :func:`rademacher_axpy_` returns ``False``
and callers use the pure-torch path of :mod:`anyorder.core.rng`, which gives the same numbers
bit for bit (tested). :func:`status` says which path is in use.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import torch

__all__ = [
    "rademacher_axpy_",
    "rademacher_axpy_many_",
    "rademacher_guard_",
    "rademacher_unguard_",
    "guard_applies",
    "available",
    "status",
]

_SOURCE = Path(__file__).with_name("rademacher.c")
_FLAGS = ("-O3", "-ffp-contract=off", "-fno-fast-math", "-shared", "-fPIC")
_lock = threading.Lock()
_state: dict[str, object] = {}


def _cache_dirs() -> list[Path]:
    configured = os.environ.get("ANYORDER_CACHE")
    dirs = [Path(configured)] if configured else []
    dirs.append(Path.home() / ".cache" / "anyorder")
    dirs.append(
        Path(tempfile.gettempdir()) / f"anyorder-{os.getuid() if hasattr(os, 'getuid') else 0}"
    )
    return [d / "native" for d in dirs]


def _compile(compiler: str) -> Path:
    source = _SOURCE.read_bytes()
    tag = hashlib.sha256(
        source + " ".join(_FLAGS).encode() + platform.machine().encode() + compiler.encode()
    ).hexdigest()[:16]
    errors = []
    for folder in _cache_dirs():
        target = folder / f"rademacher-{tag}.so"
        if target.exists():
            return target
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=folder)
            os.close(fd)
            try:
                subprocess.run(
                    [compiler, *_FLAGS, str(_SOURCE), "-o", tmp],
                    check=True,
                    capture_output=True,
                    timeout=120,
                )
                os.replace(tmp, target)  # atomic: concurrent processes never load a partial file
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
            return target
        except (OSError, subprocess.SubprocessError) as exc:
            detail = getattr(exc, "stderr", b"") or b""
            errors.append(f"{folder}: {exc} {detail.decode(errors='replace').strip()}")
    raise RuntimeError("; ".join(errors))


def _load() -> ctypes.CDLL | None:
    if "lib" in _state:
        return _state["lib"]  # type: ignore[return-value]
    with _lock:
        if "lib" in _state:
            return _state["lib"]  # type: ignore[return-value]
        lib = None
        if os.environ.get("ANYORDER_NATIVE", "1") == "0":
            _state["why"] = "disabled by ANYORDER_NATIVE=0"
        elif (
            compiler := os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
        ) is None:
            _state["why"] = "no C compiler found (set CC); using the torch path"
        else:
            try:
                lib = ctypes.CDLL(str(_compile(compiler)))
                for name, real in (
                    ("rademacher_axpy_f32", ctypes.c_float),
                    ("rademacher_axpy_f64", ctypes.c_double),
                ):
                    fn = getattr(lib, name)
                    fn.argtypes = [
                        ctypes.c_void_p,
                        ctypes.c_int64,
                        ctypes.c_uint64,
                        ctypes.c_int64,
                        real,
                        real,
                    ]
                    fn.restype = None
                    many = getattr(lib, name.replace("axpy", "axpy_many"))
                    many.argtypes = [
                        ctypes.c_int64,
                        ctypes.c_void_p,
                        ctypes.c_void_p,
                        ctypes.c_uint64,
                        ctypes.c_void_p,
                        ctypes.c_void_p,
                        ctypes.c_void_p,
                    ]
                    many.restype = None
                    guard = getattr(lib, name.replace("axpy", "guard"))
                    guard.argtypes = [
                        ctypes.c_void_p,
                        ctypes.c_int64,
                        ctypes.c_uint64,
                        ctypes.c_int64,
                        real,
                        real,
                        ctypes.c_int,
                        real,
                        real,
                        ctypes.c_void_p,
                        ctypes.c_void_p,
                        ctypes.c_void_p,
                        ctypes.c_int64,
                        ctypes.c_void_p,
                    ]
                    guard.restype = ctypes.c_int64
                    unguard = getattr(lib, name.replace("axpy", "unguard"))
                    unguard.argtypes = [
                        ctypes.c_void_p,
                        ctypes.c_int64,
                        ctypes.c_uint64,
                        real,
                        ctypes.c_void_p,
                    ]
                    unguard.restype = None
                _state["why"] = f"compiled with {compiler}"
            except (OSError, RuntimeError, AttributeError) as exc:
                lib = None
                _state["why"] = f"compilation failed, using the torch path: {exc}"
                warnings.warn(
                    f"anyorder: could not build the native Rademacher kernel ({exc}); "
                    "zeroth-order steps use the slower torch path with the same numbers",
                    RuntimeWarning,
                    stacklevel=3,
                )
        _state["lib"] = lib
        return lib


def available() -> bool:
    """Whether the compiled kernel is in use (compiles it on first call)."""
    return _load() is not None


def status() -> str:
    """One line saying which path Rademacher passes take, and why."""
    _load()
    return str(_state["why"])


_FUNCTIONS = {torch.float32: "rademacher_axpy_f32", torch.float64: "rademacher_axpy_f64"}
_bump_version = getattr(torch.autograd.graph, "increment_version", None)


def rademacher_axpy_(flat: torch.Tensor, key: int, alpha: float, decay: float = 1.0) -> bool:
    """``flat <- decay * flat + alpha * z`` in place, ``z`` the Rademacher direction keyed by
    ``key`` (see :mod:`anyorder.core.rng`), if the kernel applies: a contiguous 1-D float32 or
    float64 CPU tensor and the kernel available. Returns ``False`` (touching nothing) otherwise."""
    name = _FUNCTIONS.get(flat.dtype)
    if name is None or flat.device.type != "cpu" or flat.dim() != 1 or not flat.is_contiguous():
        return False
    lib = _load()
    if lib is None:
        return False
    n = flat.numel()
    if n:
        getattr(lib, name)(flat.data_ptr(), n, key, 0, decay, alpha)
        if _bump_version is not None:
            _bump_version(flat)  # as an in-place torch op would
    return True


_REALS = {torch.float32: ctypes.c_float, torch.float64: ctypes.c_double}


def rademacher_axpy_many_(
    flats: list[torch.Tensor],
    prefix: int,
    indices: list[int],
    alphas: list[float],
    decays: list[float],
) -> list[int]:
    """:func:`rademacher_axpy_` over many tensors in one call per dtype: tensor ``t`` gets
    ``flats[t] <- decays[t] * flats[t] + alphas[t] * z_t``, ``z_t`` keyed by
    ``splitmix64(prefix ^ indices[t])`` (:func:`anyorder.core.rng._prefix` of its index).
    Returns the positions it did not handle (all of them without the kernel)."""
    lib = _load()
    if lib is None:
        return list(range(len(flats)))
    rest: list[int] = []
    by_dtype: dict[torch.dtype, list[int]] = {}
    for t, flat in enumerate(flats):
        if (
            flat.dtype in _FUNCTIONS
            and flat.device.type == "cpu"
            and flat.dim() == 1
            and flat.is_contiguous()
        ):
            by_dtype.setdefault(flat.dtype, []).append(t)
        else:
            rest.append(t)
    for dtype, members in by_dtype.items():
        count, real = len(members), _REALS[dtype]
        ptrs = (ctypes.c_void_p * count)(*(flats[t].data_ptr() for t in members))
        sizes = (ctypes.c_int64 * count)(*(flats[t].numel() for t in members))
        keys = (ctypes.c_int64 * count)(*(indices[t] for t in members))
        decay = (real * count)(*(decays[t] for t in members))
        alpha = (real * count)(*(alphas[t] for t in members))
        getattr(lib, _FUNCTIONS[dtype].replace("axpy", "axpy_many"))(
            count, ptrs, sizes, prefix, keys, decay, alpha
        )
        if _bump_version is not None:
            for t in members:
                _bump_version(flats[t])
    return rest


#: Escape slots per call of the guard kernel (it stops early when they run short).
_GUARD_SLOTS = 1 << 14


def guard_applies(flat: torch.Tensor) -> bool:
    """Whether :func:`rademacher_guard_` handles ``flat`` (the kernel's conditions)."""
    return (
        flat.dtype in _FUNCTIONS
        and flat.device.type == "cpu"
        and flat.dim() == 1
        and flat.is_contiguous()
        and _load() is not None
    )


def rademacher_guard_(
    flat: torch.Tensor,
    key: int,
    alpha_1: float,
    alpha_2: float | None,
    shifts: list[float],
    codes: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The first move of a query, ``flat += alpha_1 z``, fused with the analysis of
    :class:`anyorder.estimators.restore.PerturbationGuard` (see ``rademacher.c``): writes the
    2-bit codes into ``codes`` (if given) and returns the escapes ``(index, value)`` (``None``
    if there are none). Only for tensors where :func:`guard_applies`."""
    lib = _load()
    name = _FUNCTIONS[flat.dtype].replace("axpy", "guard")
    n = flat.numel()
    # Scratch for the escapes of one call, small against the tensor (the kernel stops early and
    # is called again when they run short): at most 1/64 of its elements plus one block.
    slots = min(_GUARD_SLOTS, 64 + n // 64)
    esc = torch.empty(slots, dtype=torch.int64)
    vals = torch.empty(slots, dtype=flat.dtype)
    found = ctypes.c_int64(0)
    two = alpha_2 is not None
    indices, values, done = [], [], 0
    size = flat.element_size()
    while done < n:
        processed = getattr(lib, name)(
            flat.data_ptr() + done * size,
            n - done,
            key,
            done // 64,
            alpha_1,
            alpha_2 if two else 0.0,
            int(two),
            shifts[0],
            shifts[1] if two else 0.0,
            None if codes is None else codes.data_ptr() + done // 4,
            esc.data_ptr(),
            vals.data_ptr(),
            slots,
            ctypes.byref(found),
        )
        if found.value:
            indices.append(esc[: found.value] + done)
            values.append(vals[: found.value].clone())
        done += processed
    if _bump_version is not None and n:
        _bump_version(flat)
    if not indices:
        return None
    index_dtype = torch.int32 if n < 2**31 else torch.int64
    return torch.cat(indices).to(index_dtype), torch.cat(values)


def rademacher_unguard_(flat: torch.Tensor, key: int, shift: float, codes: torch.Tensor) -> None:
    """The exact restore's arithmetic part over ``flat`` (see ``rademacher.c``): each element
    ``s`` becomes the number nearest ``s - shift z`` whose key has the saved low bits."""
    n = flat.numel()
    if n:
        name = _FUNCTIONS[flat.dtype].replace("axpy", "unguard")
        getattr(_load(), name)(flat.data_ptr(), n, key, shift, codes.data_ptr())
        if _bump_version is not None:
            _bump_version(flat)
