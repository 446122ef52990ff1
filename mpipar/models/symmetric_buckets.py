"""Symmetric gradient buckets: the data-parallel flat buffers live in node shared memory.

`GradBuckets(..., symmetric=...)` keeps the flat buffers of its larger buckets
in ONE symmetric tensor (`comm.symmetric_empty`, an MPI-3 shared-memory window
of the node), allocated once at construction and reused every step. Their
all-reduce then runs zero-copy through shared memory (mpipar.comm.symmetric.collectives: each
rank reduces its slice of every peer's buffer in place and pushes it back),
instead of MPICH's Iallreduce, which copies through its own buffers.

Layout: the symmetric buckets of one reduction dtype are packed back to back,
in bucket order, into a "run" (one per dtype, each starting 64-byte aligned),
and each run is reduced by ONE shared-memory all-reduce at `finish`: two node
barriers per dtype instead of per bucket.

When: `symmetric=True|False` forces; None (auto) reads MPIPAR_SYMMETRIC_BUCKETS
(0|1 forces), else a bucket is symmetric when the group lives on one node and
its flat buffer is at least the shared-memory crossover of all_reduce
(`comm.tuning.shm_pays`, MPIPAR_SHM_CROSSOVER_ALL_REDUCE). Groups spanning
nodes (forced only) reduce hierarchically (shared memory inside each node).
"""
from __future__ import annotations

import torch

from ..comm import tuning
from ..comm.collectives import all_reduce
from ..comm.symmetric.pool import pool_of, symmetric_empty
from ..errors import require
from ..agree import agree_ints
from ..settings import current

ENV = "MPIPAR_SYMMETRIC_BUCKETS"
ALIGN = 64  # bytes: every run starts on its own cache line


def resolve(symmetric) -> bool | None:
    """True / False (forced by the argument or by MPIPAR_SYMMETRIC_BUCKETS) or None (auto)."""
    if symmetric is not None:
        return bool(symmetric)
    env = current().symmetric_buckets or ""
    if not env:
        return None
    require(env in ("0", "1"), f"{ENV} must be 0 or 1, got {env!r}")
    return env == "1"


def choose(group, specs, symmetric) -> list[bool]:
    """Which buckets are symmetric; specs = [(numel, reduce dtype)] per bucket.

    Collective over `group` (size > 1): one Allreduce checks that every rank has
    the same buckets and mode (MpiparError on every rank otherwise); when some
    bucket qualifies, the group's symmetric pool is created (collective).
    """
    mode = resolve(symmetric)
    wanted = [mode is not False and (mode is True or tuning.shm_pays("all_reduce", n * dt.itemsize))
              for n, dt in specs]
    code = {None: 0, False: 1, True: 2}[mode]
    agree_ints(group.comm, [code, len(specs), sum(n for n, _ in specs), sum(wanted)],
               lambda lo, hi: "GradBuckets: [symmetric mode, buckets, elements, symmetric buckets] "
                              f"differ across the data-parallel group ({lo.tolist()} vs {hi.tolist()})")
    if not any(wanted):
        return wanted
    if mode is None and not pool_of(group, create=True).one_node:
        return [False] * len(specs)
    return wanted


class SymmetricArena:
    """One symmetric tensor holding the flat buffers of the chosen buckets (collective creation)."""

    def __init__(self, group, specs, chosen: list[bool]):
        self.group = group
        self.offsets: dict[int, int] = {}       # bucket index -> byte offset in the arena
        self.runs: list[tuple[int, int, torch.dtype]] = []   # (byte offset, numel, dtype)
        pos = 0
        for dtype in dict.fromkeys(dt for (_, dt), sym in zip(specs, chosen) if sym):
            pos = -(-pos // ALIGN) * ALIGN
            start = pos
            for i, ((numel, dt), sym) in enumerate(zip(specs, chosen)):
                if sym and dt == dtype:
                    self.offsets[i] = pos
                    pos += numel * dtype.itemsize
            self.runs.append((start, (pos - start) // dtype.itemsize, dtype))
        self.arena = symmetric_empty((pos,), torch.uint8, group)
        self.algorithm = "shm" if pool_of(group).one_node else "hier"

    def view(self, index: int, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """The flat buffer of bucket `index` (a view into the arena)."""
        off = self.offsets[index]
        return self.arena[off:off + numel * dtype.itemsize].view(dtype)

    def reduce(self) -> None:
        """Collective: sum every run over the group in shared memory, in order, in place."""
        for off, numel, dtype in self.runs:
            if numel == 0:
                continue
            flat = self.arena[off:off + numel * dtype.itemsize].view(dtype)
            all_reduce(flat, self.group, "sum", self.algorithm, validate=False)

    def release(self) -> None:
        """Drop the arena (its window goes back to the group's pool)."""
        self.arena, self.runs, self.offsets = None, [], {}
