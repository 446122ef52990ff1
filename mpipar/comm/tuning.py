"""How algorithm="auto" picks between the MPI library's collective and the ring.

Crossovers are message sizes in bytes from which the ring wins, measured
with experiments/collectives.py on the development machine (MPICH 5.0.2 wheel,
2 ranks on one node, 2026-11-24, interleaved rounds, after the ring's reduce
steps were pipelined on reused scratch and large tensors moved to huge pages):
- all-reduce: MPICH wins below ~6 MiB (1 MiB: 6.3 vs 4.4 GB/s busbw), the two
  tie at 6 MiB, the ring wins from 8 MiB and by ~3x from 32 MiB (6.5 vs 2.4);
- reduce-scatter: the ring wins from 1-2 MiB (two sweeps: 2.8 vs 2.5 GB/s at 1 MiB in
  one, 3.4 vs 3.5 in the other; 4.8 vs 4.2 at 2 MiB; 3.4 vs 1.1 at 256 MiB);
- all-gather: the ring from 16 MiB. Re-measured once both paths wrote into recycled
  outputs (mpipar.comm.outputs) and "mpi" called MPI_Allgather instead of Allgatherv;
  two sweeps, busbw ring / mpi: 0.92 and 0.89 at 4 MiB, 0.92 and 1.13 at 8 MiB, 1.09
  and 0.95 at 16 MiB, 1.15 and 1.10 at 32 MiB, 1.43 and 1.13 at 64 MiB, 1.09 and 1.07
  at 256 MiB. (Before, fresh outputs' page faults dominated both, and MPICH's
  Allgatherv won again from 32 MiB.)
Override with MPIPAR_CROSSOVER_<OP>=bytes (e.g. MPIPAR_CROSSOVER_ALL_REDUCE=262144)
and MPIPAR_RING_CEILING_<OP>=bytes (where MPI wins again); every rank must see the
same values.
"""
from __future__ import annotations

import os

_RAW_ENVIRON = getattr(os.environ, "_data", None) if os.name == "posix" else None


def env(name: str) -> str | None:
    """os.environ.get(name), read on the per-call path without os.environ's key encoding
    (0.1 instead of 0.8 us: small collectives read several settings per call)."""
    if _RAW_ENVIRON is not None:
        v = _RAW_ENVIRON.get(name.encode())
        return None if v is None else v.decode()
    return os.environ.get(name)


NEVER = 1 << 62
CROSSOVER_BYTES = {
    "all_reduce": 8 << 20,
    "all_gather": 16 << 20,
    "reduce_scatter": 2 << 20,
}
# ... and the size from which MPI's collective wins again (the ring's window is [crossover, ceiling)).
RING_CEILING_BYTES = {
    "all_reduce": NEVER,
    "all_gather": NEVER,
    "reduce_scatter": NEVER,
}


def crossover(op: str) -> int:
    value = env(f"MPIPAR_CROSSOVER_{op.upper()}")
    return int(value) if value else CROSSOVER_BYTES[op]


def ring_ceiling(op: str) -> int:
    value = env(f"MPIPAR_RING_CEILING_{op.upper()}")
    return int(value) if value else RING_CEILING_BYTES[op]


def choose(op: str, algorithm: str, nbytes: int, group_size: int) -> str:
    """Concrete algorithm ("mpi" or "ring") for this call."""
    if algorithm != "auto":
        return algorithm
    return "ring" if crossover(op) <= nbytes < ring_ceiling(op) and group_size > 1 else "mpi"


