"""Polite waiting on MPI requests, and the one wait/back-off policy of mpipar.

Oversubscribed (more ranks than cores on the node), a rank blocked in MPI's
Wait busy-polls and steals the core from the rank that computes. There we
poll with Test under the POLITE back-off; otherwise we use MPI's own Wait
(lowest latency). Every other polling loop (the shared-memory barrier,
mpipar.comm.symmetric.barrier) waits with `backoff(polite).wait(...)`, so the
constants live here only; results/TUNING.md has the measurement behind them.
"""
from __future__ import annotations

import dataclasses
import os
import time

import mpi4py  # not mpi4py.MPI (that initialises MPI): functions given requests use mpi4py.MPI

from ..device import node_is_oversubscribed
from ..flight.recorder import UNKNOWN, begin, done


@dataclasses.dataclass(frozen=True)
class Backoff:
    """Check a condition until it holds: back to back for `spin_s` seconds, then each after a
    sched_yield (a runnable peer on this core goes first) until `yield_s` seconds have
    passed, then after sleeps growing from `first_sleep` by x2 up to `max_sleep` (the core is
    left to others; a wake-up costs up to one sleep of latency). Phases are timed, not
    counted: a check costs from 50 ns (a flag) to microseconds (MPI's Test)."""
    spin_s: float
    yield_s: float
    first_sleep: float
    max_sleep: float

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
        sleep = self.first_sleep
        while not ready():
            time.sleep(sleep)
            sleep = min(sleep * 2, self.max_sleep)
            if between is not None:
                between()


POLITE = Backoff(spin_s=3e-5, yield_s=0.0, first_sleep=1e-6, max_sleep=1e-4)  # ranks outnumber cores
BUSY = Backoff(spin_s=2e-4, yield_s=1e-3, first_sleep=1e-5, max_sleep=1e-4)  # ranks have their own cores


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


def complete(g, name: str, *args, **kwargs) -> None:
    """Run the collective `name` of group `g`'s communicator (mpi4py's name: "Allreduce",
    "Bcast", ...) on these arguments: blocking when ranks have their own cores (MPI's own
    wait, no Python between the start and the end; MPICH's Iallreduce + Waitall measured
    within 7 us of Allreduce here at 256 KiB-8 MiB, slower at five of six sizes, and within
    the run's noise at 16-64 MiB), else its non-blocking form ("I" + name: "Iallreduce")
    waited politely. Names, not closures: small calls run this on their hot path."""
    slot = begin(g, name)  # -1 (nothing recorded) inside an mpipar collective, which is recorded
    try:
        if g.oversubscribed:
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
