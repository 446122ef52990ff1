"""Shared-memory collectives on symmetric tensors: zero copy inside a node.

When every rank's tensor lives at the same place of the same window
(mpipar.comm.symmetric.pool), each rank reads and writes its peers' memory directly:
- all-reduce: rank r owns slice r (64-byte aligned); it walks its slice in
  cache-sized chunks (MPIPAR_SHM_CHUNK_BYTES, default 512 KiB), adds every
  peer's chunk into its own in place, then, while the chunk is in cache,
  PUSHES it into every peer's slot. Each element is reduced once, by its
  owner, so every rank ends bit-identical. Sums of float32/64 and int32/64 do
  both in one call of a compiled kernel (mpipar.comm.symmetric.compiled; faster than numpy's
  two calls per chunk), with numpy's results bit for bit. Large copies of the
  all-gather and broadcast stream (non-temporal stores, the same module).
- reduce-scatter: the owner of slice r reduces it, chunk by chunk, into its output.
- all-gather: below 32 MiB every rank pulls each peer's piece into its output (a
  recycled plain tensor, mpipar.comm.outputs); from 32 MiB (tuning.SHM_POOLED_OUTPUT_BYTES,
  MPIPAR_SHM_POOLED_OUTPUT_BYTES) outputs come from the pool, symmetric, and every rank
  PUSHES its piece into every rank's output, reading it once (compiled.fanout).
  all_gather(t, g, out=out) with `out` symmetric: every rank pushes its piece into
  every rank's `out`; in place (`t` is its slice of `out`) only into the peers', so a
  rank writes (N-1)/N of the output instead of all of it (results/TUNING.md).
- broadcast: every rank copies the root's tensor into its own.
Outputs are recycled because a fresh tensor of a few MiB is a fresh mmap whose
page faults cost more than the copy.
Entry and exit: mpipar.comm.symmetric.entry (Sync-Barrier-Sync on shared-memory flags).
bf16/fp16 reduce in float32 chunk by chunk and are rounded once.
algorithm="shm" forces this path for any tensor (staging it through a pooled
scratch window: one copy in, one copy out); "auto" takes it only for
symmetric tensors (tuning.choose_shared). Groups spanning nodes all-reduce
hierarchically (mpipar.comm.symmetric.hierarchical).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .. import outputs, tuning
from . import compiled as shm_compiled, hierarchical
from ..buffers import flat_chunks, offsets, reduce_dtype
from .kernels import blocks, cached_plan, chunk_elements, np_of, owned, reduce_into, typed
from .entry import SHM_ALGORITHMS, barrier, enter, stage_in
from .pool import pool_of

def _local_tensor(window, offset: int, t: torch.Tensor) -> torch.Tensor:
    nbytes = t.numel() * t.element_size()
    return torch.from_numpy(window.local[offset:offset + nbytes]).view(t.dtype).view(t.shape)


# -- collectives ---------------------------------------------------------------------------------
def take_prestaged(pool, window):
    """(window, offset) of an input every rank copied into `window` before the agreement
    (the agreement's table said so on every rank, so all take this branch)."""
    window.sync()
    return window, 0


def all_reduce(t: torch.Tensor, g, op: str, algorithm: str, entry=None, prestaged=None) -> bool:
    """In place on `t` through shared memory; False (nothing done) when this call does not apply.
    `entry`: the descriptor table of the agreement that already synchronised the ranks.
    `prestaged`: the scratch window that already holds `t` (copied before that agreement,
    which was then also the staging barrier: see prestage)."""
    if algorithm in SHM_ALGORITHMS:
        reduce_dtype(t.dtype)  # raises the same error on every rank for unsupported dtypes
    nbytes = t.numel() * t.element_size()
    plan = enter(g, t, algorithm, "all_reduce", nbytes, entry)
    if plan is None:
        return False
    pool, window, offset, choice = plan
    staged = window is None
    if staged and prestaged is not None and entry is not None and bool((entry[:, 0] == PRESTAGED).all()):
        window, offset = take_prestaged(pool, prestaged)  # every rank copied before the agreement
    elif staged:
        window, offset = stage_in(pool, t, nbytes), 0
    if choice == "hier":
        with np.errstate(all="ignore"):  # inf/nan arithmetic is the user's business, as in torch
            hierarchical.all_reduce_(pool, window, offset, t.numel(), t.dtype, op)
    else:
        _all_reduce(pool, window, offset, t.numel(), t.dtype, op)
    barrier(pool, window)
    if staged:
        t.copy_(_local_tensor(window, offset, t))
    return True


PRESTAGED = -2  # the window slot of a rank's agreement descriptor when it prestaged (never a window id)


def prestage(g, t: torch.Tensor):
    """Copy `t` into this rank's segment of g's scratch window before the call's argument
    agreement, when the window exists and is large enough (local facts that are equal on every
    rank: the pool and its scratch are made collectively with agreed sizes), so that the
    agreement's exchange is also the staging barrier and the copy overlaps the wait for late
    peers. Harmless if the agreement then fails: the scratch is nobody's until the next call.
    Returns the window, or None. The agreement carries whether each rank did (PRESTAGED in
    its descriptor); only when all did is the copy used, else every rank stages after it."""
    pool = pool_of(g)
    w = None if pool is None else pool.scratch_window
    nbytes = t.numel() * t.element_size()
    if w is None or w.capacity < nbytes or not pool.one_node or nbytes == 0 or pool.locate(t) is not None:
        return None
    torch.from_numpy(w.local[:nbytes]).view(t.dtype).view(t.shape).copy_(t)
    w.sync()
    return w


def _all_reduce(pool, window, offset: int, numel: int, dtype, op: str) -> None:
    fused = shm_compiled.sum_push_plan(pool, window, offset, numel, dtype, op)
    if fused is not None:
        fused()
        return
    with np.errstate(all="ignore"):  # inf/nan arithmetic is the user's business, as in torch
        for own, peers in _all_reduce_chunks(pool, window, offset, numel, dtype):
            reduce_into(own, own, peers, dtype, op)
            for peer in peers:
                np.copyto(peer, own)


def _all_reduce_chunks(pool, window, offset: int, numel: int, dtype) -> list:
    """[(this rank's chunk, the peers' same chunks)] over the slice this rank owns, as numpy views
    (built once per tensor and chunk size: see cached_plan)."""
    step = chunk_elements(dtype.itemsize)

    def build():
        own, peers = owned(window, pool.local_size, pool.local_rank, offset, numel, dtype)
        return [(own[c0:c0 + step], [p[c0:c0 + step] for p in peers]) for c0 in range(0, own.size, step)]
    return cached_plan(window, ("all_reduce", offset, numel, dtype, step), build)


def reduce_scatter(t: torch.Tensor, g, dim: int, op: str, algorithm: str, entry=None):
    """Slice g.rank (tensor_split order along `dim`) of the reduction, or None when not applicable."""
    if algorithm in SHM_ALGORITHMS:
        reduce_dtype(t.dtype)
    nbytes = t.numel() * t.element_size()
    plan = enter(g, t, algorithm, "reduce_scatter", nbytes, entry)
    if plan is None:
        return None
    pool, window, offset, _ = plan
    if window is None:
        window, offset = stage_in(pool, t.detach(), nbytes), 0
    n, me, shape = pool.local_size, pool.local_rank, list(t.shape)
    outer, size, inner = math.prod(shape[:dim]), shape[dim], math.prod(shape[dim + 1:])
    sizes = flat_chunks(size, n)
    a, cnt = offsets(sizes)[me], sizes[me]
    views = [typed(window.view(p, offset, nbytes), t.dtype).reshape(outer, size * inner)
             [:, a * inner:(a + cnt) * inner] for p in range(n)]
    out = _output(pool, "reduce_scatter", outer * max(sizes) * inner, outer * cnt * inner, t.dtype)
    out = out.view(outer, cnt * inner)
    dst, order = np_of(out), [me] + [p for p in range(n) if p != me]
    with np.errstate(all="ignore"):
        for r0, r1, c0, c1 in blocks(outer, cnt * inner, chunk_elements(t.element_size())):
            srcs = [views[p][r0:r1, c0:c1] for p in order]
            reduce_into(dst[r0:r1, c0:c1], srcs[0], srcs[1:], t.dtype, op)
    barrier(pool, window)
    shape[dim] = cnt
    return out.view(shape).to(t.device)


def all_gather(t: torch.Tensor, g, dim: int, sizes: list[int], algorithm: str, entry=None, out=None,
               in_place: bool = False):
    """Concatenation along `dim` of every rank's `t` (sizes[r] along dim), or None when not applicable.

    Without `out`, `t` must be symmetric (or algorithm="shm": staged): every rank pulls every
    piece into a new output. With `out` (all_gather's out=), `out` must be symmetric: every
    rank pushes its piece into every rank's `out` (not into its own when `in_place`: `t` is
    already its slice of `out`), so only the peers' pieces move.
    """
    shape = list(t.shape)
    outer, inner = math.prod(shape[:dim]), math.prod(shape[dim + 1:])
    item, total = t.element_size(), sum(sizes)
    plan = enter(g, t if out is None else out, algorithm, "all_gather", outer * total * inner * item, entry)
    if plan is None:
        return None
    pool, window, offset, _ = plan
    numel = outer * total * inner
    if out is not None and window is not None:  # a symmetric out
        src = t.detach().contiguous() if not in_place else None
        _push(pool, np_of(src) if src is not None else None, window, offset, numel, dim, shape, sizes, t.dtype)
        barrier(pool, window)
        return out
    if window is None:  # forced "shm" on plain tensors: stage t
        window, offset = stage_in(pool, t.detach(), outer * max(sizes) * inner * item), 0
    result = out.view(outer, total * inner) if out is not None else \
        _output(pool, "all_gather", numel, numel, t.dtype).view(outer, total * inner)
    where = pool.locate(result) if out is None else None
    if where is None:  # a plain output: pull every piece
        dst = np_of(result)
        for p, (off, s) in enumerate(zip(offsets(sizes), sizes)):
            src = typed(window.view(p, offset, outer * s * inner * item), t.dtype).reshape(outer, s * inner)
            shm_compiled.copy(dst[:, off * inner:(off + s) * inner], src)
        barrier(pool, window)
    else:  # a pooled symmetric output (MPIPAR_SHM_POOLED_OUTPUT_BYTES): push this rank's piece
        mine = typed(window.view(pool.local_rank, offset, outer * sizes[pool.local_rank] * inner * item), t.dtype)
        _push(pool, mine, where[0], where[1], numel, dim, shape, sizes, t.dtype)
        barrier(pool, window, where[0])
    if out is not None:
        return out
    shape[dim] = total
    return result.view(shape).to(t.device)


def _push(pool, src, window, offset: int, numel: int, dim: int, shape, sizes, dtype) -> None:
    """Copy this rank's piece `src` (a numpy array of its elements; None: already in place in
    its own output) into its slot of every rank's symmetric output at (window, offset), its own first."""
    me = pool.local_rank
    outer, inner = math.prod(shape[:dim]), math.prod(shape[dim + 1:])
    off, s, total = offsets(sizes)[me], sizes[me], sum(sizes)
    item = dtype.itemsize
    if src is None:
        src = window.view(me, offset, numel * item)
        src = typed(src, dtype).reshape(outer, total * inner)[:, off * inner:(off + s) * inner]
        peers = [q for q in range(pool.local_size) if q != me]
    else:
        src = src.reshape(outer, s * inner)
        peers = [me] + [q for q in range(pool.local_size) if q != me]
    dsts = [typed(window.view(p, offset, numel * item), dtype).reshape(outer, total * inner)
            [:, off * inner:(off + s) * inner] for p in peers]
    if outer == 1:  # contiguous pieces: read the source once for every destination
        shm_compiled.fanout([d[0] for d in dsts], src[0])
        return
    for dst in dsts:
        shm_compiled.copy(dst, src)


def _output(pool, op: str, capacity: int, numel: int, dtype) -> torch.Tensor:
    """A flat output of `numel` elements: from the pool (collective; `capacity` equal on every
    rank) when large, else a recycled plain tensor (mpipar.comm.outputs). Neither pays the
    page faults of fresh memory on every call."""
    if capacity * dtype.itemsize >= max(1, tuning.shm_pooled_output_bytes(op)):
        return pool.empty((capacity,), dtype)[:numel]
    return outputs.empty([numel], dtype)


def broadcast(t: torch.Tensor, g, root: int, entry=None) -> bool:
    """In place: root's symmetric `t` copied into every rank's; False when `t` is not symmetric."""
    nbytes = t.numel() * t.element_size()
    plan = enter(g, t, "auto", "broadcast", nbytes, entry)
    if plan is None:
        return False
    pool, window, offset, _ = plan
    if pool.local_rank != root:
        shm_compiled.copy(window.view(pool.local_rank, offset, nbytes), window.view(root, offset, nbytes))
    barrier(pool, window)
    return True
