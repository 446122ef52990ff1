"""Point-to-point for the pipeline runner: tagged, non-blocking, self-describing, fail-fast.

Every tensor travels as two messages on the runner's private communicator: a
small header (dtype code, ndim, shape) and the data. The receiver posts the
header receives of a whole step up front and posts each data receive as soon
as its header lands, so it never guesses a shape: a tensor of the wrong shape
or dtype for the computation fails in the computation, not in MPI.

Fail-fast: a stage that fails tells every other stage (`fail`, one small
message each on a reserved tag). Every wait here also watches for such a
notice and raises `PeerFailed` (an MpiparError) instead of waiting forever.

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

import time

import numpy as np
import torch
from mpi4py import MPI

from ..comm.buffers import DTYPE_CODES, mpi_buffer, needs_staging
from ..device import node_is_oversubscribed
from ..errors import MpiparError
from ..flight.recorder import Channel, begin, begin_p2p, done

MAX_NDIM = 8
SPIN_S = 2e-4       # busy-poll this long before sleeping (not when oversubscribed)
MAX_SLEEP_S = 2e-4  # longest sleep between polls
ERROR_TAG = 1
_ERROR_BYTES = 2048
_DTYPES = {code: dt for dt, code in DTYPE_CODES.items()}


class PeerFailed(MpiparError):
    """Another stage of the pipeline failed; raised on the stages that were waiting for it."""


def message_tag(key, num_virtual: int) -> int:
    """Tag of a message's header; its data uses tag + 1. key = (direction, microbatch, virtual stage)."""
    direction, microbatch, virtual = key
    return 2 + 2 * ((microbatch * num_virtual + virtual) * 2 + direction)


