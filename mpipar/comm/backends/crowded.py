"""How a collective runs where ranks outnumber cores (the choices collectives.py makes there).

Each reads only facts every rank shares (agreed sizes, dtype and algorithm, how the group
gathers its argument agreement), so all ranks choose alike:
- `present`: after a validated call's agreement (a barrier: every rank is in the call),
  MPI's blocking collective (mpipar.comm.wait.all_present), except a broadcast from
  POLITE_FROM bytes, which measured faster polled between sleeps (`stays_polite`);
- `staged`: "shm" where "auto" stages a tensor through shared memory
  (tuning.stages_in_shm; only groups whose agreement goes through shared memory);
- `choose`: below that window, "auto" takes MPI's collective, not the ring.
The figures behind both are in results/TUNING.md.
"""
from __future__ import annotations

import contextlib

import torch

from .. import tuning
from ..agreement import inline
from ..agreement.protocol import validation_enabled
from ..wait import all_present

# A broadcast from this size keeps the polite wait after the agreement too: with ranks
# outnumbering cores, MPICH's pipelined large Bcast ran slower busy-polling than polled between
# sleeps (16 MiB at 4 ranks on 2 cores; below 8 MiB it rides in the payload slots). All-to-all
# was polite from 2 MiB too, until a quieter host measured the blocking call 1.6x as fast at
# 2-8 MiB; the reductions and all-gather gained at every measured size (from 16-32 MiB, by op,
# "auto" stages them in shared memory: tuning.STAGED_SHM_BYTES). results/TUNING.md.
POLITE_FROM = {"broadcast": 2 << 20}


def stays_polite(op: str, nbytes: int) -> bool:
    """Does a crowded group's `op` of `nbytes` wait politely after its agreement (polled
    non-blocking MPI), not in MPI's blocking collective?"""
    return nbytes >= POLITE_FROM.get(op, tuning.NEVER)

STAGED_DTYPES = (torch.float32, torch.float64, torch.int32, torch.int64, torch.bfloat16, torch.float16)


def present(g, agreed: bool):
    """all_present(g) once a validated call's agreement (a barrier) has run: MPI's blocking
    collectives then serve ranks that outnumber cores too (mpipar.comm.wait.all_present)."""
    return all_present(g) if agreed and g.oversubscribed and validation_enabled() else contextlib.nullcontext()


def choose(g, name: str, algorithm: str, nbytes: int) -> str:
    """tuning.choose, except that an all_gather or reduce_scatter under "auto" below the staging
    window takes MPI's collective, not the ring, where the group agrees through shared memory
    (ranks outnumber cores on one node): each ring step waits for a peer that may not hold a
    core, and MPI's collective runs with every rank present (results/TUNING.md). Agreed facts
    only: the same on every rank."""
    if (algorithm == "auto" and name in ("all_gather", "reduce_scatter")
            and nbytes < tuning.STAGED_SHM_BYTES[name][0] and inline.gathers_in_shared_memory(g)):
        return "mpi"
    return tuning.choose(name, algorithm, nbytes, g.size)


def staged(g, t: torch.Tensor, algorithm: str, name: str, nbytes: int) -> str:
    """"shm" where "auto" stages a tensor of `nbytes` through shared memory (ranks that
    outnumber cores on one node: tuning.stages_in_shm), else `algorithm`. Reads only agreed
    facts (size, dtype, algorithm, how the group gathers its agreement): same on every rank."""
    if (algorithm == "auto" and t.dtype in STAGED_DTYPES and tuning.stages_in_shm(name, nbytes)
            and inline.gathers_in_shared_memory(g)):
        return "shm"
    return algorithm
