"""Agreement across ranks for checks off the hot path: every rank raises the same MpiparError.

A check that may fail on one rank only (a shape, a file, a flag) must not raise
there alone: the others would wait in their next collective forever. Each rank
contributes its local error (or None) and a signature of its call; one
allgather gives every rank the same table, and every rank runs the same checks
on it.
"""
from __future__ import annotations

from .errors import MpiparError
from .flight.recorder import begin, done


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
