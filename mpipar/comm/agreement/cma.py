"""Cross-memory attach: whether every rank of a crowded group can read its peers' memory.

Linux's process_vm_readv copies straight from another process's address space: one copy
where a shared-memory slot makes two (the sender's into the slot, the receiver's out of
it). MPICH uses it for its own large intra-node messages, which is why its all-to-all beat
the payload slots from 1 MiB (results/TUNING.md). fast.c's KIND_CMA_COPY reads an
all-to-all's blocks out of the peers' inputs the same way, after the agreement's exchange
has carried each rank's pid and input address.

Whether a process may read another is the kernel's decision (ptrace access mode: the Yama
ptrace_scope, capabilities, a container's seccomp profile), so it is tried here, once per
group, on a probe word each rank publishes, and the verdict is agreed: the calls take
KIND_CMA_COPY only where every rank read every peer. MPIPAR_CMA=0 turns it off.
"""
from __future__ import annotations

import ctypes
import os

import numpy as np

from ...settings import current


class _Iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


def _reader():
    """libc's process_vm_readv, or None (not Linux, or a libc without it)."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).process_vm_readv
    except (OSError, AttributeError):
        return None
    fn.restype = ctypes.c_ssize_t
    fn.argtypes = [ctypes.c_int, ctypes.POINTER(_Iovec), ctypes.c_ulong, ctypes.POINTER(_Iovec), ctypes.c_ulong,
                   ctypes.c_ulong]
    return fn


def _reads(read, pid: int, addr: int, expect: int) -> bool:
    """Does one process_vm_readv of 8 bytes at `addr` in process `pid` give `expect`?"""
    got = np.zeros(1, dtype=np.int64)
    local, remote = _Iovec(got.ctypes.data, 8), _Iovec(addr, 8)
    return read(pid, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0) == 8 and int(got[0]) == expect


def works(g) -> bool:
    """Collective over g (its ranks on one node): True when every rank read a word from every
    peer's memory, the same verdict on every rank. Polite waits: the group is crowded."""
    from mpi4py import MPI

    from ..wait import wait_all

    read = _reader() if current().cma != "0" else None
    token = np.array([(os.getpid() << 16) ^ (g.rank + 1) * 0x9E3779B1], dtype=np.int64)  # kept until the verdict
    mine = np.array([os.getpid(), token.ctypes.data, token[0]], dtype=np.int64)
    rows = np.zeros((g.size, 3), dtype=np.int64)
    wait_all([g.comm.Iallgather(mine, rows)])
    ok = read is not None and all(_reads(read, int(p), int(a), int(v)) for r, (p, a, v) in enumerate(rows)
                                  if r != g.rank)
    verdict = np.array([int(ok)], dtype=np.int64)
    wait_all([g.comm.Iallreduce(MPI.IN_PLACE, verdict, op=MPI.MIN)])  # (no peer reads `token` past this)
    return bool(verdict[0])
