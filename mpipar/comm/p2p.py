"""Point-to-point on tensors: send, recv, isend, irecv with tags.

Messages between one pair of ranks never get confused: MPI matches on
(source, tag, communicator) and keeps order for equal tags, and mpipar's own
ring traffic travels on a private duplicate communicator (`Group.p2p`).
A received message whose size differs from the buffer raises MpiparError.
"""
from __future__ import annotations

import torch

from ..errors import MpiparError
from ..mesh import as_group
from .buffers import mpi_buffer, needs_staging
from ..flight.recorder import begin_p2p, done
from .wait import wait_all, wait_status

MAX_USER_TAG = 32767  # the MPI standard guarantees at least this


def _check_tag(tag: int) -> None:
    if not 0 <= tag <= MAX_USER_TAG:
        raise MpiparError(f"tag must be in [0, {MAX_USER_TAG}], got {tag}")


def _check_peer(peer: int, g, what: str) -> None:
    if not 0 <= peer < g.size:
        raise MpiparError(f"{what} rank {peer} is outside the group of size {g.size}")


class Request:
    """A pending send or receive. `wait()` completes it; an irecv's wait returns the buffer."""

    def __init__(self, mpi_request, tensor, staged=None, status=None, expected_bytes=None, group=None, peer=-1,
                 op="send"):
        self._req, self._tensor, self._staged = mpi_request, tensor, staged
        self._status, self._expected = status, expected_bytes
        self._group, self._peer, self._op = group, peer, op  # for the flight recorder
        self.done = False

    @property
    def mpi_request(self):
        return self._req

    def wait(self):
        if not self.done:
            slot = self._record()
            try:
                wait_all([self._req])
            finally:
                done(slot)
            self.done = True
            self._finish()
        return self._tensor

    def _record(self) -> int:
        if self._group is None:
            return -1
        return begin_p2p(self._group, self._op, self._peer, self._tensor.dtype, self._tensor.shape)

    def test(self) -> bool:
        if not self.done and self._req.Test(self._status):
            self.done = True
            self._finish()
        return self.done

    def _finish(self):
        from mpi4py import MPI

        if self._status is not None:
            got = self._status.Get_count(MPI.BYTE)
            if got != self._expected:
                raise MpiparError(
                    f"recv: message from rank {self._status.Get_source()} tag {self._status.Get_tag()} "
                    f"has {got} bytes, the buffer holds {self._expected}")
        if self._staged is not None:
            self._tensor.copy_(self._staged.view(self._tensor.shape))


def _send_view(t: torch.Tensor):
    if needs_staging(t):
        host = torch.empty(t.shape, dtype=t.dtype)  # own buffer: a pending isend keeps it alive
        host.copy_(t)
        return host
    return t.contiguous()


def isend(t: torch.Tensor, dst: int, group, tag: int = 0) -> Request:
    g = as_group(group)
    _check_tag(tag)
    _check_peer(dst, g, "send: destination")
    buf = _send_view(t)
    req = g.comm.Isend(mpi_buffer(buf), dest=dst, tag=tag)
    return Request(req, buf, group=g, peer=dst)


def irecv(buf: torch.Tensor, src: int, group, tag: int = 0) -> Request:
    from mpi4py import MPI

    g = as_group(group)
    _check_tag(tag)
    if src != MPI.ANY_SOURCE:
        _check_peer(src, g, "recv: source")
    staged = None
    if needs_staging(buf) or not buf.is_contiguous():
        staged = torch.empty(buf.shape, dtype=buf.dtype)
        target = staged
    else:
        target = buf
    status = MPI.Status()
    nbytes = buf.numel() * buf.element_size()
    # Receive into a buffer one element larger would be needed to detect an over-long
    # message; MPI raises MPI_ERR_TRUNCATE for those, which we translate on wait.
    req = g.comm.Irecv(mpi_buffer(target), source=src, tag=tag)
    return _RecvRequest(req, buf, staged, status, nbytes, g, src if src >= 0 else -2, "recv")


class _RecvRequest(Request):
    def wait(self):
        from mpi4py import MPI

        if not self.done:
            slot = self._record()
            try:
                wait_status(self._req, self._status)
            except MPI.Exception as exc:
                raise MpiparError(f"recv failed: {exc.Get_error_string()} (message larger than the buffer?)") from None
            finally:
                done(slot)
            self.done = True
            self._finish()
        return self._tensor


def send(t: torch.Tensor, dst: int, group, tag: int = 0) -> None:
    isend(t, dst, group, tag).wait()


def recv(buf: torch.Tensor, src: int, group, tag: int = 0) -> torch.Tensor:
    return irecv(buf, src, group, tag).wait()
