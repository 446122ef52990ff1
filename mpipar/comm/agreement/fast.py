"""The validated all-reduce, and the other small collectives, in one C call (fast.c), where it
builds and applies.

inline.py's small all-reduce is one Allgather of the group's table wrapped in a
dozen Python frames and torch calls: a 4 KiB all-reduce took 4x raw MPI's time,
and each Python layer on its path cost more than the flight record around it.
fast.c does the same protocol (same table, same heads, same rank-order
reduction, same bits) in one call, and records itself in the flight ring through
the ring's C API. A larger CPU tensor that goes to MPI's own all-reduce takes the
same call: the agreement, then MPI_Allreduce in place (what collectives._all_reduce
calls), without the Python between them. The context's `run` does the same for a
small broadcast, all_gather, reduce_scatter or all_to_all whose data rides in the
table (mpipar.comm.agreement.fast_ops: inline_ops' result, copied or reduced from
the table in C), and for a larger one that goes to MPI's own collective (MPI_Bcast,
MPI_Allgather, MPI_Reduce_scatter_block, MPI_Alltoall after the agreement), or, where
the table is shared, rides in its payload slots (mpipar.comm.agreement.shm_table).

It applies where the group's agreement is a blocking MPI_Allgather (ranks with
their own cores) or the shared-memory table (crowded ranks on one node,
mpipar.comm.agreement.shm_table: there the small collectives, and every other
agreement's exchange (ctx.exchange), waiting in C under mpipar.comm.wait.POLITE),
the flight ring is C (mpipar.flight.ring), and mpi4py's MPI library exports
the five collectives of _SYMBOLS. Otherwise, or with MPIPAR_FAST_AGREEMENT=0, or when the build
fails, inline.py's Python path runs, with the same results.
"""
from __future__ import annotations

import ctypes
import os
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("fast.c")
MODULE = "mpipar_agreement_fast"  # fast.c's PyInit_<name>
# -O3: the reductions' loops vectorize (fast.c's header); no -march=native, so one build serves
# every node that shares the cache
FLAGS = ("-O3", "-fPIC", "-shared", "-fwrapv", "-ffp-contract=off")

FAST_DTYPES = {torch.float32: 0, torch.float64: 1, torch.int64: 2, torch.int32: 3, torch.int16: 4, torch.int8: 5,
               torch.uint8: 6, torch.bool: 6}  # fast.c's dtype codes (bool: as uint8, its sum a max)
_state: dict = {}  # "module", "symbols": built once per process (None: unavailable)


_SYMBOLS = ("MPI_Allgather", "MPI_Allreduce", "MPI_Bcast", "MPI_Alltoall", "MPI_Reduce_scatter_block")


def _mpi_symbols() -> tuple[int, ...] | None:
    """The addresses of _SYMBOLS in the MPI library this process loaded (mpi4py's), or None."""
    seen = set()
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split()
            path = parts[5] if len(parts) > 5 else ""
            name = os.path.basename(path)
            if not (name.startswith("libmpi") and ".so" in name) or path in seen:
                continue
            seen.add(path)
            try:
                lib = ctypes.CDLL(path, mode=os.RTLD_NOLOAD | os.RTLD_LAZY)
                return tuple(ctypes.cast(getattr(lib, n), ctypes.c_void_p).value for n in _SYMBOLS)
            except (OSError, AttributeError):
                continue
    return None


def _load():
    if "module" not in _state:
        module = symbols = None
        try:
            from ... import native
            from ...flight import recorder
            from ...settings import current

            if current().fast_agreement != "0" and recorder.IMPLEMENTATION == "C" and os.path.exists("/proc/self/maps"):
                symbols = _mpi_symbols()
                if symbols and all(symbols):
                    module = native.extension(SOURCE, MODULE, "agreement_fast", FLAGS)
        except Exception:  # noqa: BLE001 - a failed build or lookup: the Python path
            module = None
        _state["module"], _state["symbols"] = module, symbols
    return _state["module"]


def context(g, table, shared=None):
    """The C all-reduce of group `g` over its agreement table (numpy uint8, (N, slot)), or None
    where it does not apply. `shared`: the group's ShmTable, when the table is exchanged
    through shared memory (then the C call does that exchange). Ranks that outnumber cores
    on several nodes keep the Python path: they wait politely, not in MPI's busy loop."""
    if shared is None and g.oversubscribed:
        return None
    return build(g, table, shared)


def build(g, table, shared=None):
    """The C all-reduce over `table` (exchanged by MPI_Allgather, or through `shared`, a ShmTable)
    for any group (tests use it where ranks share cores), or None when fast.c or MPI_Allgather
    is not available."""
    module = _load()
    if module is None or not table.flags.c_contiguous:
        return None
    from mpi4py import MPI

    from ...flight import recorder
    from ..buffers import _mpi_type
    from ..symmetric import compiled

    try:
        in_place = int(MPI.IN_PLACE)  # the C constant (mpi4py's int value of MPI_IN_PLACE)
        by_code = {code: dt for dt, code in FAST_DTYPES.items() if dt is not torch.bool}
        types = tuple(MPI._handleof(_mpi_type(by_code[k])) for k in range(7))
        ops = tuple(MPI._handleof(o) for o in (MPI.SUM, MPI.MAX, MPI.MIN))
        allgather, allreduce, *more = _state["symbols"]
        # compiled.c's stream_copy for copies of 2 MiB and more, or memcpy (None): a rank's own fact,
        # the bytes copied are the same either way; only the payload slots copy megabytes
        stream = None if shared is None else compiled.stream_copy_address()
        return module.context(allgather, allreduce, MPI._handleof(g.comm), MPI._handleof(MPI.BYTE), in_place, types,
                              ops, table.ctypes.data, table.shape[1], table.shape[0], g.rank, recorder.ring_api(),
                              (table, shared), None if shared is None else shared.layout(), tuple(more), stream)
    except (TypeError, ValueError, OverflowError, AttributeError):  # not an mpi4py communicator (a wrapper)
        return None
