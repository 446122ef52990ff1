"""Point-to-point for the pipeline runner: tagged, non-blocking, self-describing, fail-fast.

Every tensor travels as two messages on the runner's private communicator (a
`mpipar.comm.channel.Channel`): a small header (dtype code, ndim, shape) and the data. The receiver posts the
header receives of a whole step up front and posts each data receive as soon
as its header lands, so it never guesses a shape: a tensor of the wrong shape
or dtype for the computation fails in the computation, not in MPI.

Fail-fast: a stage that fails tells every other stage (`fail`, one small
message each on a reserved tag). Every wait here also watches for such a
notice (the channel's failure watch) and raises `PeerFailed` (an MpiparError)
instead of waiting forever.

Two rules keep a failed step from corrupting memory later. No receive is ever
dropped while MPI may still write into it: every posted receive stays in
`_headers` or `_data` until it has completed (also while `recv` waits for it),
and a failure cancels them all. And the failure watch is one receive per peer,
never MPI_ANY_SOURCE: MPICH's ch4 posts an any-source receive to both its
shared-memory and network paths and cancels the twin ("anysrc partner"), a
path with a history of crashes (pmodels/mpich#7203, #7702, #7745); this
runner used to post and cancel one every step.
"""
from __future__ import annotations

import torch
from mpi4py import MPI

from ..comm.channel import Channel, PeerFailed
from ..errors import MpiparError
from ..flight.recorder import Channel as FlightChannel, begin, begin_p2p, done

ERROR_TAG = 1


def message_tag(key, num_virtual: int) -> int:
    """Tag of a message's header; its data uses tag + 1. key = (direction, microbatch, virtual stage)."""
    direction, microbatch, virtual = key
    return 2 + 2 * ((microbatch * num_virtual + virtual) * 2 + direction)


class Transport:
    """Tagged tensor messages between the stages of one pipeline (one step at a time)."""

    def __init__(self, comm, num_virtual: int, device: torch.device):
        self.comm, self.rank = comm, comm.Get_rank()
        self.num_virtual, self.device = num_virtual, device
        self.tag_ub = comm.Get_attr(MPI.TAG_UB) or 32767
        self._stranded: list = []  # requests a peer's failure left pending, with their buffers
        self.flight = FlightChannel(comm, "pipeline")  # for the flight recorder (mpipar.flight)
        self.channel = Channel(comm, self.flight, polite=True)
        self._reset()

    def _reset(self) -> None:
        self._headers: dict = {}   # key -> (header Pending, source)
        self._data: dict = {}      # key -> (data Pending, source)
        self._local: dict = {}     # key -> tensor handed over within this rank
        self._sends: list = []     # lists of send Pendings (they keep their buffers alive)

    def max_tag(self, num_microbatches: int) -> int:
        return message_tag((1, num_microbatches - 1, self.num_virtual - 1), self.num_virtual) + 1

    # ---- one step --------------------------------------------------------------------------
    def begin(self, receives) -> None:
        """Post the header receives of this step; receives = [(key, source rank)], remote only."""
        self._reset()
        self.channel.watch_failures(ERROR_TAG)
        for key, src in receives:
            self._headers[key] = (self.channel.recv_header(src, message_tag(key, self.num_virtual)), src)

    def send(self, t: torch.Tensor, key, dst: int) -> None:
        """Send tensor `t` (non-blocking) as message `key` to rank `dst`."""
        if dst == self.rank:
            self._local[key] = t.detach().clone()
            return
        tag = message_tag(key, self.num_virtual)
        self._sends.append(self.channel.send_described(t.detach(), dst, tag, "pipeline send"))

    def recv(self, key) -> torch.Tensor:
        """Wait (politely, watching for failures) for message `key` and return its tensor."""
        if key in self._local:
            return self._local.pop(key)
        entry = self._headers.get(key) or self._data.get(key)
        slot = begin_p2p(self.flight, "pipeline recv", entry[-1] if entry else -2, None, None, key)
        try:
            return self._recv(key)
        finally:
            done(slot)

    def _recv(self, key) -> torch.Tensor:
        self._post_arrived()
        if key in self._headers:  # not arrived yet; stays in the table while waited for
            header, src = self._headers[key]
            self._wait([header])
            del self._headers[key]
            self._post_data(key, header.buffer, src)
        if key not in self._data:
            raise MpiparError(f"pipeline recv: message {key} was not expected in this step")
        data, _ = self._data[key]
        self._wait([data])
        del self._data[key]
        return data.buffer if data.target is None else data.target

    def progress(self) -> None:
        """Post data receives for arrived headers, retire finished sends, check for failures."""
        self._check_error()
        self._post_arrived()
        self._sends = [s for s in self._sends if not Channel.test_all(s)]

    def _post_arrived(self) -> None:
        """Post the data receive of every header that has arrived (so its transfer can start)."""
        if not self._headers:
            return
        keys = list(self._headers)
        arrived = MPI.Request.Testsome([self._headers[k][0].request for k in keys])
        for n in arrived or ():
            header, src = self._headers.pop(keys[n])
            self._post_data(keys[n], header.buffer, src)

    def _post_data(self, key, header, src) -> None:
        tag = message_tag(key, self.num_virtual)
        self._data[key] = (self.channel.recv_described(header, src, tag, self.device, "pipeline recv"), src)

    def finish(self) -> None:
        """Wait until every send of this step has completed; drop the failure watch."""
        slot = begin_p2p(self.flight, "pipeline sends", -2)
        try:
            self._wait([p for sends in self._sends for p in sends])
        finally:
            done(slot)
        self._sends = []
        self._cancel_receives()

    def _wait(self, items) -> None:
        """Complete every item, raising PeerFailed as soon as another stage reports a failure.

        The channel polls with a back-off (mpipar.comm.wait's), so a waiting stage leaves
        the CPU to computing ones (MPI's Wait would busy-poll; torch's gloo sleeps in the
        kernel)."""
        try:
            self.channel.wait(items)
        except PeerFailed:
            self._cancel_receives()
            raise

    def wait(self, request, *buffers) -> None:
        """Wait for any MPI request while watching for failures of other stages.

        If another stage fails first, the request (a collective cannot be
        cancelled) and its `buffers` stay referenced by this transport, so MPI
        never writes into freed memory.
        """
        slot = begin(self.flight, "pipeline collective")
        try:
            self._wait([request])
        except PeerFailed:
            self._stranded.append((request, buffers))
            raise
        finally:
            done(slot)

    # ---- failures --------------------------------------------------------------------------
    def fail(self, message: str) -> None:
        """Tell every other rank that this stage failed (non-blocking), then stop listening."""
        self._sends.append(self.channel.notify_failure(message, ERROR_TAG))
        self._cancel_receives()

    def _check_error(self) -> None:
        """Raise PeerFailed if another stage's failure notice has arrived."""
        try:
            self.channel.check_failures()
        except PeerFailed:
            self._cancel_receives()
            raise

    def _cancel_receives(self) -> None:
        """Cancel every receive still posted and complete it, so MPI holds no buffer of ours."""
        Channel.cancel([e[0] for e in list(self._headers.values()) + list(self._data.values())])
        self.channel.stop_watching()
        self._headers, self._data = {}, {}
