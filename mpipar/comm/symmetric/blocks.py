"""Shared-memory reduce-scatter and all-gather of flat buffers cut into equal blocks (ZeRO).

A flat buffer of n * s elements over the n ranks of a one-node group is cut into
n blocks of s elements; block r belongs to rank r (mpipar.models.zero.flat).
Several such buffers ("segments") may lie in one symmetric tensor: one call
moves all of them between one entry and one exit barrier
(mpipar.comm.symmetric.entry), where a collective per buffer pays two barriers each.

- reduce_scatter_blocks(src, g, [(start, out)], accumulate=False): `src`
  symmetric; `out` (plain memory, s elements) = src_0[blk] + src_1[blk] + ...
  + src_{n-1}[blk] with blk = [start + r*s, start + (r+1)*s), summed in rank
  order chunk by chunk (so: bit for bit the MPI reduce-scatter at 2 ranks; at
  more, MPI's order may differ in the last bit). accumulate=True adds that sum
  to `out` (out += sum, as a caller folding an MPI result would). bf16/fp16
  sources are summed in float32 into a float32 `out` (as the MPI path reduces them).
- all_gather_blocks(buf, g, [(start, s)]): `buf` symmetric, this rank's block
  of every segment already written in place; it is pushed into the same place
  of every peer's `buf` (each rank reads its block once and writes (n-1)/n of
  the data: compiled.fanout).
- gather_pieces(src, g, [(start, out)]): `src` symmetric, this rank's piece of
  s = out.numel() / n elements at `start`; `out` (plain memory) = the pieces
  of ranks 0..n-1 end to end (ZeRO-3 materialises a block's parameters in
  memory of its own, freed after use).

These force shared memory: the group must live on one node and `src`/`buf`
must be symmetric (the same window and offset on every rank), else MpiparError
on every rank (the entry exchange carries every rank's descriptor). No argument
agreement beyond that: the callers' segments are the same on every rank by construction.
"""
from __future__ import annotations

import ctypes

import numpy as np
import torch

from ...errors import MpiparError
from ...mesh import as_group
from . import compiled as shm_compiled
from .entry import barrier
from .kernels import accumulate_f32, chunk_elements, is_half, typed
from .pool import pool_of


def _enter(g, t: torch.Tensor, op: str, why: str | None):
    """(pool, window, byte offset of t) once every rank arrived; MpiparError on every rank when
    some rank's arguments are bad (`why`), the group spans nodes or `t` is not symmetric.
    The entry barrier carries each rank's [window, offset, nbytes] of `t` (-1s: bad arguments)."""
    pool = pool_of(g, create=True)
    if not pool.one_node:  # local_size == group size: the same answer on every rank
        raise MpiparError(f"{op}: the group must live on one node")
    if why is None and (t.dim() != 1 or not t.is_cpu):
        why = f"needs a 1-d CPU tensor, got shape {tuple(t.shape)} on {t.device}"
    found = pool.locate(t) if why is None else None
    if found is not None:
        found[0].sync()  # this rank's writes, visible to the peers
    table = pool.sync.wait(pool.descriptor(t, found))
    if not (table[0, 0] >= 0 and table.tobytes() == table[0].tobytes() * len(table)):
        raise MpiparError(f"{op}: {why}" if why else f"{op}: bad arguments on some rank, or a buffer that is not "
                          f"the same symmetric tensor (comm.symmetric_empty) on every rank of the group")
    window = pool.window(int(table[0, 0]))
    window.sync()
    return pool, window, int(table[0, 1])


def _by_address(t: torch.Tensor) -> np.ndarray:
    """A numpy view of contiguous CPU tensor `t` made from its address: `t.numpy()` would make the
    storage unresizable (ZeRO-3 frees and re-allocates its full parameter storage)."""
    nbytes = t.numel() * t.element_size()
    raw = np.ctypeslib.as_array((ctypes.c_uint8 * max(1, nbytes)).from_address(t.data_ptr()))[:nbytes]
    return typed(raw, t.dtype)


