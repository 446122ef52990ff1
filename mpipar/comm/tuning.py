"""How algorithm="auto" picks between the MPI library's collective and the ring.

Crossovers are message sizes in bytes above which the ring wins, measured
with experiments/collectives.py on the development machine (MPICH 5.0.2,
2 ranks on one node): MPICH's all-reduce loses to the ring above ~256 KiB.
Override with MPIPAR_CROSSOVER_<OP>=bytes (e.g. MPIPAR_CROSSOVER_ALL_REDUCE).
"""
from __future__ import annotations

import os

CROSSOVER_BYTES = {
    "all_reduce": 256 * 1024,
    "all_gather": 256 * 1024,
    "reduce_scatter": 256 * 1024,
}


def crossover(op: str) -> int:
    env = os.environ.get(f"MPIPAR_CROSSOVER_{op.upper()}")
    return int(env) if env else CROSSOVER_BYTES[op]


def choose(op: str, algorithm: str, nbytes: int, group_size: int) -> str:
    """Concrete algorithm ("mpi" or "ring") for this call."""
    if algorithm != "auto":
        return algorithm
    return "ring" if nbytes >= crossover(op) and group_size > 1 else "mpi"
