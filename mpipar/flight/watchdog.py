"""The watchdog: a daemon thread that ends a job whose rank waits too long in one call.

It wakes every `tick` seconds (a tenth of the timeout, at most 1 s) and looks at
the call in flight in the flight recorder (mpipar.flight.recorder): one that has
waited longer than MPIPAR_TIMEOUT seconds is a hang. Then it prints

    mpipar watchdog: rank R waited T s in <op> #<seq> on group <ranks>

writes this rank's flight record, asks the other ranks on this node to write
theirs (SIGUSR2, mpipar.flight.job), gives them a moment, and aborts the job
(mpipar.flight.abort.abort_job: MPI_Abort from this thread, which also ends a main
thread blocked inside an MPI call; os._exit if MPI does not end the process).

The main thread never does anything for the watchdog besides recording its
calls: the waits keep MPI's own blocking calls (lowest latency), and a rank
that stops calling mpipar (asleep, a stuck data loader) holds no call in
flight, so its peers' watchdogs fire, not its own.

The thread also serves SIGUSR2 when the signal module's wakeup file descriptor
is ours (mpipar.flight.job): the byte written by the C-level handler wakes it,
so a live record is written even while the main thread is blocked in MPI.
"""
from __future__ import annotations

import os
import select
import signal
import sys
import threading
import time

from . import peers, recorder
from .dump import dump, identity

GRACE_S = 1.5  # after asking the node's other ranks for their records, before aborting


def describe(i: int, waited: float) -> str:
    """The watchdog's line for the call in slot i."""
    name, ch, seq, _, _, _, p, _ = recorder.entry(i)
    ranks = list(getattr(ch, "world_ranks", ()) or ())
    group = getattr(ch, "name", None)
    text = f"mpipar watchdog: rank {identity.rank} waited {waited:.1f} s in {name} #{seq} on group {ranks}"
    if 0 <= p < len(ranks):
        text += f" ({group}, peer rank {ranks[p]})"
    elif group:
        text += f" ({group})"
    return text


class Watchdog(threading.Thread):
    def __init__(self, timeout: float, wake_fd: int | None = None, on_expiry=None):
        super().__init__(name="mpipar-watchdog", daemon=True)
        self.timeout = timeout
        self.tick = min(1.0, max(0.02, timeout / 10)) if timeout > 0 else None
        self.wake_fd = wake_fd
        self.on_expiry = on_expiry or expire
        self.fired = False

    def run(self) -> None:
        while True:
            if self.wake_fd is not None:
                try:
                    ready, _, _ = select.select([self.wake_fd], [], [], self.tick)
                except (OSError, ValueError):  # the descriptor went away: go on without it
                    self.wake_fd, ready = None, []
                if ready:
                    self._signals()
            elif self.tick is not None:
                time.sleep(self.tick)
            else:
                return
            if self.tick is not None and not self.fired:
                self.check()

    def _signals(self) -> None:
        try:
            data = os.read(self.wake_fd, 512)
        except (BlockingIOError, InterruptedError):
            return
        if signal.SIGUSR2 in data:
            dump("signal")

    def check(self) -> bool:
        """Fire if the call in flight has waited longer than the timeout. True if it fired."""
        found = recorder.in_flight()
        if found is None:
            return False
        i, entry, start = found
        waited = time.perf_counter() - start
        if waited < self.timeout or not recorder.still(i, entry):
            return False
        self.fired = True
        self.on_expiry(i, waited)
        return True


def expire(i: int, waited: float) -> None:
    """The watchdog's verdict for this rank: say it, record it, have the node's ranks record, abort."""
    from .abort import abort_job

    message = describe(i, waited)
    print(message, file=sys.stderr, flush=True)
    path = dump("watchdog", message)
    if path:
        print(f"mpipar watchdog: rank {identity.rank} flight record: {path} "
              f"(verdict: python -m mpipar.flight {os.path.dirname(path) or '.'})", file=sys.stderr, flush=True)
    if peers.signal_peers():
        time.sleep(GRACE_S)
    abort_job(1)
