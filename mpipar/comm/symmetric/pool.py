"""Symmetric buffers: tensors that live in an MPI-3 shared-memory window of the node.

`symmetric_empty(shape, dtype, group)` is collective over `group`: every rank
gets a torch tensor over ITS segment of an `MPI.Win.Allocate_shared` window
created on the node communicator (`Split_type(COMM_TYPE_SHARED)`), zero-copy
(`torch.frombuffer` over the segment), and every peer's segment of the same
window is reachable through `Shared_query`. Collectives on such tensors
(mpipar.comm.symmetric.collectives) read and write the peers' memory directly: no copies.

State lives in a `SymmetricPool` attached lazily to the Group object (never a
module global). Each window holds one tensor; when every rank has dropped its
tensor, the window is reused by a later `symmetric_empty` of a fitting size,
or freed (Unlock_all, then Free) once more than `MAX_IDLE` windows sit idle.
Reuse and free decisions are agreed across the group in the same collective
that checks the shape, so ranks never diverge. Every window is opened with a
`Lock_all(MODE_NOCHECK)` epoch held until it is freed (unified memory model:
`Win.Sync` is the memory barrier used by the shm collectives).
"""
from __future__ import annotations

import weakref

import numpy as np
import torch

from ...errors import MpiparError
from ...mesh import as_group
from ..buffers import MAX_NDIM, dtype_code
from ...flight.recorder import begin, done
from ..wait import wait_all
from .barrier import ShmBarrier
from .window import PAGE, Window, node_comm_of

MAX_IDLE = 32         # idle windows kept for reuse (a training step's activation windows); beyond: freed
MAX_IDLE_BYTES = 1 << 30   # ... and at most this much memory (per rank) in idle windows
MAX_WASTE = 4         # reuse a window only if capacity <= MAX_WASTE * request (+1 page)
_ATTR = "_mpipar_symmetric_pool"