class Transport:
    """Tagged tensor messages between the stages of one pipeline (one step at a time)."""

    def __init__(self, comm, num_virtual: int, device: torch.device):
        self.comm, self.rank = comm, comm.Get_rank()
        self.num_virtual, self.device = num_virtual, device
        self.polite = node_is_oversubscribed()
        self.tag_ub = comm.Get_attr(MPI.TAG_UB) or 32767
        self._stranded: list = []  # requests a peer's failure left pending, with their buffers
        self.flight = Channel(comm, "pipeline")  # for the flight recorder (mpipar.flight)
        self._reset()

    def _reset(self) -> None:
        self._headers: dict = {}   # key -> (request, header array, source)
        self._data: dict = {}      # key -> (request, tensor, host staging or None, source)
        self._local: dict = {}     # key -> tensor handed over within this rank
        self._sends: list = []     # (request, buffers kept alive)
        self._watch: list = []     # failure notices: (request, byte buffer), one per peer

    def max_tag(self, num_microbatches: int) -> int:
        return message_tag((1, num_microbatches - 1, self.num_virtual - 1), self.num_virtual) + 1

    # ---- one step --------------------------------------------------------------------------
    def begin(self, receives) -> None:
        """Post the header receives of this step; receives = [(key, source rank)], remote only."""
        self._reset()
        for src in range(self.comm.Get_size()):
            if src != self.rank:
                buf = bytearray(_ERROR_BYTES)
                self._watch.append((self.comm.Irecv([buf, MPI.BYTE], source=src, tag=ERROR_TAG), buf))
        for key, src in receives:
            header = np.zeros(2 + MAX_NDIM, dtype=np.int64)
            req = self.comm.Irecv(header, source=src, tag=message_tag(key, self.num_virtual))
            self._headers[key] = (req, header, src)

    def send(self, t: torch.Tensor, key, dst: int) -> None:
        """Send tensor `t` (non-blocking) as message `key` to rank `dst`."""
        if dst == self.rank:
            self._local[key] = t.detach().clone()
            return
        t = t.detach()
        if t.dim() > MAX_NDIM or t.dtype not in DTYPE_CODES:
            raise MpiparError(f"pipeline send: cannot send a {t.dim()}-d {t.dtype} tensor "
                              f"(at most {MAX_NDIM} dims, dtypes {list(DTYPE_CODES)})")
        header = np.zeros(2 + MAX_NDIM, dtype=np.int64)
        header[0], header[1] = DTYPE_CODES[t.dtype], t.dim()
        header[2:2 + t.dim()] = t.shape
        data = t.to("cpu") if needs_staging(t) else t.contiguous()
        tag = message_tag(key, self.num_virtual)
        reqs = [self.comm.Isend(header, dest=dst, tag=tag),
                self.comm.Isend(mpi_buffer(data), dest=dst, tag=tag + 1)]
        self._sends.append((reqs, (header, data)))

    def recv(self, key) -> torch.Tensor:
        """Wait (politely, watching for failures) for message `key` and return its tensor."""
        if key in self._local:
            return self._local.pop(key)
        entry = self._headers.get(key) or self._data.get(key)
        slot = begin_p2p(self.flight, "pipeline recv", entry[-1] if entry else -2, detail=key)
        try:
            return self._recv(key)
        finally:
            done(slot)

    def _recv(self, key) -> torch.Tensor:
        self._post_arrived()
        if key in self._headers:  # not arrived yet; stays in the table while waited for
            req, values, src = self._headers[key]
            self._wait([req])
            del self._headers[key]
            self._post_data(key, values, src)
        if key not in self._data:
            raise MpiparError(f"pipeline recv: message {key} was not expected in this step")
        req, tensor, host, _ = self._data[key]
        self._wait([req])
        del self._data[key]
        if host is not None:
            tensor.copy_(host)
        return tensor

    def progress(self) -> None:
        """Post data receives for arrived headers, retire finished sends, check for failures."""
        self._check_error()
        self._post_arrived()
        self._sends = [s for s in self._sends if not MPI.Request.Testall(s[0])]

    def _post_arrived(self) -> None:
        """Post the data receive of every header that has arrived (so its transfer can start)."""
        if not self._headers:
            return
        keys = list(self._headers)
        done = MPI.Request.Testsome([self._headers[k][0] for k in keys])
        for n in done or ():
            _, values, src = self._headers.pop(keys[n])
            self._post_data(keys[n], values, src)

    def _post_data(self, key, header, src) -> None:
        code, ndim = int(header[0]), int(header[1])
        if code not in _DTYPES or not 0 <= ndim <= MAX_NDIM:
            raise MpiparError(f"pipeline recv: bad header {header.tolist()} from rank {src}")
        shape = tuple(int(n) for n in header[2:2 + ndim])
        tensor = torch.empty(shape, dtype=_DTYPES[code], device=self.device)
        host = torch.empty(shape, dtype=tensor.dtype) if needs_staging(tensor) else None
        target = tensor if host is None else host
        tag = message_tag(key, self.num_virtual) + 1
        self._data[key] = (self.comm.Irecv(mpi_buffer(target), source=src, tag=tag), tensor, host, src)

    def finish(self) -> None:
        """Wait until every send of this step has completed; drop the failure watch."""
        slot = begin_p2p(self.flight, "pipeline sends", -2)
        try:
            self._wait([r for reqs, _ in self._sends for r in reqs])
        finally:
            done(slot)
        self._sends = []
        self._cancel_receives()

    def _wait(self, requests) -> None:
        """Complete every request, raising PeerFailed as soon as another stage reports a failure.

        Polls with Test: spins briefly (not when oversubscribed), then sleeps
        with a short back-off, so a waiting stage leaves the CPU to computing
        ones (MPI's Wait would busy-poll; torch's gloo sleeps in the kernel).
        The added latency is at most one sleep (<= 0.2 ms).
        """
        pending = [r for r in requests if r]
        spin_until = time.perf_counter() + (0.0 if self.polite else SPIN_S)
        sleep = 1e-6
        while not MPI.Request.Testall(pending):
            self._check_error()
            if time.perf_counter() > spin_until:
                time.sleep(sleep)
                sleep = min(sleep * 2, MAX_SLEEP_S)

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
        data = message.encode()[:_ERROR_BYTES]
        for dst in range(self.comm.Get_size()):
            if dst != self.rank:
                self._sends.append(([self.comm.Isend([data, MPI.BYTE], dest=dst, tag=ERROR_TAG)], data))
        self._cancel_receives()

    def _check_error(self) -> None:
        """Raise PeerFailed if another stage's failure notice has arrived."""
        for req, buf in self._watch:
            if req.Get_status():
                status = MPI.Status()
                req.Wait(status)
                text = bytes(buf[:status.Get_count(MPI.BYTE)]).decode(errors="replace")
                self._cancel_receives()
                raise PeerFailed(text)

    def _cancel_receives(self) -> None:
        """Cancel every receive still posted and complete it, so MPI holds no buffer of ours."""
        entries = list(self._headers.values()) + list(self._data.values()) + self._watch
        for entry in entries:
            if entry[0]:  # not completed yet
                entry[0].Cancel()
                entry[0].Wait()
        self._headers, self._data, self._watch = {}, {}, []

