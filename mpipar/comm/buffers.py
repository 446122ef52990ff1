"""Torch tensors as MPI buffers: dtypes (bf16/fp16 included), layouts, host staging.

- Every torch dtype is carried as raw bits of an equal-width MPI integer type
  when MPI has no matching type (bf16, fp16, bool). Reductions of bf16/fp16 run
  in float32 (MPI has no bf16 sum) and are rounded back once at the end.
- Non-contiguous tensors are copied into a contiguous buffer and back.
- CUDA tensors go straight to MPI when it is CUDA-aware; otherwise through a
  pinned host buffer that is reused between calls (`StagingPool`).
"""
from __future__ import annotations

import contextlib

import numpy as np
import torch

from ..errors import MpiparError
from ..settings import current

# torch dtype -> (dtype whose numpy view carries the bits, reducible by MPI natively)
_CARRIER = {
    torch.float64: (torch.float64, True),
    torch.float32: (torch.float32, True),
    torch.float16: (torch.int16, False),
    torch.bfloat16: (torch.int16, False),
    torch.int64: (torch.int64, True),
    torch.int32: (torch.int32, True),
    torch.int16: (torch.int16, True),
    torch.int8: (torch.int8, True),
    torch.uint8: (torch.uint8, True),
    torch.bool: (torch.uint8, False),
    torch.complex64: (torch.complex64, False),
    torch.complex128: (torch.complex128, False),
}
DTYPE_CODES = {dt: i for i, dt in enumerate(_CARRIER)}
MAX_NDIM = 8  # most dims a shape header carries (channel, argument agreement, TP checks, symmetric_empty)


def dtype_code(dtype: torch.dtype) -> int:
    if dtype not in DTYPE_CODES:
        raise MpiparError(f"dtype {dtype} is not supported by mpipar.comm")
    return DTYPE_CODES[dtype]


