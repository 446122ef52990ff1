"""The flight recorder: the last CAPACITY communication calls of this process, in a ring.

Each slot holds one call: a tuple (op, channel, sequence number, dtype, shape,
algorithm, peer, start) and its end time in a preallocated list, so recording
a call builds one small tuple and reads the clock at its start and its end; the
memory stays that of CAPACITY slots. A channel is what the calls go over: an mpipar Group
or a `Channel` made for a private communicator; it carries the world ranks of
its members and its own sequence counters, so the ranks' records of one group
line up by sequence number (mpipar.flight.verdict).

Calls nest (an all_reduce waits in an Allgather, then in a shared-memory
barrier): only the outermost is recorded, so every rank numbers the same calls.
`begin` returns the slot, or -1 when a call is already in flight; `done` takes it
back. Callers use try/finally, so a call that raises is closed too.
Point-to-point calls (`begin_p2p`) are numbered apart from the collectives of
their channel: two peers make different numbers of them.

The watchdog (mpipar.flight.watchdog) reads `in_flight()` from its own thread.
"""
from __future__ import annotations

import time
import weakref

CAPACITY = 256
_MASK = CAPACITY - 1

_clock = time.perf_counter

# One tuple per call (CPython takes tuples of this size from its free list: the memory
# stays that of CAPACITY slots): (op, channel, seq, dtype, shape, algorithm, peer, start)
#   op: the call's name ("all_reduce", "recv", "pipeline recv", ...); channel: the Group
#   or Channel it went over; seq: per-channel sequence number (collectives and p2p counted
#   apart); dtype, shape: of its tensor, or None (then maybe in `noted`); algorithm: asked
#   for ("auto", "ring", ...) or a detail; peer: p2p peer's rank in the channel (-2:
#   several), -1 for a collective; start: perf_counter at the start.
slots = [None] * CAPACITY
end = [0.0] * CAPACITY        # perf_counter at the end (stale while the slot's call is in flight)
noted = [None] * CAPACITY     # (dtype, shape, call number + 1) given by `note` during the call

_count = 0      # calls recorded so far (slot of call k: k & _MASK)
_current = -1   # slot of the call in flight, -1 when none


class Channel:
    """A communicator's identity in the record: a name, its members' world ranks, counters."""

    __slots__ = ("comm", "name", "world_ranks", "flight_seq", "flight_p2p", "__weakref__")

    def __init__(self, comm, name: str):
        self.comm = comm
        self.name = name
        self.world_ranks = world_ranks(comm) if comm is not None else ()
        self.flight_seq = 0
        self.flight_p2p = 0


UNKNOWN = Channel(None, "unknown")  # waits on requests whose communicator the waiter does not know
_channels = weakref.WeakValueDictionary()  # id(comm) -> its Group or Channel (checked with `is`)


def register(comm, ch) -> None:
    """Make `ch` (an mpipar Group) the channel that `channel_of(comm)` returns."""
    _channels[id(comm)] = ch


def channel_of(comm, name: str = "comm"):
    """The Group or Channel of an mpi4py communicator (a new Channel the first time)."""
    ch = _channels.get(id(comm))
    if ch is None or ch.comm is not comm:
        ch = Channel(comm, name)
        register(comm, ch)
        if len(_made) > 1024:
            _made.clear()
        _made[id(comm)] = ch  # kept: its sequence numbers must go on
    return ch


_made: dict = {}


def world_ranks(comm) -> tuple:
    """The members of `comm` (rank order) as MPI_COMM_WORLD ranks (local, no communication)."""
    from mpi4py import MPI

    n = comm.Get_size()
    try:
        mine, world = comm.Get_group(), MPI.COMM_WORLD.Get_group()
        try:
            return tuple(int(r) for r in mine.Translate_ranks(list(range(n)), world))
        finally:
            mine.Free()
            world.Free()
    except Exception:  # pragma: no cover - an intercommunicator or a finalized MPI
        return tuple(range(n))


