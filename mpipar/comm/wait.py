"""Polite waiting on MPI requests, and the one wait/back-off policy of mpipar.

Oversubscribed (more ranks than cores on the node), a rank blocked in MPI's
Wait busy-polls and steals the core from the rank that computes. There we
poll with Test under the POLITE back-off; otherwise we use MPI's own Wait
(lowest latency). Every other polling loop (the shared-memory barrier,
mpipar.comm.symmetric.barrier) waits with `backoff(polite).wait(...)`, so the
constants live here only; results/TUNING.md has the measurement behind them.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import struct
import threading
import time

import mpi4py  # not mpi4py.MPI (that initialises MPI): functions given requests use mpi4py.MPI

from ..device import node_is_oversubscribed
from ..flight.recorder import UNKNOWN, begin, done


@dataclasses.dataclass(frozen=True)
class Backoff:
    """Check a condition until it holds: back to back for `spin_s` seconds, then each after a
    sched_yield (a runnable peer on this core goes first) until `yield_s` seconds have
    passed, then after sleeps growing from `first_sleep` by x2 up to `max_sleep` (the core is
    left to others; a wake-up costs up to one sleep of latency). With `share` > 0 the cap
    grows past `max_sleep` with the time waited, to `share` x that time, at most
    `longest_sleep`: a short wait wakes often (latency), a long one rarely (its added
    latency stays a fixed share of it, and the waiter's CPU use falls). Phases are timed,
    not counted: a check costs from 50 ns (a flag) to microseconds (MPI's Test).
    `timer_slack_ns` > 0 sets the sleeping thread's timer slack (Linux prctl; default
    50 us, which would stretch every short sleep to ~55 us)."""
    spin_s: float
    yield_s: float
    first_sleep: float
    max_sleep: float
    share: float = 0.0
    longest_sleep: float = 0.0
    timer_slack_ns: int = 0

    @functools.cached_property
    def packed(self) -> bytes:
        """The seven numbers as float64s, for the same wait in C (mpipar.comm.agreement.fast)."""
        return struct.pack("7d", self.spin_s, self.yield_s, self.first_sleep, self.max_sleep, self.share,
                           self.longest_sleep, self.timer_slack_ns)

    def wait(self, ready, between=None) -> None:
        """Return once ready() is true; between() (if given) runs after each sleep (a memory
        fence for flags in shared memory)."""
        if ready():
            return
        start = time.perf_counter()
        while time.perf_counter() - start < self.spin_s:
            if ready():
                return
        while time.perf_counter() - start < self.yield_s:
            os.sched_yield()
            if ready():
                return
        if self.timer_slack_ns:
            _timer_slack(self.timer_slack_ns)
        sleep, cap = self.first_sleep, self.max_sleep
        while not ready():
            time.sleep(sleep)
            if self.share:
                cap = max(self.max_sleep, min(self.share * (time.perf_counter() - start), self.longest_sleep))
            sleep = min(sleep * 2, cap)
            if between is not None:
                between()


_SLACK = threading.local()


def _timer_slack(ns: int) -> None:
    """This thread's timer slack, set once (a syscall): short sleeps then last what they ask."""
    if getattr(_SLACK, "ns", None) == ns:
        return
    _SLACK.ns = ns
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(29, ns, 0, 0, 0)  # PR_SET_TIMERSLACK
    except (OSError, AttributeError):  # not Linux: sleeps keep the system's slack
        pass


# ranks outnumber cores: no spinning (a spinning waiter holds a core a peer needs to reach
# the collective); yields first (a yield returns at once when nobody else wants the core, and
# hands it over when somebody does), then short sleeps while the wait is young, growing with
# the time waited in long ones (a long wait wakes rarely); results/TUNING.md has the
# measurement behind each constant
POLITE = Backoff(spin_s=0.0, yield_s=2e-4, first_sleep=1e-6, max_sleep=2e-5, share=1 / 16, longest_sleep=1e-3,
                 timer_slack_ns=1000)
BUSY = Backoff(spin_s=2e-4, yield_s=1e-3, first_sleep=1e-5, max_sleep=1e-4)  # ranks have their own cores


def polite_packed() -> bytes:
    """POLITE as fast.c reads it (Backoff.packed), read at each call like backoff()."""
    return POLITE.packed


def backoff(polite: bool) -> Backoff:
    """The policy for a wait: POLITE when ranks outnumber cores, else BUSY (read at each wait,
    so a measurement can swap the module's values: experiments/wait_policy.py)."""
    return POLITE if polite else BUSY


def wait_all(requests) -> None:
    """Complete every request in `requests` (mpi4py Requests or mpipar.comm.Request objects)."""
    reqs = [r for r in requests if r is not None]
    ours = [r for r in reqs if hasattr(r, "mpi_request")]  # mpipar Requests: finish via .wait()
    if ours:
        wait_all([r for r in reqs if not hasattr(r, "mpi_request")])
        for r in ours:  # all are posted already, so waiting one by one cannot deadlock
            r.wait()
        return
    if reqs:
        wait_requests(reqs)


def wait_requests(reqs: list) -> None:
    """Complete a non-empty list of mpi4py requests: MPI's Waitall, or polite polling where
    ranks outnumber cores (the channel's path: no filtering of None or mpipar Requests)."""
    MPI = mpi4py.MPI
    slot = begin(UNKNOWN, "wait")  # -1 (nothing recorded) inside a recorded call, the usual case
    try:
        if not node_is_oversubscribed():
            MPI.Request.Waitall(reqs)
            return
        poll(lambda: MPI.Request.Testall(reqs))
    finally:
        done(slot)


@contextlib.contextmanager
def all_present(g):
    """Inside: every rank of `g` has entered the current collective (its argument agreement,
    which waits for all of them, just ended), so `complete` may use MPI's blocking form even
    where ranks outnumber cores: nobody it could wait for is still computing, and MPICH's own
    progress loop (spinning with yields) moves a large message among present ranks faster
    than polls between sleeps (results/TUNING.md)."""
    before = g.__dict__.get("_all_present", False)
    g._all_present = True
    try:
        yield
    finally:
        g._all_present = before


def complete(g, name: str, *args, **kwargs) -> None:
    """Run the collective `name` of group `g`'s communicator (mpi4py's name: "Allreduce",
    "Bcast", ...) on these arguments: blocking when ranks have their own cores (MPI's own
    wait, no Python between the start and the end; MPICH's Iallreduce + Waitall measured
    within 7 us of Allreduce here at 256 KiB-8 MiB, slower at five of six sizes, and within
    the run's noise at 16-64 MiB) or when all of them are known to be in this call
    (`all_present`), else its non-blocking form ("I" + name: "Iallreduce") waited
    politely. Names, not closures: small calls run this on their hot path."""
    slot = begin(g, name)  # -1 (nothing recorded) inside an mpipar collective, which is recorded
    try:
        if g.oversubscribed and not g.__dict__.get("_all_present", False):
            wait_all([getattr(g.comm, "I" + name[0].lower() + name[1:])(*args, **kwargs)])
        else:
            getattr(g.comm, name)(*args, **kwargs)
    finally:
        done(slot)


def wait(request) -> None:
    wait_all([request])


def wait_status(request, status) -> None:
    """Complete one mpi4py request, filling `status` (MPI's Wait, or polite polling)."""
    if not node_is_oversubscribed():
        request.Wait(status)
        return
    poll(lambda: request.Test(status))


def poll(ready) -> None:
    """Call ready() until it is true, under the polite back-off (only oversubscribed ranks poll)."""
    POLITE.wait(ready)
