"""Compiled kernels of the shared-memory collectives (shm_compiled.c), built on first use.

- Sum and push (all-reduce; float32/64, int32/64): numpy needs two calls per
  cache-sized chunk of the slice a rank owns, an add into its own chunk, then a copy
  into every peer's. `sum_push` does the same in one call, 8 KiB block by block
  (own[i] = peers[k][i] = own[i] + peers[0][i] + ..., numpy's order), bit-identical
  to numpy. Measured side by side with 2 ranks, one rank's slice of a float32
  all-reduce of that size (ms; 4-32 KiB blocks, numpy, the in-place pass over the
  whole tensor): 16 MiB 0.45-0.54, 0.69, 0.56; 128 MiB 9.7-10.2, 11.1, 9.6; 256 MiB
  19.9-22.1, 22.5, 19.2.
- Streaming copy (`copy`: all-gather pieces, broadcast): copies of at least
  MPIPAR_SHM_STREAM_BYTES (default 8 MiB) use non-temporal stores: 1.4-2x glibc's
  memcpy from 16 MiB on here (figures in shm_compiled.c); smaller ones np.copyto.
  `fanout` streams one source into several destinations reading it once (the all-gather
  that pushes its piece into every rank's symmetric output).

Built with the C compiler ($CC, else `cc`; -O3 -march=native, so the file name hashes
this CPU's feature flags with the source and the flags) into $MPIPAR_KERNEL_CACHE, else
$XDG_CACHE_HOME/mpipar, else ~/.cache/mpipar. Each process compiles to a temporary name
and renames it into place, so ranks that race all load a complete file. A library is
loaded from the cache only if this user owns it and its folder and nobody else can
write either (a library planted there would run its code at load time); otherwise it
is rebuilt in a private temporary folder (one warning naming the refused path). Without a
compiler, or when the build fails, numpy does the work (one warning): the same results,
bit for bit. MPIPAR_SHM_COMPILED=0 turns both kernels off.
"""
from __future__ import annotations

import ctypes
import subprocess
import warnings
from pathlib import Path

import numpy as np
import torch

from .kernels import cached_plan, owned
from ...native import build_and_load, cache_dir, cache_name, compiler, cpu_features, untrusted  # noqa: F401
from ...settings import current

SOURCE = Path(__file__).with_name("compiled.c")
FLAGS = ("-O3", "-march=native", "-fPIC", "-shared", "-fwrapv", "-ffp-contract=off", "-fno-fast-math")
TYPES = {torch.float32: "float32", torch.float64: "float64", torch.int32: "int32", torch.int64: "int64"}
_loaded: dict = {}  # this process's build: {"lib": CDLL or None} once tried (a compiled file, not comm state)


def cache_path(cc: str) -> Path:
    """Where the library built by `cc` for this source, these flags and this CPU is cached."""
    return cache_dir() / cache_name(SOURCE, "shm_compiled", ".so", cc, *FLAGS, cpu_features())


def _build(cc: str) -> ctypes.CDLL:
    lib = build_and_load(SOURCE, [cc, *FLAGS], cache_path(cc), lambda path: ctypes.CDLL(str(path)))
    for name in TYPES.values():
        fn = getattr(lib, f"sum_push_{name}")
        fn.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p), ctypes.c_int, ctypes.c_size_t]
        fn.restype = None
    lib.stream_copy.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
    lib.stream_copy.restype = None
    lib.stream_fanout.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t]
    lib.stream_fanout.restype = None
    lib.stream_width.restype = ctypes.c_int
    return lib


def library() -> ctypes.CDLL | None:
    """The built kernel library (built on the first call of this process), or None."""
    if "lib" not in _loaded:
        cc, lib = compiler(), None
        if cc is not None:
            try:
                lib = _build(cc)
            except (OSError, subprocess.SubprocessError, AttributeError) as e:
                detail = getattr(e, "stderr", b"") or b""
                warnings.warn(f"mpipar: building {SOURCE.name} failed ({e}; {detail.decode(errors='replace')[:500]}); "
                              "the shared-memory collectives use numpy", RuntimeWarning, stacklevel=2)
        _loaded["lib"] = lib
    return _loaded["lib"]


