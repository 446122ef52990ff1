"""Element kernels of the shared-memory collectives: typed views, reductions, tiling.

numpy does the work (single-threaded, safe on shared memory):
bf16 travels as int16 bits, bool as numpy bool (sum = logical or). bf16 and
fp16 are reduced in float32 chunk by chunk and rounded to nearest-even once.
"""
from __future__ import annotations

import numpy as np
import torch

from ..buffers import flat_chunks, memo, offsets
from ...settings import current

_UFUNC = {"sum": np.add, "max": np.maximum, "min": np.minimum}
_NP = {
    torch.float64: np.float64, torch.float32: np.float32, torch.float16: np.float16,
    torch.bfloat16: np.int16, torch.int64: np.int64, torch.int32: np.int32, torch.int16: np.int16,
    torch.int8: np.int8, torch.uint8: np.uint8, torch.bool: np.bool_,
    torch.complex64: np.complex64, torch.complex128: np.complex128,
}


CHUNK_BYTES = 512 * 1024


def chunk_elements(itemsize: int) -> int:
    """Elements per cache-sized chunk (MPIPAR_SHM_CHUNK_BYTES; the default was the best of 256 KiB,
    512 KiB and 1 MiB in experiments/collectives.py, results/README.md)."""
    nbytes = current().shm_chunk_bytes or CHUNK_BYTES
    return max(64, nbytes // itemsize)


def typed(u8: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    """The bytes `u8` as a numpy array carrying `dtype` (bf16 as int16 bits)."""
    return u8.view(_NP[dtype])


def np_of(t: torch.Tensor) -> np.ndarray:
    """Zero-copy numpy view of a CPU tensor (bf16 as int16 bits)."""
    return (t.view(torch.int16) if t.dtype is torch.bfloat16 else t).numpy()


def _to_f32(x: np.ndarray, dtype) -> np.ndarray:
    if dtype is torch.bfloat16:
        wide = x.view(np.uint16).astype(np.uint32)
        np.left_shift(wide, 16, out=wide)
        return wide.view(np.float32)
    return x.astype(np.float32)


def from_f32(dst: np.ndarray, acc: np.ndarray, dtype) -> None:
    """Round float32 `acc` to `dtype` (nearest-even) into `dst`."""
    if dtype is torch.bfloat16:
        np.copyto(dst, torch.from_numpy(acc).to(torch.bfloat16).view(torch.int16).numpy())
    else:
        np.copyto(dst, acc, casting="unsafe")


def is_half(dtype) -> bool:
    return dtype in (torch.float16, torch.bfloat16)


def accumulate_f32(first, rest, dtype, op) -> np.ndarray:
    """float32 op-reduction of `first` and `rest` (16-bit float inputs)."""
    fn, acc = _UFUNC[op], _to_f32(first, dtype)
    for s in rest:
        fn(acc, _to_f32(s, dtype), out=acc)
    return acc


def reduce_into(dst, first, rest, dtype, op) -> None:
    """dst = op(first, *rest), in `rest` order; `dst` may alias `first`; halves round once."""
    if is_half(dtype):
        from_f32(dst, accumulate_f32(first, rest, dtype, op), dtype)
        return
    fn = _UFUNC[op]
    fn(first, rest[0], out=dst)
    for s in rest[1:]:
        fn(dst, s, out=dst)


def blocks(rows: int, cols: int, chunk: int):
    """(r0, r1, c0, c1) tiles of a rows x cols region, each about `chunk` elements."""
    if cols >= chunk:
        for r in range(rows):
            for c in range(0, cols, chunk):
                yield r, r + 1, c, min(c + chunk, cols)
    elif cols > 0:
        step = max(1, chunk // cols)
        for r in range(0, rows, step):
            yield r, min(r + step, rows), 0, cols


def owner_slices(numel: int, parts: int, itemsize: int) -> list[tuple[int, int]]:
    """[lo, hi) element range of each part, boundaries on 64-byte multiples (no false sharing)."""
    unit = max(1, 64 // itemsize)
    counts = flat_chunks(-(-numel // unit), parts)
    out = []
    for off, c in zip(offsets(counts), counts):
        out.append((min(off * unit, numel), min((off + c) * unit, numel)))
    return out


def owned(window, n: int, me: int, offset: int, numel: int, dtype) -> tuple:
    """(rank me's owned slice, the other ranks' same slices) of the symmetric tensor of `numel`
    `dtype` elements at `offset` of `window` (n ranks: see owner_slices), as numpy views."""
    views = [typed(window.view(p, offset, numel * dtype.itemsize), dtype) for p in range(n)]
    lo, hi = owner_slices(numel, n, dtype.itemsize)[me]
    return views[me][lo:hi], [views[p][lo:hi] for p in range(n) if p != me]


def cached_plan(window, key, build):
    """window.plans[key], built by build() once: a training loop all-reduces the same buffers
    every step, and rebuilding the views is Python per call on the hot path. Kept on the window
    (freed with it); cleared when it holds more than 64 plans."""
    return memo(window.plans, key, build, 64)
