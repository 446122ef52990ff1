"""Polite waiting on MPI requests.

Oversubscribed (more ranks than cores on the node), a rank blocked in MPI's
Wait busy-polls and steals the core from the rank that computes. There we
poll with Test and sleep between polls with a short back-off; otherwise we
use MPI's own Wait (lowest latency).
"""
from __future__ import annotations

import time

from ..device import node_is_oversubscribed
from ..flight.recorder import UNKNOWN, begin, done

_SPIN_TESTS = 50
_MAX_SLEEP = 2e-4


def wait_all(requests) -> None:
    """Complete every request in `requests` (mpi4py Requests or mpipar.comm.Request objects)."""
    from mpi4py import MPI

    reqs = [r for r in requests if r is not None]
    ours = [r for r in reqs if hasattr(r, "mpi_request")]  # mpipar Requests: finish via .wait()
    if ours:
        wait_all([r for r in reqs if not hasattr(r, "mpi_request")])
        for r in ours:  # all are posted already, so waiting one by one cannot deadlock
            r.wait()
        return
    if not reqs:
        return
    slot = begin(UNKNOWN, "wait")  # -1 (nothing recorded) inside a recorded call, the usual case
    try:
        if not node_is_oversubscribed():
            MPI.Request.Waitall(reqs)
            return
        _poll(lambda: MPI.Request.Testall(reqs))
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
    _poll(lambda: request.Test(status))


def _poll(done) -> None:
    """Call done() until it is true: spin a little, then sleep with exponential back-off."""
    spins, sleep = 0, 1e-6
    while not done():
        spins += 1
        if spins > _SPIN_TESTS:
            time.sleep(sleep)
            sleep = min(sleep * 2, _MAX_SLEEP)