def enabled() -> ctypes.CDLL | None:
    """The library unless MPIPAR_SHM_COMPILED=0 or it cannot be built."""
    return None if current().shm_compiled == "0" else library()


def stream_copy_address() -> int | None:
    """The C address of stream_copy, for C callers that copy megabytes (fast.c's payload slots),
    or None where enabled() is None. Read from the built library itself: a wrapper around
    library() (a test's counting one) has no C address to give."""
    if enabled() is None:
        return None
    return ctypes.cast(_loaded["lib"].stream_copy, ctypes.c_void_p).value


def kernel(dtype: torch.dtype, op: str):
    """The sum_push function for this dtype, or None (op other than sum, another dtype,
    MPIPAR_SHM_COMPILED=0, no compiler): then use numpy."""
    if op != "sum" or dtype not in TYPES:
        return None
    lib = enabled()
    return None if lib is None else getattr(lib, f"sum_push_{TYPES[dtype]}")


def bind(fn, own: np.ndarray, peers: list[np.ndarray]):
    """A no-argument call of `fn` on these contiguous arrays (own[i] = peers[k][i] = their sum);
    it keeps the arrays alive while it exists."""
    if (fn.__name__ != f"sum_push_{own.dtype.name}" or not own.flags.c_contiguous
            or any(not p.flags.c_contiguous or p.shape != own.shape or p.dtype != own.dtype for p in peers)):
        raise ValueError(f"shm_compiled: {fn.__name__} needs contiguous arrays of one shape and its dtype")
    ptrs = (ctypes.c_void_p * max(1, len(peers)))(*[p.ctypes.data for p in peers])
    args = (ctypes.c_void_p(own.ctypes.data), ptrs, ctypes.c_int(len(peers)), ctypes.c_size_t(own.size))

    def call(_keep=(own, peers, ptrs)):
        fn(*args)
    return call


def sum_push_plan(pool, window, offset: int, numel: int, dtype, op: str):
    """The bound sum_push over this rank's slice of the symmetric tensor at (window, offset),
    cached on the window (mpipar.comm.symmetric.kernels.cached_plan); None where it does not apply."""
    fn = kernel(dtype, op) if pool.local_size > 1 else None
    if fn is None:
        return None
    me, n = pool.local_rank, pool.local_size
    return cached_plan(window, ("sum_push", offset, numel, dtype),
                       lambda: bind(fn, *owned(window, n, me, offset, numel, dtype)))


STREAM_BYTES = 8 << 20  # copies from this size stream (MPIPAR_SHM_STREAM_BYTES); see the module docstring


def stream_bytes() -> int:
    value = current().shm_stream_bytes
    return STREAM_BYTES if value is None else value


def streaming() -> bool:
    """Does `copy` stream large copies here (the kernels are on, built, and have streaming stores)?"""
    lib = enabled()
    return lib is not None and lib.stream_width() > 0


def fanout(dsts: list[np.ndarray], src: np.ndarray) -> None:
    """copy(dst, src) for every dst; streamed (stream_fanout: each source line read once) when
    all are contiguous and at least stream_bytes() long, as `copy` streams."""
    if dsts and all(_streams(d, src) for d in dsts):
        ptrs = (ctypes.c_void_p * len(dsts))(*[d.ctypes.data for d in dsts])
        library().stream_fanout(ptrs, len(dsts), src.ctypes.data, src.nbytes)
        return
    for d in dsts:
        copy(d, src)


def copy(dst: np.ndarray, src: np.ndarray) -> None:
    """np.copyto(dst, src) for arrays of one dtype and shape; a streaming copy when both are
    contiguous and at least stream_bytes() long and this machine's build has streaming stores."""
    if _streams(dst, src):
        library().stream_copy(dst.ctypes.data, src.ctypes.data, src.nbytes)
        return
    np.copyto(dst, src)


def _streams(dst: np.ndarray, src: np.ndarray) -> bool:
    """Does a copy of src into dst stream: both contiguous, one dtype and shape, at least
    stream_bytes() long, and a build with streaming stores?"""
    return (src.nbytes >= stream_bytes() and dst.dtype == src.dtype and dst.shape == src.shape
            and dst.flags.c_contiguous and src.flags.c_contiguous and streaming())
