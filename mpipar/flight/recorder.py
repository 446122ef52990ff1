"""The flight recorder: the last CAPACITY communication calls of this process, in a ring.

Recording is on the hot path of every call (a 4 KiB all-reduce takes a few us),
so a call costs two clock reads (start and end), the channel's sequence number
and a few stores into a fixed ring, nothing else: no dict, no string. Names,
ranks, dtypes and byte counts are worked out only when the record is read
(`calls`, at dump time). The ring is C where mpipar.flight.ring builds (a fixed
array of slots: no allocation per call); the Python below is the specification
and the fallback (a tuple per call in a preallocated list).

Slot i holds (op, channel, seq, dtype, shape, algorithm, peer, start):
  op: the call's name ("all_reduce", "recv", "pipeline recv", ...); channel: the Group
  or Channel it went over (a reference: its name and world ranks are read at dump time);
  seq: per-channel sequence number, collectives and point-to-point counted apart (two
  peers make different numbers of p2p calls) in the channel's `flight_counts`, so the
  ranks' records of one group line up by sequence number (mpipar.flight.verdict);
  dtype, shape: of its tensor, or None (then maybe in `noted`); algorithm: asked for ("auto", "ring", ...) or a detail;
  peer: the p2p peer's rank in the channel (-2: several), -1 for a collective;
  start: perf_counter at the start.
A call begun without dtype and shape gets them from a description (anything with
`.dtype` and `.shape`) left in `described.info` while it is in flight: the argument
agreement of mpipar.comm.all_reduce leaves its cached one there with one attribute
store (a function call cost more than the rest of the record); `done` files it as
`noted[i]`.

Calls nest (an all_reduce waits in an Allgather, then in a shared-memory barrier):
only the outermost is recorded, so every rank numbers the same calls. `begin`
returns the slot, or -1 when a call is already in flight; `done` takes it back.
Callers use try/finally, so a call that raises is closed too.

The watchdog (mpipar.flight.watchdog) reads `in_flight()` from its own thread.
Callers pass begin's arguments positionally (the C version takes no keywords).
"""
from __future__ import annotations

import time
import weakref

from . import ring

CAPACITY = 256
_MASK = CAPACITY - 1

_clock = time.perf_counter

slots = [None] * CAPACITY
noted = [None] * CAPACITY
ends = [0.0] * CAPACITY    # perf_counter at the end of the call in each slot

# The one word of state: the slot of the call in flight (>= 0), or, between calls, ~slot
# of the next call (< 0). `done` takes the next state from _IDLE (no arithmetic per call).
_current = ~0
_IDLE = [~((i + 1) & _MASK) for i in range(CAPACITY)]
_laps = 0  # times the ring wrapped (for the count of calls recorded)


class _Described:
    __slots__ = ("info",)

    def __init__(self):
        self.info = None  # the description of the call in flight (dtype, shape), or None


described = _Described()


class Description:
    __slots__ = ("dtype", "shape")

    def __init__(self, dtype, shape):
        self.dtype, self.shape = dtype, shape


def counts():
    """A channel's sequence counters (its `flight_counts`): [collectives, point-to-point], two
    int64 that the C ring increments in place."""
    return memoryview(bytearray(16)).cast("q")


class Channel:
    """A communicator's identity in the record: a name, its members' world ranks, counters."""

    __slots__ = ("comm", "name", "world_ranks", "flight_counts", "__weakref__")

    def __init__(self, comm, name: str):
        self.comm = comm
        self.name = name
        self.world_ranks = world_ranks(comm) if comm is not None else ()
        self.flight_counts = counts()


UNKNOWN = Channel(None, "unknown")  # waits on requests whose communicator the waiter does not know
_channels = weakref.WeakValueDictionary()  # id(comm) -> its Group or Channel (checked with `is`)
_made: dict = {}  # the Channels channel_of made: kept, their sequence numbers must go on


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
        _made[id(comm)] = ch
    return ch


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


def begin(ch, name, dt=None, sh=None, algo=None, peer=-1) -> int:
    """Record the start of call `name` on channel `ch`: a collective, or with `peer` (a rank
    of `ch`; -2: several peers) a point-to-point wait. Returns its slot (-1: nested)."""
    global _current, _laps
    c = _current
    if c >= 0:
        return -1
    i = ~c
    if not i:
        _laps += 1
    counter, k = ch.flight_counts, 0 if peer == -1 else 1
    s = counter[k] = counter[k] + 1
    slots[i] = (name, ch, s, dt, sh, algo, peer, _clock())
    _current = i  # last: the watchdog reads the slot it names
    return i


