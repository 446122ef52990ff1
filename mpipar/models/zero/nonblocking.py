"""Non-blocking MPI collectives on flat tensors, as ZeRO posts them.

`post(call, send, recv)` runs `call(sendbuf, recvbuf)` (e.g. the data group's
Ireduce_scatter_block or Iallgather; send=None: in place) and returns a
Pending that keeps both tensors alive until MPI is done with them. CPU
tensors go to MPI by address: a numpy view would pin the storage's size, and
ZeRO-3 frees and re-allocates the full parameter storage. Device tensors that
MPI cannot read go through host copies, copied back by `complete()`.
"""
from __future__ import annotations

import torch

from ...comm.buffers import address_buffer, mpi_buffer, needs_staging
from ...comm.wait import wait_all


class Pending:
    def __init__(self, request, after=None, keep=()):
        self.request, self.after, self.keep = request, after, keep

    def complete(self) -> None:
        """After MPI finished the request: copy staged results back (once)."""
        if self.after is not None:
            self.after()
            self.after = None


def _buffer(t: torch.Tensor):
    return address_buffer(t) if t.is_cpu else mpi_buffer(t)


def _in_place():
    from mpi4py import MPI

    return MPI.IN_PLACE


def post(call, send: torch.Tensor | None, recv: torch.Tensor) -> Pending:
    if not ((send is not None and needs_staging(send)) or needs_staging(recv)):
        return Pending(call(_buffer(send) if send is not None else _in_place(), _buffer(recv)), keep=(send, recv))
    hs = send.cpu() if send is not None else None
    hr = recv.cpu()
    return Pending(call(_buffer(hs) if hs is not None else _in_place(), _buffer(hr)),
                   lambda: recv.copy_(hr), keep=(hs, hr))


def wait(ops) -> None:
    """Complete every Pending in `ops`."""
    ops = list(ops)
    wait_all([op.request for op in ops])
    for op in ops:
        op.complete()
