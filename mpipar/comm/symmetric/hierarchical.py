"""Hierarchical all-reduce for groups that span nodes.

1. inside each node, shared-memory reduce-scatter: the flat tensor is cut
   into M slices (M = most ranks any node has, 64-byte aligned); node-local
   rank l owns the slices s with s % local_size == l and reduces the node's
   copies of them into its own segment (in float32 for bf16/fp16);
2. across nodes, an MPI all-reduce of each slice among its owners (one rank
   per node per slice, on a communicator per slice built once per pool);
3. inside each node, the owner pushes the finished slice into every local
   peer's segment (the all-gather), while it is still in cache.
Only a slice's owner touches it between the entry and exit barriers (done by
the caller, mpipar.comm.symmetric.collectives.all_reduce), so no barrier is needed between the
phases. Nodes of unequal size work (a smaller node's ranks own more slices).

Test-only: MPIPAR_FAKE_RANKS_PER_NODE=k (mpipar.comm.symmetric.pool) makes groups of
k consecutive ranks act as nodes, so this path runs on one machine.
"""
from __future__ import annotations

import numpy as np
import torch

from . import kernels as k
from ..backends.mpi import mpi_op
from ..wait import wait_all


def slice_comms(pool) -> list:
    """Per slice s: the communicator of its owners (one per node), or None if this rank owns none.

    Collective over the pool's group on first use; cached on the pool.
    """
    from mpi4py import MPI

    if pool.slice_comms is None:
        comms = []
        for s in range(pool.max_local):
            mine = s % pool.local_size == pool.local_rank
            c = pool.group.comm.Split(0 if mine else MPI.UNDEFINED, key=pool.group.rank)
            comms.append(None if c == MPI.COMM_NULL else c)
        pool.slice_comms = comms
    return pool.slice_comms


def all_reduce_(pool, window, offset: int, numel: int, dtype: torch.dtype, op: str) -> None:
    """Reduce the symmetric flat tensor at `offset` of `window` over the whole group, in place."""
    n, me = pool.local_size, pool.local_rank
    item = dtype.itemsize
    views = [k.typed(window.view(p, offset, numel * item), dtype) for p in range(n)]
    comms = slice_comms(pool)
    owned = [(s, lo, hi) for s, (lo, hi) in enumerate(k.owner_slices(numel, pool.max_local, item))
             if s % n == me and hi > lo]
    step = k.chunk_elements(item)
    accs, pending = [], []
    for s, lo, hi in owned:
        acc = _reduce_local(views, me, lo, hi, step, dtype, op)
        accs.append(acc)
        c = comms[s]
        if c is not None and c.Get_size() > 1:
            from mpi4py import MPI

            buf = acc.view(np.uint8) if acc.dtype == np.bool_ else acc
            pending.append(c.Iallreduce(MPI.IN_PLACE, buf, op=mpi_op(op, dtype)))
    wait_all(pending)
    for (s, lo, hi), acc in zip(owned, accs):
        own = views[me][lo:hi]
        if k.is_half(dtype):
            k.from_f32(own, acc, dtype)
        for c0 in range(0, hi - lo, step):
            c1 = min(c0 + step, hi - lo)
            for p in range(n):
                if p != me:
                    np.copyto(views[p][lo + c0:lo + c1], own[c0:c1])


def _reduce_local(views, me: int, lo: int, hi: int, step: int, dtype, op: str) -> np.ndarray:
    """Node-local reduction of [lo, hi): in place into this rank's segment, or a float32
    array for bf16/fp16 (so the inter-node sum also runs in float32). Returns the array."""
    own, peers = views[me][lo:hi], [v[lo:hi] for i, v in enumerate(views) if i != me]
    half = k.is_half(dtype)
    acc = np.empty(hi - lo, dtype=np.float32) if half else own
    for c0 in range(0, hi - lo, step):
        c1 = min(c0 + step, hi - lo)
        rest = [p[c0:c1] for p in peers]
        if half:
            acc[c0:c1] = k.accumulate_f32(own[c0:c1], rest, dtype, op)
        elif rest:
            k.reduce_into(own[c0:c1], own[c0:c1], rest, dtype, op)
    return acc
