"""Non-blocking MPI collectives on flat tensors, as ZeRO posts them.

`post(call, send, recv)` runs `call(sendbuf, recvbuf)` (e.g. the data group's
Ireduce_scatter_block or Iallgather; send=None: in place) and returns a
Pending that keeps both tensors alive until MPI is done with them. CPU
tensors go to MPI by address: a numpy view would pin the storage's size, and
ZeRO-3 frees and re-allocates the full parameter storage. Device tensors that
MPI cannot read go through host copies, copied back by `complete()`.

For the flight recorder (mpipar.flight) each Pending carries `record` = (channel,
op, dtype, shape) and is recorded once, when it completes: `wait` records the wait
(so a rank stuck in it is named with the op and the group), `complete` after a
successful Test records a call of no duration. A channel per kind of operation
(ZeRO's reduce-scatters, its all-gathers) sees its operations complete in one
order on every rank, so their sequence numbers line up across ranks whichever
of them a rank happened to find finished by a Test.
"""
from __future__ import annotations

import torch

from ...comm.buffers import address_buffer, mpi_buffer, needs_staging
from ...comm.wait import wait_all
from ...flight.recorder import begin, done


class Pending:
    def __init__(self, request, after=None, keep=(), record=None):
        self.request, self.after, self.keep, self.record = request, after, keep, record

    def complete(self) -> None:
        """After MPI finished the request: record it (if not yet) and copy staged results back (once)."""
        if self.record is not None:
            done(begin(*self.record))
            self.record = None
        if self.after is not None:
            self.after()
            self.after = None


def _buffer(t: torch.Tensor):
    return address_buffer(t) if t.is_cpu else mpi_buffer(t)


def _in_place():
    from mpi4py import MPI

    return MPI.IN_PLACE


def post(call, send: torch.Tensor | None, recv: torch.Tensor, record=None) -> Pending:
    """record: (flight channel, op name) of the operation; dtype and shape are recv's."""
    rec = None if record is None else (*record, recv.dtype, tuple(recv.shape))
    if not ((send is not None and needs_staging(send)) or needs_staging(recv)):
        return Pending(call(_buffer(send) if send is not None else _in_place(), _buffer(recv)), keep=(send, recv),
                       record=rec)
    hs = send.cpu() if send is not None else None
    hr = recv.cpu()
    return Pending(call(_buffer(hs) if hs is not None else _in_place(), _buffer(hr)),
                   lambda: recv.copy_(hr), keep=(hs, hr), record=rec)


def wait(ops) -> None:
    """Complete every Pending in `ops`, in order (each wait recorded as its operation)."""
    for op in ops:
        slot = begin(*op.record) if op.record is not None else -1
        op.record = None
        try:
            wait_all([op.request])
        finally:
            done(slot)
        op.complete()
