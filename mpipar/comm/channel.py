"""One channel for tagged point-to-point: the only place mpipar posts Isend/Irecv.

A `Channel` wraps one communicator (usually a group's private duplicate,
`Group.p2p`, so mpipar's traffic never matches a user's message) and the
flight-recorder channel its waits are recorded on. Users: the public
`mpipar.comm.send/recv` (p2p.py), the ring collectives (backends/ring.py),
ring attention's K/V ring and the pipeline transport.

- Posting: `post_send`/`post_recv` hand MPI a buffer it can use in place (the
  ring's hot path: raw requests, no wrapper). `send`/`recv` take any tensor:
  a CUDA tensor without CUDA-aware MPI, or a non-contiguous receive buffer,
  goes through a host copy; they return a `Pending` that keeps every buffer
  MPI may touch alive until it completes, and copies a staged receive back.
- Headers: `send_described` sends a tensor as a small header (dtype code,
  ndim, shape) on `tag` and its data on `tag + 1`; `recv_header` and
  `recv_described` let a receiver that does not know the shape post the data
  receive once the header has landed.
- Completion: `wait` goes through mpipar.comm.wait (MPI's Wait, or polite
  polling when oversubscribed), records the wait in the flight recorder when
  given a name, then finishes each Pending (size check, copy-back).
- Failure notices: after `watch_failures(tag)` the channel holds one receive
  per peer on that tag (never MPI_ANY_SOURCE, see pipeline/transport.py);
  `wait` then polls (as does a `polite` channel always) and raises
  `PeerFailed` as soon as a notice lands;
  `notify_failure` sends one; `cancel` takes back receives still posted.
"""
from __future__ import annotations

import mpi4py  # not mpi4py.MPI (that initialises MPI): a Channel's comm means MPI is loaded
import numpy as np
import torch

from ..errors import MpiparError
from ..flight.recorder import begin_p2p, done
from . import wait as _wait
from .buffers import DTYPE_CODES, MAX_NDIM, borrowed_buffer, mpi_buffer, needs_staging

_DTYPES = {code: dt for dt, code in DTYPE_CODES.items()}
NOTICE_BYTES = 2048  # longest failure notice carried


class PeerFailed(MpiparError):
    """Another rank of the channel reported a failure; raised on the ranks waiting on it."""


class Pending:
    """A posted send or receive: its MPI request and the buffers MPI may still touch.

    `target`: the tensor a staged receive is copied into on `finish`.
    `status`, `nbytes`: for a receive whose byte count is checked on `finish`."""

    __slots__ = ("request", "buffer", "target", "status", "nbytes")

    def __init__(self, request, buffer, target=None, status=None, nbytes=None):
        self.request, self.buffer, self.target = request, buffer, target
        self.status, self.nbytes = status, nbytes

    def finish(self) -> None:
        """After completion: check the received size, copy a staged receive back."""
        if self.status is not None:
            got = self.status.Get_count(mpi4py.MPI.BYTE)
            if got != self.nbytes:
                raise MpiparError(
                    f"recv: message from rank {self.status.Get_source()} tag {self.status.Get_tag()} "
                    f"has {got} bytes, the buffer holds {self.nbytes}")
        if self.target is not None:
            self.target.copy_(self.buffer.view(self.target.shape))


# headers by (dtype, shape) and (shape, dtype) by header bytes: a pipeline sends the same few
# shapes every step, and building or parsing a header was a sizeable share of a small message
_HEADERS: dict = {}
_DESCRIBED: dict = {}


def _remember(cache: dict, key, value):
    if len(cache) > 1024:
        cache.clear()
    cache[key] = value
    return value


def _request(x):
    return x.request if isinstance(x, Pending) else x


