"""How a shared-memory collective (mpipar.comm.symmetric.collectives) starts and ends.

Synchronisation is Sync-Barrier-Sync under the windows' Lock_all(MODE_NOCHECK)
epoch: once on entry (inputs are ready; the same barrier carries each rank's
[window, offset, nbytes], so all agree whether the tensor is symmetric), once
on exit (no rank reads or overwrites a slot that a peer may still touch). The
barrier is a flag barrier in shared memory (mpipar.comm.symmetric.barrier; an
Iallgather when the group spans nodes); it waits politely (yield, then sleep)
when ranks outnumber cores. The entry exchange usually rides on the argument
agreement (mpipar.comm.agreement.inline carries `local_descriptor`), so it costs no
collective of its own.
"""
from __future__ import annotations

import numpy as np
import torch

from ...errors import MpiparError
from .. import tuning
from .pool import pool_of
from ..wait import wait_all

SHM_ALGORITHMS = ("auto", "shm", "hier")


def may_apply(g, algorithm) -> bool:
    """Could this call run in shared memory? Local and cheap, the same answer on every rank:
    forced algorithms always try; "auto" only on a group that has a symmetric pool (made
    collectively by symmetric_empty). Lets plain tensors skip the shape work of the shm calls."""
    return algorithm in ("shm", "hier") or (algorithm == "auto" and pool_of(g) is not None)


# -- synchronisation -----------------------------------------------------------------------------
def barrier(pool, *windows) -> None:
    """Sync-Barrier-Sync on the node (a polite barrier on shared-memory flags)."""
    for w in windows:
        w.sync()
    pool.sync.wait()
    for w in windows:
        w.sync()


def enter(g, t, algorithm, op_name, nbytes, entry=None):
    """Agree whether this call runs in shared memory: (pool, window, offset, choice) or None.

    Collective only when a decision needs data from every rank; the exchange of
    [window, offset, nbytes] is also the entry barrier of the shm algorithms.
    `entry`: that exchange's (N, 3) table when the caller already made it (the argument
    agreement carries it: mpipar.comm.agreement.inline, inline_ops); same on every rank.
    """
    if algorithm not in SHM_ALGORITHMS:
        return None
    forced = algorithm != "auto"
    if not forced and not tuning.shm_pays(op_name, nbytes):
        return None
    pool = pool_of(g, create=forced)
    if pool is None:
        return None
    if entry is not None and pool.one_node:
        table = entry  # the agreement was the entry barrier (each sender synced its window)
    else:
        mine = pool.locate(t)
        if mine is not None:
            mine[0].sync()
        if pool.one_node:  # node rank == group rank
            table = pool.sync.wait(pool.descriptor(t, mine))
        else:
            table = np.empty((g.size, 3), dtype=np.int64)
            wait_all([g.comm.Iallgather(pool.descriptor(t, mine), table)])
    symmetric = bool(table[0, 0] >= 0) and table.tobytes() == table[0].tobytes() * len(table)
    choice = tuning.choose_shared(op_name, algorithm, symmetric, pool.one_node)
    if choice is None:
        if forced:
            raise MpiparError(f"{op_name}: algorithm={algorithm!r} needs a group on one node "
                              f"(this group spans nodes); use 'auto', 'mpi' or 'ring'")
        return None
    if not symmetric:
        return pool, None, 0, choice
    window = pool.window(int(table[0, 0]))
    window.sync()
    return pool, window, int(table[0, 1]), choice


def stage_in(pool, t: torch.Tensor, capacity: int):
    """Copy `t` into this rank's segment of the scratch window, then barrier. Returns the window."""
    w = pool.scratch(capacity)
    nbytes = t.numel() * t.element_size()
    if nbytes:
        torch.from_numpy(w.local[:nbytes]).view(t.dtype).view(t.shape).copy_(t)
    barrier(pool, w)
    return w


def local_descriptor(g, t: torch.Tensor):
    """This rank's [window, offset, nbytes] of `t` for an argument agreement to carry (the
    shared-memory entry exchange then rides on it), or None when `g` has no one-node pool.
    Local (never creates the pool); syncs `t`'s window so the peers see this rank's writes."""
    pool = pool_of(g)
    if pool is None or not pool.one_node:
        return None
    found = pool.locate(t)
    if found is not None:
        found[0].sync()
    return pool.descriptor(t, found)
