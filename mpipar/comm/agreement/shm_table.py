"""The agreement's table gathered through shared memory: one round instead of MPI's log(N).

When a group's ranks outnumber the node's cores, every step of MPI's non-blocking
Allgather needs each partner to poll again (a sleeping rank makes no progress), so
the agreement table (mpipar.comm.agreement.inline) costs several sleep-and-wake
rounds. On a group that lives on one node, each rank instead owns two slots of a
small shared window: at its k-th exchange it copies its row into slot k % 2,
publishes epoch k, waits (mpipar.comm.wait's policy) until every peer's epoch is
>= k, and copies the peers' rows out of their slot k % 2. A peer cannot start
exchange k + 2 (and overwrite slot k % 2) before this rank has reached k + 1, by
which time it has copied everything of exchange k: two slots suffice (the same
argument as mpipar.comm.symmetric.barrier). Each exchange is also a barrier, as the
Allgather it replaces was (the shared-memory collectives rely on that).

mpipar.comm.agreement.fast makes the same exchange in C (fast.c's shm_exchange, its wait
under the same policy), counting in the same `count`, so ranks on either path meet.

Each rank also owns two payload slots of PAYLOAD_BYTES, used by the same parity rule: a
collective whose data is too large for the row but fits there (mpipar.comm.agreement.fast_ops,
tuning.SLOT_BYTES) copies its data into its payload slot k % 2 before exchange k and reads
the peers' after it, in C. The exchange then moves the data too, and the call needs no
second synchronisation (MPI's collective after the agreement was one; results/TUNING.md).
A large all-reduce makes one more exchange, with no row: each rank writes its reduced chunk
into its slot of the other parity between the two (fast.c's split_reduce).
The window's pages are only touched by calls that use them.

Whether a group gets one is decided collectively at its first agreement, the same
on every rank: one Allreduce, then (only when every rank is oversubscribed) the
node split. A group has no close, so a table lives as long as the process, and one
table serves every group of the same world ranks in the same order: a test suite or
a sweep builds thousands of groups, and a communicator and a window each would use
up MPI's context ids. Sharing is safe because an exchange is blocking and every
rank makes the calls of groups with the same members in the same order (as MPI
itself requires of synchronising collectives).
"""
from __future__ import annotations

import numpy as np

from ..wait import backoff, wait_all
from ..symmetric.window import PAGE, Window, node_comm_of

_EPOCH = 64  # bytes: the epoch word on its own cache line, then the two slots
# each of a rank's two payload slots (page-aligned, after the row slots); only the pages a call
# writes are ever allocated (4 ranks, one 4 MiB all-reduce: 20 MiB of /dev/shm)
PAYLOAD_BYTES = 8 << 20
_TABLES: dict = {}  # (world ranks in group order, row bytes) -> ShmTable


class ShmTable:
    """Two slots of `row_bytes` per rank in a shared window of the group's node."""

    def __init__(self, node, row_bytes: int, polite: bool):
        self.node = node
        self.n, self.me = node.Get_size(), node.Get_rank()
        self.row = row_bytes
        start = -(-(_EPOCH + 2 * row_bytes) // PAGE) * PAGE  # the payload slots
        self.window = Window(node, start + 2 * PAYLOAD_BYTES, -3)
        segs = self.window.segments
        self.epochs = [s[:8].view(np.int64) for s in segs]
        self.slots = [[s[_EPOCH + p * row_bytes:_EPOCH + (p + 1) * row_bytes] for p in (0, 1)] for s in segs]
        self.payloads = [[s[start + p * PAYLOAD_BYTES:start + (p + 1) * PAYLOAD_BYTES] for p in (0, 1)] for s in segs]
        self.epochs[self.me][0] = 0
        self.count = np.zeros(1, dtype=np.int64)  # exchanges so far; fast.c's exchange counts here too
        self.others = [self.epochs[r] for r in range(self.n) if r != self.me]
        self.peers = [r for r in range(self.n) if r != self.me]
        self.polite = polite
        self.cma = None  # whether every rank reads its peers' memory (agreement.cma.works), once asked
        self.window.sync()
        wait_all([node.Ibarrier()])  # every epoch is zeroed before anyone waits on it

    def gather(self, table: np.ndarray) -> None:
        """In place, like MPI_Allgather(IN_PLACE, table): row r of every rank's `table`
        becomes rank r's row."""
        self.count[0] += 1
        k = int(self.count[0])
        par = k & 1
        self.slots[self.me][par][:] = table[self.me]
        self.window.sync()
        self.epochs[self.me][0] = k
        others = self.others
        if not all(e[0] >= k for e in others):
            backoff(self.polite).wait(lambda: all(e[0] >= k for e in others), between=self.window.sync)
        self.window.sync()
        for r in self.peers:
            table[r] = self.slots[r][par]

    def layout(self) -> tuple:
        """(slot addresses: rank r's slot p at 2r + p, epoch addresses, the count's address, payload
        slot addresses in the slots' order, PAYLOAD_BYTES), for the same exchange in C
        (mpipar.comm.agreement.fast)."""
        slots = tuple(self.slots[r][p].ctypes.data for r in range(self.n) for p in (0, 1))
        payloads = tuple(self.payloads[r][p].ctypes.data for r in range(self.n) for p in (0, 1))
        return slots, tuple(e.ctypes.data for e in self.epochs), self.count.ctypes.data, payloads, PAYLOAD_BYTES


def for_group(g, row_bytes: int) -> ShmTable | None:
    """Collective over g (size > 1): a ShmTable when every rank of g is oversubscribed and
    all of g is on one node, else None (then the agreement gathers with MPI)."""
    from mpi4py import MPI

    flags = np.array([int(g.oversubscribed), -int(g.oversubscribed)], dtype=np.int64)
    wait_all([g.comm.Iallreduce(MPI.IN_PLACE, flags, op=MPI.MAX)])
    if not (flags[0] == 1 and flags[1] == -1):  # some rank has its own core: MPI's Allgather
        return None
    key = (tuple(g.world_ranks), row_bytes)   # every member made (or never made) this table
    if key in _TABLES:
        return _TABLES[key]
    node = node_comm_of(g.comm)
    if node.Get_size() != g.size:  # the same verdict on every rank: all on this node, or not
        node.Free()
        return None
    table = _TABLES[key] = ShmTable(node, row_bytes, polite=True)
    return table