def begin(ch, name, dt=None, sh=None, algo=None) -> int:
    """Record the start of collective `name` on channel `ch`. Returns its slot (-1: nested)."""
    global _count, _current
    if _current >= 0:
        return -1
    i = _count & _MASK
    _count += 1
    s = ch.flight_seq = ch.flight_seq + 1
    slots[i] = (name, ch, s, dt, sh, algo, -1, _clock())
    _current = i
    return i


def begin_p2p(ch, name, to, dt=None, sh=None, detail=None) -> int:
    """Record the start of a point-to-point wait with peer `to` (a rank of `ch`; -2: several
    peers). Returns its slot, or -1 when nested."""
    global _count, _current
    if _current >= 0:
        return -1
    i = _count & _MASK
    _count += 1
    s = ch.flight_p2p = ch.flight_p2p + 1
    slots[i] = (name, ch, s, dt, sh, detail, to, _clock())
    _current = i
    return i


def note(dt, sh) -> None:
    """Give the call in flight its dtype and shape, when its caller began it without them
    (mpipar.comm.all_reduce leaves them to its argument agreement, which has them cached)."""
    i = _current
    if i >= 0:
        noted[i] = (dt, sh, _count)


def done(i: int) -> None:
    """Record the end of the call in slot `i` (no-op for -1: a nested call)."""
    global _current
    if i >= 0:
        end[i] = _clock()
        _current = -1


def recorded(ch, name, fn, *args, **kwargs):
    """fn(*args, **kwargs) recorded as collective `name` on channel `ch` (a Group, or
    `channel_of(comm)`): for the blocking mpi4py calls off the hot path (object
    allgather, bcast, gather, Barrier), so that the watchdog sees their waits too."""
    slot = begin(ch, name)
    try:
        return fn(*args, **kwargs)
    finally:
        done(slot)


def in_flight():
    """(slot, calls recorded, start) of the call in flight, or None. Safe from another thread:
    the caller re-checks `still(slot, count)` after using the values."""
    i, n = _current, _count
    if i < 0:
        return None
    return i, n, slots[i][7]


def still(i: int, n: int) -> bool:
    return _current == i and _count == n


def count() -> int:
    return _count


def reset() -> None:
    """Forget every call (tests)."""
    global _count, _current
    _count, _current = 0, -1
    slots[:] = [None] * CAPACITY
    end[:] = [0.0] * CAPACITY
    noted[:] = [None] * CAPACITY


def field(i: int, k: int):
    """Field k of slot i's call (OP, CHANNEL, SEQ, ..., START), None for an empty slot."""
    entry = slots[i]
    return None if entry is None else entry[k]


OP, CHANNEL, SEQ, DTYPE, SHAPE, ALGORITHM, PEER, START = range(8)


def calls() -> list[dict]:
    """The recorded calls, oldest first, as plain dicts (times still perf_counter values)."""
    n, cur = _count, _current
    out = []
    for k in range(max(0, n - CAPACITY), n):
        i = k & _MASK
        entry = slots[i]
        if entry is None:
            continue
        name, ch, s, dt, sh, algo, p, t0 = entry
        extra = noted[i]
        if dt is None and sh is None and extra is not None and extra[2] == k + 1:
            dt, sh = extra[0], extra[1]
        item = getattr(dt, "itemsize", None)
        dims = [int(d) for d in sh] if sh is not None else None
        numel = 1
        for d in dims or ():
            numel *= d
        out.append({
            "index": k,
            "seq": s,
            "op": name,
            "kind": "collective" if p == -1 else "p2p",
            "group": getattr(ch, "name", None),
            "ranks": list(getattr(ch, "world_ranks", ()) or ()),
            "peer": _world_peer(ch, p),
            "dtype": str(dt).replace("torch.", "") if dt is not None else None,
            "shape": dims,
            "bytes": numel * item if (item is not None and dims is not None) else None,
            "algorithm": algo if algo is None or isinstance(algo, (str, int)) else str(algo),
            "start": t0,
            "end": None if i == cur else end[i],
        })
    return out


def _world_peer(ch, p: int):
    ranks = getattr(ch, "world_ranks", None)
    if p < 0:
        return None
    return int(ranks[p]) if ranks and p < len(ranks) else p
