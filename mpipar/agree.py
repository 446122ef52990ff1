"""Agreement across ranks for checks off the hot path: every rank raises the same MpiparError.

A check that may fail on one rank only (a shape, a file, a flag) must not raise
there alone: the others would wait in their next collective forever. Each rank
contributes its local error (or None) and a signature of its call; one
allgather gives every rank the same table, and every rank runs the same checks
on it.
"""
from __future__ import annotations

import numpy as np

from .errors import MpiparError
from .flight.recorder import begin, channel_of, done


def agree_call(g, name: str, local_error: str | None, signature: dict) -> None:
    """Collective over g: raise on every rank if any rank failed or signatures differ."""
    if g.size == 1:
        rows = [(local_error, signature)]
    else:
        slot = begin(g, name + " agree")  # for the watchdog (mpipar.flight)
        try:
            rows = g.comm.allgather((local_error, signature))
        finally:
            done(slot)
    for rank, (err, _) in enumerate(rows):
        if err is not None:
            where = "" if g.size == 1 else f" (reported by rank {rank})"
            raise MpiparError(f"{name}: {err}{where}")
    first = rows[0][1]
    for rank, (_, sig) in enumerate(rows):
        for key in first:
            if sig.get(key) != first[key]:
                raise MpiparError(f"{name}: {key} differs across ranks: rank 0 has {first[key]}, "
                                  f"rank {rank} has {sig.get(key)}")


def agree(comm, local_error: str | None) -> None:
    """Collective: if any rank of `comm` reports an error, raise it on every rank.

    The message of the lowest failing rank is used on all ranks. Costs one
    allgather of small Python objects: use it for set-up checks, not hot paths.
    """
    slot = begin(channel_of(comm), "agree")
    try:
        errors = comm.allgather(local_error)
    finally:
        done(slot)
    for rank, err in enumerate(errors):
        if err is not None:
            raise MpiparError(err if comm.Get_size() == 1 else f"{err} (reported by rank {rank})")


def agree_ints(comm, values, describe) -> np.ndarray:
    """Collective: check that the int vector `values` is equal on every rank.

    One Allreduce(MAX) of [v, -v]. On mismatch every rank raises
    MpiparError(describe(vmin, vmax)) with the same message.
    Returns the agreed values.
    """
    from mpi4py import MPI

    v = np.asarray(values, dtype=np.int64)
    both = np.concatenate([v, -v])
    slot = begin(channel_of(comm), "agree")
    try:
        comm.Allreduce(MPI.IN_PLACE, both, op=MPI.MAX)
    finally:
        done(slot)
    vmax, vmin = both[: len(v)], -both[len(v):]
    if not np.array_equal(vmax, vmin):
        raise MpiparError(describe(vmin, vmax))
    return vmax
