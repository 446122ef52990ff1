"""A shared-memory window of the node: this rank's segment and a view of every peer's.

`node_comm_of` picks the ranks that share memory (or, test-only with
MPIPAR_FAKE_RANKS_PER_NODE=k, fake "nodes" of k consecutive ranks, so the
inter-node path runs on one machine). The pool (mpipar.comm.symmetric.pool)
and the node barrier (mpipar.comm.symmetric.barrier) both build on `Window`.
"""
from __future__ import annotations

import numpy as np

from ...settings import current

PAGE = 4096


def fake_ranks_per_node() -> int:
    """MPIPAR_FAKE_RANKS_PER_NODE (test-only), 0 when unset."""
    return current().fake_ranks_per_node or 0


def node_comm_of(comm):
    """Ranks of `comm` on this node (or on this fake node), ordered by rank in `comm`."""
    from mpi4py import MPI

    fake = fake_ranks_per_node()
    if fake > 0:
        return comm.Split(comm.Get_rank() // fake, key=comm.Get_rank())
    return comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.Get_rank())


class Window:
    """One shared window: this rank's segment plus a numpy view of every node peer's segment."""

    def __init__(self, node, capacity: int, ident: int):
        from mpi4py import MPI

        info = MPI.Info.Create()
        info.Set("alloc_shared_noncontig", "true")
        self.win = MPI.Win.Allocate_shared(capacity, 1, info, comm=node)
        info.Free()
        self.win.Lock_all(MPI.MODE_NOCHECK)
        self.ident, self.capacity = ident, capacity
        self.segments = []
        for peer in range(node.Get_size()):
            buf, _ = self.win.Shared_query(peer)
            self.segments.append(np.frombuffer(buf, dtype=np.uint8, count=capacity))
        self.local = self.segments[node.Get_rank()]
        self.base = self.local.ctypes.data
        self.live = 0      # tensors of this rank still referencing the window
        self.plans: dict = {}  # cached numpy views of the shm kernels (mpipar.comm.symmetric.collectives), freed with it

    def view(self, peer: int, offset: int, nbytes: int) -> np.ndarray:
        """uint8 view of `nbytes` bytes at `offset` in node peer `peer`'s segment."""
        return self.segments[peer][offset:offset + nbytes]

    def sync(self) -> None:
        self.win.Sync()

    def _released(self) -> None:
        self.live -= 1

    def free(self) -> None:
        """Collective over the node: end the Lock_all epoch, then free the window."""
        self.segments, self.local, self.plans = [], None, {}
        self.win.Unlock_all()
        self.win.Free()