# Shared memory (mpipar.comm.symmetric.collectives): "auto" takes it for tensors that every rank holds in a
# symmetric window (mpipar.comm.symmetric_empty) at or above these sizes; below, the MPI
# library's own latency-optimised collective is used (the shm path costs two barriers and
# ~20 us of Python; MPICH's small all-reduce is one round). Measured with 2 ranks on the
# (loaded) development machine: MPI wins at 16 KiB, shm from 256 KiB on, ~4x at 4 MiB.
# all_reduce, re-measured on symmetric tensors once the compiled kernel landed (2 ranks, us,
# best of 9 x 400 calls, auto below / above the crossover): 4 KiB 11.5 (inline in the
# argument agreement) / 20.7, 8 KiB 35.4 / 24.8, 16 KiB 42.5 / 28.6, 32 KiB 48.1 / 25.4,
# 64 KiB 55.6 / 22.1, 128 KiB 55.9 / 19.4: shared memory from just above the inline slot.
# all_gather, reduce_scatter, broadcast, re-measured once the MPI path's mid-size overheads
# were cut (2 ranks, symmetric tensors, algorithm "mpi" / "shm", us, best of 9 x 300 calls, two
# runs): all_gather 64 KiB 31.8-32.7 / 35.4-36.1, 128 KiB 38.2-40.0 / 36.4-37.2, 256 KiB
# 57.2-57.7 / 44.1-44.2; reduce_scatter 32 KiB 37.9 / 42.0, 64 KiB 46.5 / 41.9, 128 KiB
# 82.5 / 63.9; broadcast 8 KiB 14.1-22.2 / 12.5-21.1, 32 KiB 16.2-22.7 / 13.0-20.4, 64 KiB
# 18.3-27.0 / 13.7-22.6 (shared memory ahead at every size above the inline slot).
# Override: MPIPAR_SHM_CROSSOVER_<OP>=bytes.
SHM_CROSSOVER_BYTES = {
    "all_reduce": 4096 + 1,  # mpipar.comm.agreement.inline.INLINE_BYTES + 1
    "all_gather": 128 * 1024,
    "reduce_scatter": 64 * 1024,
    "broadcast": 4096 + 1,
}


# Outputs of shared-memory all-gathers (reduce-scatters) at least this large come from the
# symmetric pool, and the all-gather PUSHES its piece into every rank's output, reading it once
# (shm_compiled.fanout); smaller ones are recycled plain tensors (mpipar.comm.outputs: no page
# faults) that every rank PULLS every piece into. Measured with 2 ranks on symmetric inputs
# (busbw GB/s, best of 7 rounds; pull, push, MPICH's Allgather): 1 MiB 6.2, 3.4, 1.6; 4 MiB
# 8.3, 6.9, 1.8; 8 MiB 6.3, 5.4, 3.8; 16 MiB 7.8, 9.3, 4.9; 64 MiB 5.7, 10.1, 4.3; 256 MiB
# 7.0, 11.0, 5.4. Runs vary up to 2x from process to process here; side by side over nine
# runs, push / pull was 0.93-1.20 at 16 MiB (1.0 median), 1.0-1.3 at 32 MiB, 1.05-1.78
# from 64 MiB: pushing from 32 MiB (before the fan-out kernel, pushing copied the piece once
# per rank and lost at every size). A reduce-scatter gains nothing from a pooled output
# (its owner writes it once either way), so it keeps plain ones.
# MPIPAR_SHM_POOLED_OUTPUT_BYTES=bytes sets the size for both.
SHM_POOLED_OUTPUT_BYTES = {"all_gather": 32 << 20, "reduce_scatter": NEVER}


def shm_pooled_output_bytes(op: str) -> int:
    value = env("MPIPAR_SHM_POOLED_OUTPUT_BYTES")
    return int(value) if value else SHM_POOLED_OUTPUT_BYTES[op]


def shm_pays(op: str, nbytes: int) -> bool:
    """Is a symmetric tensor of `nbytes` worth the shared-memory path under "auto"?"""
    value = env(f"MPIPAR_SHM_CROSSOVER_{op.upper()}")
    return nbytes >= (int(value) if value else SHM_CROSSOVER_BYTES[op])


def choose_shared(op: str, algorithm: str, symmetric: bool, one_node: bool) -> str | None:
    """"shm", "hier" or None (not shared memory: use `choose`) once the ranks agreed
    whether the tensor is symmetric. Groups spanning nodes all-reduce hierarchically;
    their other collectives are not offered in shared memory."""
    if algorithm == "auto" and not symmetric:
        return None
    if one_node:
        return "shm"
    return "hier" if op == "all_reduce" else None
