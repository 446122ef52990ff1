"""Point-to-point for the pipeline runner: tagged, non-blocking, self-describing, fail-fast.

Every tensor travels as two messages on the runner's private communicator: a
small header (dtype code, ndim, shape) and the data. The receiver posts the
header receives of a whole step up front and posts each data receive as soon
as its header lands, so it never guesses a shape: a tensor of the wrong shape
or dtype for the computation fails in the computation, not in MPI.

Fail-fast: a stage that fails tells every other stage (`fail`, one small
message each on a reserved tag). Every wait here also watches for such a
notice and raises `PeerFailed` (an MpiparError) instead of waiting forever.
"""
from __future__ import annotations

import time

import numpy as np
import torch
from mpi4py import MPI

from ..comm.buffers import DTYPE_CODES, mpi_buffer, needs_staging
from ..device import node_is_oversubscribed
from ..errors import MpiparError

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
        self._reset()

    def _reset(self) -> None:
        self._headers: dict = {}   # key -> (request, header array, source)
        self._data: dict = {}      # key -> (request, tensor, host staging or None, source)
        self._local: dict = {}     # key -> tensor handed over within this rank
        self._sends: list = []     # (request, buffers kept alive)
        self._error = None         # (request, byte buffer)

    def max_tag(self, num_microbatches: int) -> int:
        return message_tag((1, num_microbatches - 1, self.num_virtual - 1), self.num_virtual) + 1

    # ---- one step --------------------------------------------------------------------------
    def begin(self, receives) -> None:
        """Post the header receives of this step; receives = [(key, source rank)], remote only."""
        self._reset()
        buf = bytearray(_ERROR_BYTES)
        self._error = (self.comm.Irecv([buf, MPI.BYTE], source=MPI.ANY_SOURCE, tag=ERROR_TAG), buf)
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
        header = self._headers.pop(key, None)
        if header is not None:
            req, values, src = header
            self._post_arrived()
            self._wait([req])
            self._post_data(key, values, src)
        if key not in self._data:
            raise MpiparError(f"pipeline recv: message {key} was not expected in this step")
        req, tensor, host, _ = self._data.pop(key)
        self._wait([req])
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
        self._wait([r for reqs, _ in self._sends for r in reqs])
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
        watch = self._error[0] if self._error is not None else None
        spin_until = time.perf_counter() + (0.0 if self.polite else SPIN_S)
        sleep = 1e-6
        while not MPI.Request.Testall(pending):
            if watch is not None and watch.Get_status():
                status = MPI.Status()
                watch.Test(status)
                self._raise_peer_failure(status)
            if time.perf_counter() > spin_until:
                time.sleep(sleep)
                sleep = min(sleep * 2, MAX_SLEEP_S)

    def wait(self, request) -> None:
        """Wait for any MPI request while watching for failures of other stages."""
        self._wait([request])

    # ---- failures --------------------------------------------------------------------------
    def fail(self, message: str) -> None:
        """Tell every other rank that this stage failed (non-blocking), then stop listening."""
        data = message.encode()[:_ERROR_BYTES]
        for dst in range(self.comm.Get_size()):
            if dst != self.rank:
                self._sends.append(([self.comm.Isend([data, MPI.BYTE], dest=dst, tag=ERROR_TAG)], data))
        self._cancel_receives()

    def _check_error(self) -> None:
        if self._error is None:
            return
        status = MPI.Status()
        if self._error[0].Test(status):
            self._raise_peer_failure(status)

    def _raise_peer_failure(self, status) -> None:
        buf = self._error[1]
        self._error = None
        text = bytes(buf[:status.Get_count(MPI.BYTE)]).decode(errors="replace")
        self._cancel_receives()
        raise PeerFailed(text)

    def _cancel_receives(self) -> None:
        pending = [e[0] for e in self._headers.values()] + [e[0] for e in self._data.values()]
        if self._error is not None:
            pending.append(self._error[0])
        for req in pending:
            req.Cancel()
            req.Wait()
        self._headers, self._data, self._error = {}, {}, None