def reduce_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a reduction runs in: float32 for bf16/fp16, int64 for bool."""
    if dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    if dtype is torch.bool:
        return torch.uint8
    if dtype.is_complex:
        raise MpiparError(f"reductions of {dtype} are not supported")
    return dtype


def np_view(t: torch.Tensor) -> np.ndarray:
    """Zero-copy numpy view of a contiguous CPU tensor, carried by an MPI-known dtype."""
    carrier = _CARRIER[t.dtype][0]
    v = t if carrier is t.dtype else t.view(carrier)
    return (v.detach() if v.requires_grad else v).numpy()  # each torch call costs: p2p's hot path


def mpi_buffer(t: torch.Tensor):
    """Something mpi4py accepts as a buffer for a contiguous tensor (CPU or CUDA-aware)."""
    if t.is_cpu:
        return np_view(t if t.dim() == 1 else t.reshape(-1))
    if t.device.type == "cuda":  # MPI reads/writes device memory outside torch's stream order
        torch.cuda.current_stream(t.device).synchronize()
    carrier, _ = _CARRIER[t.dtype]
    return t.reshape(-1).view(carrier) if carrier != t.dtype else t.reshape(-1)


_MPI_TYPES: dict = {}


def _mpi_type(carrier: torch.dtype):
    """The MPI datatype of a carrier dtype (cached after the first lookup)."""
    if not _MPI_TYPES:
        from mpi4py import MPI

        _MPI_TYPES.update({
            torch.float64: MPI.DOUBLE, torch.float32: MPI.FLOAT, torch.int64: MPI.INT64_T,
            torch.int32: MPI.INT32_T, torch.int16: MPI.INT16_T, torch.int8: MPI.INT8_T,
            torch.uint8: MPI.UINT8_T, torch.complex64: MPI.C_FLOAT_COMPLEX,
            torch.complex128: MPI.C_DOUBLE_COMPLEX,
        })
    return _MPI_TYPES[carrier]


def address_buffer(t: torch.Tensor):
    """[raw memory, MPI datatype] of a contiguous non-empty CPU tensor, for a plain buffer
    argument (not inside a vector spec): skips the numpy round trip on latency-bound calls.
    Cached by (address, bytes, dtype): a buffer object only names memory (it owns none), so
    one built for the same address and length is the same argument."""
    key = (t.data_ptr(), t.numel() * t.element_size(), t.dtype)
    spec = _ADDRESS.get(key)
    if spec is None:
        from mpi4py import MPI

        if len(_ADDRESS) > 1024:
            _ADDRESS.clear()
        spec = _ADDRESS[key] = [MPI.buffer.fromaddress(key[0], key[1]), _mpi_type(_CARRIER[t.dtype][0])]
    return spec


_ADDRESS: dict = {}


def borrowed_buffer(t: torch.Tensor):
    """mpi_buffer(t) for a call that completes while its caller keeps `t` alive: a blocking
    collective, a request waited at once, or one whose Pending (mpipar.comm.channel) holds
    `t` until it completes. A contiguous CPU tensor's memory goes by address (a numpy view
    per buffer costs torch calls on latency-bound paths). Such a buffer does not keep `t` alive itself, so it is never
    for a raw request its caller may outlive."""
    if t.is_cpu and t.numel() and t.is_contiguous():
        return address_buffer(t)
    return mpi_buffer(t)


class StagingPool:
    """Reusable pinned host buffers for CUDA tensors when MPI is not CUDA-aware."""

    def __init__(self):
        self._buffers: dict[tuple, torch.Tensor] = {}

    def get(self, numel: int, dtype: torch.dtype, slot: int = 0) -> torch.Tensor:
        key = (dtype, slot)
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < numel:
            pin = torch.cuda.is_available()
            buf = torch.empty(max(numel, 1), dtype=dtype, pin_memory=pin)
            self._buffers[key] = buf
        return buf[:numel]


STAGING = StagingPool()


def staging_forced() -> bool:
    """MPIPAR_FORCE_STAGING=1 (test-only): every tensor passes through host staging buffers."""
    return current().force_staging == "1"


def needs_staging(t: torch.Tensor) -> bool:
    """True when `t` must pass through host memory (forced by MPIPAR_FORCE_STAGING=1)."""
    if current().force_staging == "1":  # staging_forced(), inlined: every p2p call asks
        return True
    if t.is_cpu:
        return False
    from ..device import mpi_is_cuda_aware

    return not mpi_is_cuda_aware()


@contextlib.contextmanager
def host_contiguous(t: torch.Tensor, write_back: bool = True, slot: int = 0):
    """Yield a contiguous tensor MPI can use in place of `t`; copy results back on exit.

    CPU contiguous: `t` itself (zero copy). Non-contiguous: a contiguous copy.
    CUDA, not CUDA-aware (or forced staging): a reused pinned host buffer.
    """
    t = t.detach()
    staged = needs_staging(t)
    if not staged and t.is_contiguous():
        yield t
        return
    if staged:
        work = STAGING.get(t.numel(), t.dtype, slot).view(t.shape)
        work.copy_(t, non_blocking=False)
    else:
        work = t.contiguous()
    yield work
    if write_back:
        t.copy_(work)


def overlaps(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Do the memory spans of two contiguous tensors intersect? (MPI forbids a send buffer that
    aliases the receive buffer.)"""
    pa, pb = a.data_ptr(), b.data_ptr()
    return pa < pb + b.numel() * b.element_size() and pb < pa + a.numel() * a.element_size()


def flat_chunks(numel: int, parts: int) -> list[int]:
    """Sizes of `parts` near-equal chunks (first numel % parts get one more), like tensor_split."""
    base, extra = divmod(numel, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def offsets(counts: list[int]) -> list[int]:
    out, acc = [], 0
    for c in counts:
        out.append(acc)
        acc += c
    return out


def memo(cache: dict, key, build, limit: int):
    """cache[key], built by build() on first use; the cache is emptied once it holds more
    than `limit` entries (views kept for a hot path, bounded)."""
    value = cache.get(key)
    if value is None:
        if len(cache) > limit:
            cache.clear()
        value = cache[key] = build()
    return value