def begin_p2p(ch, name, to, dt=None, sh=None, detail=None) -> int:
    """`begin` of a point-to-point wait with peer `to` (a rank of `ch`; -2: several peers)."""
    return begin(ch, name, dt, sh, detail, to)


def note(dt, sh) -> None:
    """Give the call in flight its dtype and shape, when its caller began it without them
    (the hot path sets `described.info` to a description it has at hand instead, only ever
    while its call is in flight). No call in flight: nothing to describe."""
    if state()[0] >= 0:
        described.info = Description(dt, sh)


def done(i: int) -> None:
    """Record the end of the call in slot `i` (no-op for -1: a nested call)."""
    global _current
    if i >= 0:
        ends[i] = _clock()
        noted[i] = described.info
        described.info = None
        _current = _IDLE[i]


def recorded(ch, name, fn, *args, **kwargs):
    """fn(*args, **kwargs) recorded as collective `name` on channel `ch` (a Group, or
    `channel_of(comm)`): for the blocking mpi4py calls off the hot path (object
    allgather, bcast, gather, Barrier), so that the watchdog sees their waits too."""
    slot = begin(ch, name)
    try:
        return fn(*args, **kwargs)
    finally:
        done(slot)


def _py_state() -> tuple:
    return _current, _laps


def _py_reset() -> None:
    global _current, _laps
    _current, _laps = ~0, 0
    slots[:] = [None] * CAPACITY
    noted[:] = [None] * CAPACITY
    ends[:] = [0.0] * CAPACITY


# The per-call functions and the readers of the ring: the C ring when it builds
# (mpipar.flight.ring), else the Python above. Only this block knows which.
PYTHON = {"begin": begin, "begin_p2p": begin_p2p, "done": done, "state": _py_state, "reset_ring": _py_reset,
          "entry": slots.__getitem__, "end": ends.__getitem__, "noted_of": noted.__getitem__}
_ring = ring.load()
if _ring is None:
    state, reset_ring, entry, end, noted_of = (PYTHON[k] for k in ("state", "reset_ring", "entry", "end", "noted_of"))
else:
    _ring.init(CAPACITY, described)
    begin, begin_p2p, done, state, reset_ring = _ring.begin, _ring.begin_p2p, _ring.done, _ring.state, _ring.reset
    entry, end, noted_of = _ring.entry, _ring.end, _ring.noted
IMPLEMENTATION = "C" if _ring is not None else "Python"


def ring_api():
    """The C ring's API capsule for other extensions (mpipar.comm.agreement.fast), or None."""
    return getattr(_ring, "api", None)


def in_flight():
    """(slot, its entry, start) of the call in flight, or None. Safe from another thread:
    the caller re-checks `still(slot, entry)` after using the values."""
    i = state()[0]
    if i < 0:
        return None
    e = entry(i)
    return i, e, e[7]


def still(i: int, e) -> bool:
    """Whether the call `in_flight` returned is still in flight (a later call in the same
    slot has another entry: its sequence number or start differs)."""
    return state()[0] == i and entry(i) == e


def _last() -> int:
    """The slot of the call in flight, else of the last call."""
    c = state()[0]
    return c if c >= 0 else (~c - 1) & _MASK


def count() -> int:
    """Calls recorded so far."""
    last = _last()
    return 0 if entry(last) is None else (state()[1] - 1) * CAPACITY + last + 1


def reset() -> None:
    """Forget every call (tests)."""
    reset_ring()
    described.info = None


def calls() -> list[dict]:
    """The recorded calls, oldest first, as plain dicts (start and end still perf_counter
    values; done: False and end None for the call in flight)."""
    cur, last = state()[0], _last()
    first = max(0, count() - CAPACITY)  # call number of the oldest slot
    out = []
    for k in range(last + 1, last + 1 + CAPACITY):
        i = k & _MASK
        e = entry(i)
        if e is None:
            continue
        name, ch, s, dt, sh, algo, p, t0 = e
        extra = (described.info if i == cur else None) or noted_of(i)  # the C path notes at the start
        if dt is None and sh is None and extra is not None:
            dt, sh = extra.dtype, extra.shape
        item = getattr(dt, "itemsize", None)
        dims = [int(d) for d in sh] if sh is not None else None
        numel = 1
        for d in dims or ():
            numel *= d
        out.append({
            "index": first + len(out),
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
            "end": end(i) if i != cur else None,
            "done": i != cur,
        })
    return out


def _world_peer(ch, p: int):
    ranks = getattr(ch, "world_ranks", None)
    if p < 0:
        return None
    return int(ranks[p]) if ranks and p < len(ranks) else p