class Channel:
    """Tagged point-to-point on communicator `comm`; waits recorded on `flight` (a Group or
    a flight-recorder Channel; None records nothing). polite: always wait by polling with
    back-off (mpipar.comm.wait's POLITE where ranks outnumber cores, so a waiting rank leaves
    the CPU to computing ones, the pipeline's stages; else BUSY), never in MPI's busy Wait;
    otherwise only while failure notices are watched or the node is oversubscribed."""

    def __init__(self, comm, flight=None, polite: bool = False):
        self.comm, self.flight, self.polite = comm, flight, polite
        self._watch: list = []  # failure notices: Pending per peer, while watching

    # ---- posting ---------------------------------------------------------------------------
    def post_send(self, t: torch.Tensor, dst: int, tag: int):
        """Isend of a tensor MPI can read in place (contiguous, host or CUDA-aware)."""
        return self.comm.Isend(mpi_buffer(t), dest=dst, tag=tag)

    def post_recv(self, t: torch.Tensor, src: int, tag: int):
        """Irecv into a tensor MPI can write in place."""
        return self.comm.Irecv(mpi_buffer(t), source=src, tag=tag)

    def send(self, t: torch.Tensor, dst: int, tag: int) -> Pending:
        """Send any tensor; a host copy (its own buffer, kept alive) when MPI cannot read it."""
        if needs_staging(t):
            buf = torch.empty(t.shape, dtype=t.dtype)
            buf.copy_(t)
        else:
            buf = t.contiguous()
        # the Pending holds buf until the send completes: its memory may go by address
        return Pending(self.comm.Isend(borrowed_buffer(buf), dest=dst, tag=tag), buf)

    def recv(self, t: torch.Tensor, src: int, tag: int, check_size: bool = False) -> Pending:
        """Receive into any tensor (through a host buffer when MPI cannot write it in place).
        check_size: `finish` raises MpiparError if the message is shorter than `t`."""
        staged = needs_staging(t) or not t.is_contiguous()
        buf = torch.empty(t.shape, dtype=t.dtype) if staged else t
        status = nbytes = None
        if check_size:
            status, nbytes = mpi4py.MPI.Status(), t.numel() * t.element_size()
        request = self.comm.Irecv(borrowed_buffer(buf), source=src, tag=tag)  # held as in send
        return Pending(request, buf, t if staged else None, status, nbytes)

    # ---- self-describing messages ------------------------------------------------------------
    def send_described(self, t: torch.Tensor, dst: int, tag: int, what: str = "send") -> list[Pending]:
        """Send `t` as a header (dtype code, ndim, shape) on `tag` and its data on `tag + 1`."""
        header = _HEADERS.get((t.dtype, t.shape))
        if header is None:
            if t.dim() > MAX_NDIM or t.dtype not in DTYPE_CODES:
                raise MpiparError(f"{what}: cannot send a {t.dim()}-d {t.dtype} tensor "
                                  f"(at most {MAX_NDIM} dims, dtypes {list(DTYPE_CODES)})")
            header = np.zeros(2 + MAX_NDIM, dtype=np.int64)
            header[0], header[1] = DTYPE_CODES[t.dtype], t.dim()
            header[2:2 + t.dim()] = t.shape
            header.flags.writeable = False  # shared by every send of this dtype and shape
            _remember(_HEADERS, (t.dtype, t.shape), header)
        return [Pending(self.comm.Isend(header, dest=dst, tag=tag), header), self.send(t, dst, tag + 1)]

    def recv_header(self, src: int, tag: int) -> Pending:
        header = np.zeros(2 + MAX_NDIM, dtype=np.int64)
        return Pending(self.comm.Irecv(header, source=src, tag=tag), header)

    def recv_described(self, header, src: int, tag: int, device, what: str = "recv") -> Pending:
        """Post the data receive (tag + 1) of a message whose header (an arrived
        `recv_header` buffer) says its dtype and shape; `finish` leaves the tensor in
        `.target` (staged) or `.buffer`."""
        key = header.tobytes()
        described = _DESCRIBED.get(key)
        if described is None:
            code, ndim = int(header[0]), int(header[1])
            if code not in _DTYPES or not 0 <= ndim <= MAX_NDIM:
                raise MpiparError(f"{what}: bad header {header.tolist()} from rank {src}")
            described = _remember(_DESCRIBED, key, (tuple(int(n) for n in header[2:2 + ndim]), _DTYPES[code]))
        return self.recv(torch.empty(described[0], dtype=described[1], device=device), src, tag + 1)

    # ---- completion --------------------------------------------------------------------------
    def wait(self, items, name: str | None = None, peer: int = -2, dt=None, sh=None, detail=None) -> None:
        """Complete `items` (Pendings or mpi4py requests; None ignored) and finish the Pendings.

        name: record the wait in the flight recorder as p2p call `name` with `peer`
        (-2: several) on this channel's flight channel. While failure notices are
        watched, polls and raises PeerFailed when one lands (the items stay posted:
        the caller cancels or keeps them)."""
        slot = begin_p2p(self.flight, name, peer, dt, sh, detail) if name and self.flight is not None else -1
        try:
            if self._watch or self.polite:
                self._poll_watching([_request(x) for x in items if x is not None])
            else:
                self._complete(items)
        finally:
            done(slot)
        for x in items:
            if isinstance(x, Pending):
                x.finish()

    @staticmethod
    def _complete(items) -> None:
        """MPI's wait (or polite polling where ranks outnumber cores); a size-checked receive
        is waited with its status. One pass over `items`: this is every p2p call's path."""
        reqs, checked = [], []
        for x in items:
            if isinstance(x, Pending):
                if x.status is not None:
                    checked.append(x)
                    continue
                x = x.request
            if x is not None:
                reqs.append(x)
        if reqs:
            _wait.wait_requests(reqs)
        if checked:
            try:
                for x in checked:
                    _wait.wait_status(x.request, x.status)
            except mpi4py.MPI.Exception as exc:
                raise MpiparError(f"recv failed: {exc.Get_error_string()} "
                                  "(message larger than the buffer?)") from None

    def _poll_watching(self, requests) -> None:
        testall = mpi4py.MPI.Request.Testall

        def finished() -> bool:
            self.check_failures()
            return testall(requests)

        # BUSY where ranks have their own cores: nobody needs the core a waiting stage holds, and
        # POLITE's sleeps grow with the wait, so a stage would wake late after a long bubble
        _wait.backoff(_wait.node_is_oversubscribed()).wait(finished)

    # ---- failure notices ---------------------------------------------------------------------
    def watch_failures(self, tag: int) -> None:
        """Post one failure-notice receive per peer on `tag` (replacing any earlier watch)."""
        MPI = mpi4py.MPI
        self._watch = []
        me = self.comm.Get_rank()
        for src in range(self.comm.Get_size()):
            if src != me:
                buf = bytearray(NOTICE_BYTES)
                self._watch.append(Pending(self.comm.Irecv([buf, MPI.BYTE], source=src, tag=tag), buf))

    def notify_failure(self, message: str, tag: int) -> list[Pending]:
        """Send failure notice `message` to every peer (non-blocking); stop watching."""
        MPI = mpi4py.MPI
        data, me = message.encode()[:NOTICE_BYTES], self.comm.Get_rank()
        sent = [Pending(self.comm.Isend([data, MPI.BYTE], dest=dst, tag=tag), data)
                for dst in range(self.comm.Get_size()) if dst != me]
        self.stop_watching()
        return sent

    def check_failures(self) -> None:
        """Raise PeerFailed (after cancelling the watch) if a peer's failure notice has arrived."""
        for p in self._watch:
            if p.request.Get_status():
                status = mpi4py.MPI.Status()
                p.request.Wait(status)
                text = bytes(p.buffer[:status.Get_count(mpi4py.MPI.BYTE)]).decode(errors="replace")
                self.stop_watching()
                raise PeerFailed(text)

    def stop_watching(self) -> None:
        self.cancel(self._watch)
        self._watch = []

    @staticmethod
    def cancel(items) -> None:
        """Cancel every receive among `items` still posted and complete it, so MPI holds no
        buffer of ours."""
        for x in items:
            req = _request(x)
            if req:  # not completed yet
                req.Cancel()
                req.Wait()

    @staticmethod
    def test_all(items) -> bool:
        return mpi4py.MPI.Request.Testall([_request(x) for x in items])