def _piece(window, peer: int, offset: int, start: int, count: int, dtype) -> np.ndarray:
    item = dtype.itemsize
    return typed(window.view(peer, offset + start * item, count * item), dtype)


def reduce_scatter_blocks(src: torch.Tensor, g, segments, accumulate: bool = False) -> None:
    """Collective over one-node group `g`: see the module doc. Sum only."""
    g = as_group(g)
    dtype = src.dtype
    half = is_half(dtype)
    want = torch.float32 if half else dtype
    bad = [out for _, out in segments if out.dtype != want or not out.is_contiguous() or not out.is_cpu]
    why = f"out must be contiguous CPU {want}, got {bad[0].dtype} on {bad[0].device}" if bad else None
    if why is None and any(start < 0 or start + g.size * out.numel() > src.numel() for start, out in segments):
        why = f"a segment of {g.size} blocks runs past the buffer's {src.numel()} elements"
    pool, window, offset = _enter(g, src, "reduce_scatter_blocks", why)
    n, me = pool.local_size, pool.local_rank
    step = chunk_elements(4 if half else dtype.itemsize)
    scratch = None
    with np.errstate(all="ignore"):  # inf/nan arithmetic is the user's business, as in torch
        for start, out in segments:
            s = out.numel()
            views = [_piece(window, p, offset, start + me * s, s, dtype) for p in range(n)]
            dst = _by_address(out)
            for c0 in range(0, s, step):
                c1 = min(c0 + step, s)
                parts = [v[c0:c1] for v in views]
                if half:
                    acc = accumulate_f32(parts[0], parts[1:], dtype, "sum")
                    if accumulate:
                        np.add(dst[c0:c1], acc, out=dst[c0:c1])
                    else:
                        np.copyto(dst[c0:c1], acc)
                    continue
                if accumulate:
                    if scratch is None:
                        scratch = np.empty(step, dtype=dst.dtype)
                    into = scratch[:c1 - c0]
                else:
                    into = dst[c0:c1]
                if n == 1:
                    np.copyto(into, parts[0])
                else:
                    np.add(parts[0], parts[1], out=into)
                    for part in parts[2:]:
                        np.add(into, part, out=into)
                if accumulate:
                    np.add(dst[c0:c1], into, out=dst[c0:c1])
    barrier(pool, window)


def all_gather_blocks(buf: torch.Tensor, g, segments) -> None:
    """Collective over one-node group `g`: see the module doc."""
    g = as_group(g)
    why = None
    if any(start < 0 or s < 0 or start + g.size * s > buf.numel() for start, s in segments):
        why = f"a segment of {g.size} blocks runs past the buffer's {buf.numel()} elements"
    pool, window, offset = _enter(g, buf, "all_gather_blocks", why)
    n, me, dtype = pool.local_size, pool.local_rank, buf.dtype
    for start, s in segments:
        mine = _piece(window, me, offset, start + me * s, s, dtype)
        peers = [_piece(window, p, offset, start + me * s, s, dtype) for p in range(n) if p != me]
        shm_compiled.fanout(peers, mine)
    barrier(pool, window)


def gather_pieces(src: torch.Tensor, g, segments) -> None:
    """Collective over one-node group `g`: see the module doc."""
    n, dtype = as_group(g).size, src.dtype
    bad = [out for _, out in segments if out.dtype != dtype or not out.is_contiguous() or not out.is_cpu
           or out.numel() % n]
    why = f"out must be contiguous CPU {dtype} of a multiple of {n} elements" if bad else None
    if why is None and any(start < 0 or start + out.numel() // n > src.numel() for start, out in segments):
        why = f"a piece runs past the buffer's {src.numel()} elements"
    pool, window, offset = _enter(g, src, "gather_pieces", why)
    for start, out in segments:
        s = out.numel() // n
        dst = _by_address(out)
        for p in range(n):
            shm_compiled.copy(dst[p * s:(p + 1) * s], _piece(window, p, offset, start, s, dtype))
    barrier(pool, window)