class SymmetricPool:
    """Symmetric windows of one Group. Create with `pool_of(group, create=True)` (collective)."""

    def __init__(self, group):
        from mpi4py import MPI

        self.group = group
        self.node = node_comm_of(group.comm)
        self.local_rank, self.local_size = self.node.Get_rank(), self.node.Get_size()
        sizes = np.array([self.local_size, -self.local_size], dtype=np.int64)
        wait_all([group.comm.Iallreduce(MPI.IN_PLACE, sizes, op=MPI.MAX)])
        self.max_local, self.min_local = int(sizes[0]), int(-sizes[1])
        self.one_node = self.local_size == group.size
        self.sync = ShmBarrier(self.node, polite=group.oversubscribed)  # node-local barrier
        self.windows: list[Window] = []
        self.scratch_window: Window | None = None
        self.slice_comms = None   # hierarchical: per-slice communicators, built on first use
        self._next_ident = 0

    # -- allocation --------------------------------------------------------------------------
    def empty(self, shape, dtype: torch.dtype) -> torch.Tensor:
        """Collective: a tensor of `shape`, `dtype` in this rank's segment of a pooled window."""
        shape = tuple(int(s) for s in (shape if isinstance(shape, (tuple, list, torch.Size)) else (shape,)))
        nbytes = _nbytes(shape, dtype)
        busy = self._agree_request(shape, dtype)
        if nbytes == 0:
            return torch.empty(shape, dtype=dtype)
        window = self._pick(nbytes, busy)
        self._evict(busy, keep=window)
        if window is None:
            window = self._allocate(max(PAGE, -(-nbytes // PAGE) * PAGE))
        return self._tensor(window, shape, dtype, nbytes)

    def _agree_request(self, shape, dtype) -> np.ndarray:
        """One Allreduce: same shape and dtype everywhere, and which windows are busy on any rank."""
        from mpi4py import MPI

        if len(shape) > MAX_NDIM:
            raise MpiparError(f"symmetric_empty: tensors of more than {MAX_NDIM} dims are not supported")
        if any(s < 0 for s in shape):
            raise MpiparError(f"symmetric_empty: negative size in shape {shape}")
        v = np.array([len(shape), dtype_code(dtype)] + list(shape) + [0] * (MAX_NDIM - len(shape)), dtype=np.int64)
        busy = np.array([int(w.live > 0) for w in self.windows], dtype=np.int64)
        both = np.concatenate([v, -v, busy])
        wait_all([self.group.comm.Iallreduce(MPI.IN_PLACE, both, op=MPI.MAX)])
        n = v.size
        if not np.array_equal(both[:n], -both[n:2 * n]):
            raise MpiparError(f"symmetric_empty: shape/dtype differ across ranks of the group "
                              f"(this rank asked for {shape} {dtype})")
        return both[2 * n:]

    def _pick(self, nbytes: int, busy: np.ndarray) -> Window | None:
        fits = [w for w, b in zip(self.windows, busy) if not b
                and nbytes <= w.capacity <= MAX_WASTE * nbytes + PAGE]
        return min(fits, key=lambda w: (w.capacity, w.ident)) if fits else None

    def _evict(self, busy: np.ndarray, keep: Window | None) -> None:
        """Free idle windows beyond MAX_IDLE or MAX_IDLE_BYTES, oldest first (same on every rank)."""
        idle = [w for w, b in zip(self.windows, busy) if not b and w is not keep]
        kept, held = 0, 0
        for w in reversed(idle):  # newest first
            if kept < MAX_IDLE and held + w.capacity <= MAX_IDLE_BYTES:
                kept, held = kept + 1, held + w.capacity
                continue
            self.windows.remove(w)
            w.free()

    def _allocate(self, capacity: int) -> Window:
        w = Window(self.node, capacity, self._next_ident)
        self._next_ident += 1
        self.windows.append(w)
        return w

    def _tensor(self, window: Window, shape, dtype, nbytes: int) -> torch.Tensor:
        holder = window.local[:nbytes]   # fresh ndarray: its death marks the window idle
        window.live += 1
        weakref.finalize(holder, window._released)
        numel = nbytes // dtype.itemsize
        return torch.frombuffer(holder, dtype=dtype, count=numel).view(shape)

    def scratch(self, nbytes: int) -> Window:
        """Collective, same `nbytes` on every rank: an internal window of at least nbytes per rank."""
        w = self.scratch_window
        if w is None or w.capacity < nbytes:
            if w is not None:
                w.free()
            capacity = max(PAGE, -(-nbytes // PAGE) * PAGE)
            w = self.scratch_window = Window(self.node, capacity, -1)
        return w

    # -- registry ------------------------------------------------------------------------------
    def locate(self, t: torch.Tensor):
        """(window, byte offset) when `t` is a contiguous CPU tensor inside one of our windows."""
        if not t.is_cpu or not t.is_contiguous() or t.numel() == 0:
            return None
        start = t.data_ptr()
        end = start + t.numel() * t.element_size()
        for w in self.windows:
            if w.base <= start and end <= w.base + w.capacity:
                return w, start - w.base
        return None

    def descriptor(self, t: torch.Tensor, found=False) -> np.ndarray:
        """[window id, byte offset, nbytes] of `t`, or -1s when it is not symmetric.
        `found`: locate(t), when the caller has it already."""
        found = self.locate(t) if found is False else found
        if found is None:
            return np.full(3, -1, dtype=np.int64)
        w, off = found
        return np.array([w.ident, off, t.numel() * t.element_size()], dtype=np.int64)

    def window(self, ident: int) -> Window:
        for w in self.windows:
            if w.ident == ident:
                return w
        raise MpiparError(f"symmetric window {ident} is not in the pool")

    @property
    def num_windows(self) -> int:
        """Windows currently allocated (pooled ones plus the scratch window)."""
        return len(self.windows) + (self.scratch_window is not None)

    def close(self) -> None:
        """Collective over the group: free every window (no tensor of the pool may be used after)."""
        for w in self.windows:
            w.free()
        self.windows = []
        if self.scratch_window is not None:
            self.scratch_window.free()
            self.scratch_window = None
        for c in self.slice_comms or []:
            if c is not None:
                c.Free()
        self.slice_comms = None
        self.sync.free()
        self.node.Free()


def _nbytes(shape, dtype) -> int:
    n = 1
    for s in shape:
        n *= s
    return n * dtype.itemsize


def pool_of(group, create: bool = False) -> SymmetricPool | None:
    """The Group's pool; `create=True` (collective over the group) makes it when missing."""
    g = as_group(group)
    pool = getattr(g, _ATTR, None)
    if pool is None and create:
        pool = SymmetricPool(g)
        setattr(g, _ATTR, pool)
        if not g.__dict__.get("_pool_at_close"):  # once per group: Mesh.close frees the windows
            g._pool_at_close = True               # (a no-op when they were freed already)
            g.at_close(lambda: free_symmetric(g))
    return pool


def symmetric_empty(shape, dtype: torch.dtype, group) -> torch.Tensor:
    """Collective: an uninitialised tensor in a shared-memory window of the node.

    Same shape and dtype on every rank of `group` (else MpiparError on every
    rank). Collectives on it with algorithm="auto" (or "shm") run zero-copy
    through shared memory when the group is on one node, and hierarchically
    (shared memory inside each node, MPI across nodes) otherwise.
    """
    g = as_group(group)
    slot = begin(g, "symmetric_empty", dtype)  # for the watchdog (mpipar.flight)
    try:
        return pool_of(g, create=True).empty(shape, dtype)
    finally:
        done(slot)


def is_symmetric(t: torch.Tensor, group) -> bool:
    """Local check: does `t` live in a window of `group`'s pool?"""
    pool = pool_of(group)
    return pool is not None and pool.locate(t) is not None


def free_symmetric(group) -> None:
    """Collective: free every window of the group's pool. Its tensors become invalid: the
    symmetric ones and the large reduce_scatter/all_gather outputs taken from the pool."""
    g = as_group(group)
    pool = getattr(g, _ATTR, None)
    if pool is not None:
        slot = begin(g, "free_symmetric")
        try:
            pool.close()
        finally:
            done(slot)
        delattr(g, _ATTR)
