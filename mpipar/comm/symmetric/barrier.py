"""A barrier in shared memory that also exchanges a few integers (one-node pools).

Each node-local rank owns a 256-byte slot of a small control window:
[epoch, payload of barrier 2k (3 ints), payload of barrier 2k+1 (3 ints)].
At its k-th barrier a rank writes its payload into the slot of parity k, then
(after a memory fence) publishes epoch = k; it waits until every peer's epoch
is >= k, fences, and reads their payloads. A peer cannot reach barrier k+2
(and overwrite the payload of parity k) before this rank has reached k+1, by
which time it has read everything of barrier k: two payload slots suffice.

Arrival is visible at once (no message progress to poll, unlike an MPI
barrier), and waiting is polite: a short spin, then `sched_yield`, then sleeps
of growing length (at once when ranks outnumber cores).
"""
from __future__ import annotations

import os
import time

import numpy as np

from ...flight.recorder import Channel, begin, done
from ..wait import wait_all
from .window import Window

SLOT = 256                 # bytes per rank: its own cache lines
_SPIN = 64                 # checks before yielding (only when cores are not oversubscribed)
_YIELDS = 16               # sched_yield rounds before sleeping
_MAX_SLEEP = 2e-4


class ShmBarrier:
    """Barrier + small allgather over the ranks of a node communicator (collective creation)."""

    def __init__(self, node, polite: bool):
        self.window = Window(node, SLOT, -2)
        self.n, self.me = node.Get_size(), node.Get_rank()
        self.slots = [s.view(np.int64) for s in self.window.segments]
        self.slots[self.me][:] = 0
        self.epoch = 0
        self.polite = polite
        self.flight = Channel(node, "node")  # recorded when no outer call is (mpipar.flight)
        self.window.sync()
        wait_all([node.Ibarrier()])  # every slot is zeroed before anyone waits on it

    def wait(self, payload=None) -> np.ndarray | None:
        """Barrier; with `payload` (3 ints) returns the (n, 3) table of every rank's payload."""
        k = self.epoch = self.epoch + 1
        mine = self.slots[self.me]
        base = 1 + 3 * (k % 2)
        if payload is not None:
            mine[base:base + 3] = payload
        self.window.sync()
        mine[0] = k
        slot = begin(self.flight, "shm barrier")
        try:
            self._wait_for(k)
        finally:
            done(slot)
        self.window.sync()
        if payload is None:
            return None
        return np.stack([s[base:base + 3] for s in self.slots])

    def _wait_for(self, k: int) -> None:
        others = [s for i, s in enumerate(self.slots) if i != self.me]
        spins, sleep = (0 if not self.polite else _SPIN), 1e-6
        while True:
            if all(s[0] >= k for s in others):
                return
            spins += 1
            if spins <= _SPIN:
                continue
            if spins <= _SPIN + _YIELDS:
                os.sched_yield()
            else:
                time.sleep(sleep)
                sleep = min(sleep * 2, _MAX_SLEEP)
                self.window.sync()

    def free(self) -> None:
        """Collective over the node."""
        self.slots = []
        self.window.free()
