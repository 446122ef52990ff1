"""The MPI library's own collectives on buffers: what algorithm="mpi" calls.

Each picks the library's fastest variant for the call: MPI_Allgather and
MPI_Reduce_scatter_block when every rank has the same count (MPICH's
Allgatherv took 2.2x the time at 2-16 MiB here, its Reduce_scatter with counts
2x at 256 KiB-1 MiB), else the v-variants. Blocking when ranks have their own
cores, non-blocking with polite waiting otherwise (mpipar.comm.wait.complete).
"""
from __future__ import annotations

import torch

from ..buffers import address_buffer, mpi_buffer, offsets
from ..wait import complete

_MPI_CONSTANTS: dict = {}  # filled at first use: importing this module does not import MPI


def _constants() -> dict:
    if not _MPI_CONSTANTS:
        from mpi4py import MPI

        _MPI_CONSTANTS.update(sum=MPI.SUM, max=MPI.MAX, min=MPI.MIN, in_place=MPI.IN_PLACE)
    return _MPI_CONSTANTS


def mpi_op(op: str, dtype: torch.dtype | None = None):
    """MPI.SUM/MAX/MIN for "sum"/"max"/"min" (a bool sum is a logical or: MAX)."""
    return _constants()["max" if dtype is torch.bool and op == "sum" else op]


def in_place():
    """MPI.IN_PLACE (looked up once: small calls run this on their hot path)."""
    return _constants()["in_place"]


def all_reduce_(g, flat: torch.Tensor, op: str) -> None:
    """In place on a contiguous tensor MPI can read (a CPU one by address, any shape)."""
    mop = mpi_op(op, flat.dtype)
    buf = address_buffer(flat) if flat.is_cpu and flat.numel() else mpi_buffer(flat)
    complete(g, "Allreduce", in_place(), buf, op=mop)


def all_gather(g, send, recv, counts: list[int]) -> None:
    """`send` (a buffer, or in_place(): already in `recv`) into `recv`; counts[r] from rank r."""
    if min(counts) == max(counts):
        complete(g, "Allgather", send, recv)
        return
    spec = (counts, offsets(counts))  # a vector spec: [data, (counts, displacements), datatype]
    recv = [recv[0], spec, recv[1]] if isinstance(recv, list) else [recv, spec]
    complete(g, "Allgatherv", send, recv)


def reduce_scatter(g, send, recv, counts: list[int], op: str) -> None:
    """Rank r's `recv` gets block r (counts[r] elements) of the op over every rank's `send`."""
    mop = mpi_op(op)
    if min(counts) == max(counts):
        complete(g, "Reduce_scatter_block", send, recv, op=mop)
        return
    complete(g, "Reduce_scatter", send, recv, counts, op=mop)
