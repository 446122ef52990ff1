"""MpiparError and the helpers that raise it on every rank of a group at once.

Rule: a check whose outcome may differ between ranks goes through `agree` (one
small collective) so that every rank raises the same error, never a subset of
ranks while the others wait in a collective forever.
"""
from __future__ import annotations

import os
import sys

import numpy as np


class MpiparError(ValueError):
    """Bad input to an mpipar call; raised on every rank of the group with one message."""


def require(cond: bool, msg: str) -> None:
    """Raise MpiparError(msg) unless cond. Only for checks that are the same on every rank."""
    if not cond:
        raise MpiparError(msg)


def agree(comm, local_error: str | None) -> None:
    """Collective: if any rank of `comm` reports an error, raise it on every rank.

    The message of the lowest failing rank is used on all ranks. Costs one
    allgather of small Python objects: use it for set-up checks, not hot paths.
    """
    errors = comm.allgather(local_error)
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
    comm.Allreduce(MPI.IN_PLACE, both, op=MPI.MAX)
    vmax, vmin = both[: len(v)], -both[len(v):]
    if not np.array_equal(vmax, vmin):
        raise MpiparError(describe(vmin, vmax))
    return vmax


def install_abort_on_exception() -> None:
    """Make an unhandled exception on any rank abort the whole MPI job (no deadlock).

    Equivalent to running under `python -m mpi4py`. Called by experiment drivers.
    """
    previous = sys.excepthook

    def hook(exc_type, exc, tb):
        previous(exc_type, exc, tb)
        sys.stderr.flush()
        try:
            from mpi4py import MPI

            if MPI.Is_initialized() and not MPI.Is_finalized() and MPI.COMM_WORLD.Get_size() > 1:
                unlink_mapped_shm()
                MPI.COMM_WORLD.Abort(1)
        except Exception:  # pragma: no cover - best effort
            pass

    sys.excepthook = hook


def unlink_mapped_shm(prefix: str = "/dev/shm/mpich_") -> list[str]:
    """Unlink the MPI library's shared-memory files that this process maps (best effort).

    MPICH removes them at MPI_Finalize; after MPI_Abort they stay in /dev/shm (2-4 MiB for
    each job, plus any shared windows still allocated: measured, every aborted 2-rank job
    left them behind). Called just before aborting: the job is going down, its ranks have
    attached long ago, and an unlinked file lives on while some process maps it. Only the
    files this process maps are touched, so other jobs' files never are. Returns the paths."""
    try:
        with open("/proc/self/maps") as f:  # address perms offset dev inode [path]
            paths = {fields[5].strip() for fields in (line.split(maxsplit=5) for line in f) if len(fields) == 6}
    except OSError:
        return []
    removed = []
    for path in sorted(p for p in paths if p.startswith(prefix) and not p.endswith("(deleted)")):
        try:
            os.unlink(path)
            removed.append(path)
        except OSError:
            pass
    return removed
