"""Which device a rank uses, how many threads it gets, whether MPI is CUDA-aware."""
from __future__ import annotations

import functools
import os

import torch

from .settings import current


def node_comm(comm):
    """The ranks of `comm` that share this node (MPI_COMM_TYPE_SHARED)."""
    from mpi4py import MPI

    return comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.Get_rank())


def cores_on_node() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover
        return os.cpu_count() or 1


def ranks_on_node(comm) -> tuple[int, int]:
    """(node-local rank, ranks on this node)."""
    local = node_comm(comm)
    try:
        return local.Get_rank(), local.Get_size()
    finally:
        local.Free()


def is_oversubscribed(local_size: int) -> bool:
    return local_size > cores_on_node()


_noted_local_size: list[int] = []


def note_local_size(local_size: int) -> None:
    """Remember the ranks-per-node count measured collectively (by Mesh construction)."""
    _noted_local_size[:] = [local_size]
    node_is_oversubscribed.cache_clear()


def local_size_from_env() -> int | None:
    """Ranks on this node as the launcher announced it (mpiexec/srun), or None."""
    return current().local_size


def sharing_node(comm) -> tuple[int, int]:
    """(this rank's index among the job's ranks on its node, how many share the node's cores and
    devices): the launcher's figures where it gives them, else `comm`'s (collective over `comm`).

    A Mesh built on a sub-communicator (one per rank for independent runs, or a user's split)
    still shares the node with the job's other ranks: counted by its own ranks alone, it would
    give each rank threads for cores its peers use, and OpenMP workers spinning on a crowded
    node slow every rank by far more than the threads gain."""
    local_rank, local_size = ranks_on_node(comm)
    s = current()
    if s.local_size and s.local_size >= local_size:
        return (s.local_rank if s.local_rank is not None and s.local_rank < s.local_size else local_rank), s.local_size
    return local_rank, local_size


@functools.lru_cache(maxsize=None)
def node_is_oversubscribed() -> bool:
    """More MPI ranks of this job on this node than cores (MPIPAR_POLITE=1|0 overrides).

    Never communicates (it is asked lazily from inside sub-group waits): the count
    comes from the launcher's environment, or from the last Mesh built.
    """
    setting = current().polite
    if setting is not None:
        return setting == "1"
    local = local_size_from_env() or (_noted_local_size[0] if _noted_local_size else 1)
    return is_oversubscribed(local)


def pick_device(local_rank: int) -> torch.device:
    """One GPU per rank by node-local rank; CPU when there is no GPU."""
    if torch.cuda.is_available() and torch.cuda.device_count() > 0:
        index = local_rank % torch.cuda.device_count()
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device("cpu")


def set_threads(local_size: int) -> int:
    """Give each rank cores // ranks-on-node threads (at least 1), unless the user chose.

    OMP_NUM_THREADS or MPIPAR_THREADS set by the user win.
    """
    s = current()
    user = s.threads or s.omp_num_threads
    threads = user if user else max(1, cores_on_node() // max(1, local_size))
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads


@functools.lru_cache(maxsize=None)
def mpi_is_cuda_aware() -> bool:
    """MPIPAR_CUDA_AWARE=1|0|auto (default auto: ask the MPI library)."""
    setting = current().cuda_aware.lower()
    if setting in ("1", "true", "yes"):
        return True
    if setting in ("0", "false", "no"):
        return False
    from mpi4py import MPI

    query = getattr(MPI, "Query_cuda_support", None)
    if query is not None:
        try:
            return bool(query())
        except Exception:  # pragma: no cover
            pass
    return "cuda" in MPI.Get_library_version().lower() and current().mpir_enable_gpu != "0"
