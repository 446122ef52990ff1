"""Point-to-point on tensors: send, recv, isend, irecv with tags.

Messages between one pair of ranks never get confused: MPI matches on
(source, tag, communicator) and keeps order for equal tags, and mpipar's own
ring traffic travels on a private duplicate communicator (`Group.p2p`).
A received message whose size differs from the buffer raises MpiparError.
The bytes move through `mpipar.comm.channel.Channel` on the group's communicator.
"""
from __future__ import annotations

import mpi4py  # not mpi4py.MPI (that initialises MPI)
import torch

from ..errors import MpiparError
from ..mesh import as_group
from .channel import Channel

MAX_USER_TAG = 32767  # the MPI standard guarantees at least this


def _check_tag(tag: int) -> None:
    if not 0 <= tag <= MAX_USER_TAG:
        raise MpiparError(f"tag must be in [0, {MAX_USER_TAG}], got {tag}")


def _check_peer(peer: int, g, what: str) -> None:
    if not 0 <= peer < g.size:
        raise MpiparError(f"{what} rank {peer} is outside the group of size {g.size}")


class Request:
    """A pending send or receive. `wait()` completes it; an irecv's wait returns the buffer."""

    def __init__(self, channel: Channel, pending, tensor, peer: int, op: str):
        self._channel, self._pending, self._tensor = channel, pending, tensor
        self._peer, self._op = peer, op  # for the flight recorder
        self.done = False

    @property
    def mpi_request(self):
        return self._pending.request

    def wait(self):
        if not self.done:
            t = self._tensor
            self._channel.wait([self._pending], self._op, self._peer, t.dtype, t.shape)
            self.done = True
        return self._tensor

    def test(self) -> bool:
        p = self._pending
        if not self.done and p.request.Test(p.status):
            self.done = True
            p.finish()
        return self.done


def isend(t: torch.Tensor, dst: int, group, tag: int = 0) -> Request:
    g = as_group(group)
    _check_tag(tag)
    _check_peer(dst, g, "send: destination")
    ch = Channel(g.comm, g)
    pending = ch.send(t, dst, tag)
    return Request(ch, pending, pending.buffer, dst, "send")


def irecv(buf: torch.Tensor, src: int, group, tag: int = 0) -> Request:
    g = as_group(group)
    _check_tag(tag)
    if src != mpi4py.MPI.ANY_SOURCE:  # loaded: g has a communicator
        _check_peer(src, g, "recv: source")
    ch = Channel(g.comm, g)
    # A message longer than the buffer: MPI raises MPI_ERR_TRUNCATE, translated on wait.
    return Request(ch, ch.recv(buf, src, tag, check_size=True), buf, src if src >= 0 else -2, "recv")


def send(t: torch.Tensor, dst: int, group, tag: int = 0) -> None:
    isend(t, dst, group, tag).wait()


def recv(buf: torch.Tensor, src: int, group, tag: int = 0) -> torch.Tensor:
    return irecv(buf, src, group, tag).wait()
