"""How algorithm="auto" picks a collective's algorithm: the MPI library, the ring, or shared memory.

The sizes below are crossovers measured with experiments/collectives.py (two ranks on
one node, MPICH); the figures behind each, and their history, are in
results/TUNING.md. Every size can be overridden per op (mpipar.settings:
MPIPAR_CROSSOVER_<OP>, MPIPAR_RING_CEILING_<OP>, MPIPAR_SHM_CROSSOVER_<OP>,
MPIPAR_SHM_POOLED_OUTPUT_BYTES); every rank must see the same values, which Mesh() checks.
"""
from __future__ import annotations

from ..settings import current

NEVER = 1 << 62
CROSSOVER_BYTES = {
    "all_reduce": 32 << 20,  # was 8 MiB until 2026-12-06 (results/TUNING.md)
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
    return current().crossover.get(op, CROSSOVER_BYTES[op])


def ring_ceiling(op: str) -> int:
    return current().ring_ceiling.get(op, RING_CEILING_BYTES[op])


def choose(op: str, algorithm: str, nbytes: int, group_size: int) -> str:
    """Concrete algorithm ("mpi" or "ring") for this call."""
    if algorithm != "auto":
        return algorithm
    return "ring" if crossover(op) <= nbytes < ring_ceiling(op) and group_size > 1 else "mpi"


# Shared memory (mpipar.comm.symmetric.collectives) for tensors every rank holds in a symmetric
# window, from these sizes on; below, the MPI library's latency-optimised collective wins (the
# shared-memory path costs two barriers and some Python). An all-reduce of at most the inline
# slot completes inside the argument agreement, so shared memory starts just above it.
SHM_CROSSOVER_BYTES = {
    "all_reduce": 4096 + 1,  # mpipar.comm.agreement.inline.INLINE_BYTES + 1
    "all_gather": 128 * 1024,
    "reduce_scatter": 64 * 1024,
    "broadcast": 4096 + 1,
}


# Ranks that outnumber cores on one node (agreed: the group gathers its argument agreement
# through shared memory, mpipar.comm.agreement.shm_table) stage plain tensors of this window
# [from, up to) through the pool's scratch window ("shm" on a copy) under "auto": its waits
# are flag polls between sleeps, where MPI's collectives and the ring need every rank to
# poll each step. Below, the copies in and out cost more than MPI's collective, which follows
# the agreement in the same C call and which "auto" then takes instead of the ring
# (crowded.choose; results/TUNING.md). Above, the scratch window (as large as the tensor, per
# rank, kept) would cost too much memory.
STAGED_SHM_BYTES = {"all_reduce": (32 << 20, 64 << 20), "reduce_scatter": (16 << 20, 64 << 20),
                    "all_gather": (32 << 20, 64 << 20)}


# Ranks that outnumber cores on one node: a call whose data each rank writes (broadcast's root
# its tensor, all_gather its piece, reduce_scatter and all_to_all their whole input) is above
# the agreement row's 4 KiB and at most this rides in the shared table's payload slots
# (mpipar.comm.agreement.shm_table, fast_plan._in_slots): the agreement's exchange moves it, with
# no MPI collective after it. Above, MPI's collective after the agreement was faster
# (results/TUNING.md; all_to_all in the slots was slower at 1-4 MiB even with fast.c's
# streaming copies). At most shm_table.PAYLOAD_BYTES.
SLOT_BYTES = {"broadcast": 8 << 20, "all_gather": 4 << 20, "reduce_scatter": 8 << 20, "all_to_all": 512 << 10,
              "all_reduce": 8 << 20}
# From these sizes, where every rank of the group can (mpipar.comm.agreement.cma), a call reads
# its blocks straight out of the peers' inputs with process_vm_readv instead (fast.c's
# KIND_CMA_COPY: one copy where the slots make two, and a second exchange so that no input
# changes while a peer reads it), and no MPI collective follows the agreement. Below, the slots
# won (results/TUNING.md).
CMA_BYTES = {"all_to_all": 256 << 10}
# An all-reduce in the payload slots larger than this reduces in two steps (fast.c's
# KIND_SLOT_SPLIT): each rank its chunk of the rows, then a second exchange and the chunks copied
# out. Smaller, each rank reduces all the rows itself: one exchange fewer.
SLOT_SPLIT_BYTES = 32 << 10


# In a crowded group whose table has payload slots and which has a symmetric pool (made by the
# first staged call, tuning.STAGED_SHM_BYTES, or by symmetric tensors), a call takes the zero-copy
# path for symmetric tensors, and plain ones the path they had before the slots (MPI's
# collective after the agreement), only from these sizes (as shm_pays reads them); below, every
# tensor rides in the slots. Broadcast and all_gather have no such size: in the slots, plain
# tensors beat MPI's collective at every slot size, and symmetric ones came close to their
# zero-copy path (4 ranks on 2 cores, results/TUNING.md).
SLOT_SHM_CROSSOVER_BYTES = {"all_reduce": 1 << 20, "reduce_scatter": 4 << 20}


def shm_pays_over_slots(op: str, nbytes: int) -> bool:
    """shm_pays where the payload slots are the alternative: from SLOT_SHM_CROSSOVER_BYTES (never
    for an op it lacks), or from MPIPAR_SHM_CROSSOVER_<OP> where that is set."""
    return nbytes >= current().shm_crossover.get(op, SLOT_SHM_CROSSOVER_BYTES.get(op, NEVER))


def stages_in_shm(op: str, nbytes: int) -> bool:
    """Should "auto" stage a plain tensor of `nbytes` through shared memory (oversubscribed
    one-node groups only; the caller checks that)?"""
    lo, hi = STAGED_SHM_BYTES.get(op, (NEVER, NEVER))
    return lo <= nbytes < hi


# Outputs of shared-memory all-gathers at least this large come from the symmetric pool, and
# the all-gather PUSHES its piece into every rank's output, reading it once (compiled.fanout);
# smaller ones are recycled plain tensors (mpipar.comm.outputs: no page faults) that every rank
# PULLS every piece into: pushing wins only for large outputs. A reduce-scatter gains nothing
# from a pooled output (its owner writes it once either way), so it keeps plain ones.
SHM_POOLED_OUTPUT_BYTES = {"all_gather": 32 << 20, "reduce_scatter": NEVER}


def shm_pooled_output_bytes(op: str) -> int:
    value = current().shm_pooled_output_bytes
    return SHM_POOLED_OUTPUT_BYTES[op] if value is None else value


def shm_pays(op: str, nbytes: int) -> bool:
    """Is a symmetric tensor of `nbytes` worth the shared-memory path under "auto"?"""
    return nbytes >= current().shm_crossover.get(op, SHM_CROSSOVER_BYTES[op])


def choose_shared(op: str, algorithm: str, symmetric: bool, one_node: bool) -> str | None:
    """"shm", "hier" or None (not shared memory: use `choose`) once the ranks agreed
    whether the tensor is symmetric. Groups spanning nodes all-reduce hierarchically;
    their other collectives are not offered in shared memory."""
    if algorithm == "auto" and not symmetric:
        return None
    if one_node:
        return "shm"
    return "hier" if op == "all_reduce" else None
