"""Data parallelism: gradient buckets all-reduced while the rest of the backward runs.

    buckets = GradBuckets(model.parameters(), group, bucket_bytes=1 << 20)
    buckets.start(num_microbatches)   # arm: each parameter accumulates this many times
    ... backward(s) ...               # a bucket's all-reduce starts the moment its last
                                      # gradient has accumulated (post-accumulate-grad hook)
    buckets.finish()                  # wait; every .grad is now the mean over the group

Parameters are packed into buckets of about `bucket_bytes`, in REVERSE order
(the backward produces the last layers' gradients first). A bucket is ready
when each of its parameters has accumulated its gradient `expected` times
(once per microbatch); it then launches a non-blocking MPI all-reduce
(Iallreduce) on a flat copy of its gradients. Buckets always launch in index
order (a ready bucket waits for earlier ones) so every rank posts the same
collectives in the same order. Each later hook call pokes MPI's progress
engine (Testall). `finish` launches whatever is left (parameters that got no
gradient count as zeros), waits politely and writes the averaged gradients
back. bf16/fp16 gradients are reduced in float32.
"""
from __future__ import annotations

import torch

from ..comm.buffers import mpi_buffer, needs_staging, reduce_dtype
from ..comm.wait import wait_all
from ..errors import MpiparError
from ..mesh import as_group

DEFAULT_BUCKET_BYTES = 1 << 20


class _Bucket:
    def __init__(self, params):
        self.params = params
        self.ready = 0          # parameters whose gradient is complete
        self.request = None     # pending MPI request
        self.buffer = None      # flat gradients being reduced


class GradBuckets:
    """Bucketed, overlapped gradient all-reduce (mean) over a data-parallel group."""

    def __init__(self, params, group, bucket_bytes: int = DEFAULT_BUCKET_BYTES, average: bool = True):
        self.group = as_group(group)
        self.average = average
        seen, unique = set(), []
        for p in params:
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                unique.append(p)
        self.buckets = _pack(list(reversed(unique)), bucket_bytes)
        self._bucket_of = {id(p): b for b in self.buckets for p in b.params}
        self._count: dict[int, int] = {}
        self._expected = 1
        self._armed = False
        self._next = 0          # index of the next bucket to launch
        self._overrun = None
        self._hooks = []
        if self.group.size > 1:
            self._hooks = [p.register_post_accumulate_grad_hook(self._on_grad) for p in unique]

    def start(self, expected: int = 1) -> None:
        """Arm for one step in which every parameter accumulates `expected` times."""
        if self._armed:
            raise MpiparError("GradBuckets.start: the previous step was not finished")
        self._expected = int(expected)
        self._count.clear()
        for b in self.buckets:
            b.ready, b.request, b.buffer = 0, None, None
        self._next, self._overrun = 0, None
        self._armed = self.group.size > 1

    def _on_grad(self, p) -> None:
        if not self._armed:
            return
        n = self._count.get(id(p), 0) + 1
        self._count[id(p)] = n
        bucket = self._bucket_of[id(p)]
        if n == self._expected:
            bucket.ready += 1
        elif n > self._expected:
            self._overrun = f"a parameter of shape {tuple(p.shape)} accumulated more gradients than expected"
        while self._next < len(self.buckets) and self.buckets[self._next].ready == len(self.buckets[self._next].params):
            self._launch(self.buckets[self._next])
        self._poke()

    def _launch(self, bucket: _Bucket) -> None:
        from mpi4py import MPI

        grads = []
        for p in bucket.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads.append(p.grad.detach().reshape(-1))
        flat = torch.cat(grads)
        flat = flat.to(reduce_dtype(flat.dtype))
        if needs_staging(flat):
            flat = flat.cpu()
        bucket.buffer = flat.contiguous()
        bucket.request = self.group.comm.Iallreduce(MPI.IN_PLACE, mpi_buffer(bucket.buffer), op=MPI.SUM)
        self._next += 1

    def _poke(self) -> None:
        from mpi4py import MPI

        pending = [b.request for b in self.buckets[: self._next] if b.request is not None]
        if pending:
            MPI.Request.Testall(pending)

    def finish(self) -> None:
        """Launch the remaining buckets, wait for all, and write the averaged gradients back."""
        if not self._armed:
            return
        self._armed = False
        while self._next < len(self.buckets):
            self._launch(self.buckets[self._next])
        wait_all([b.request for b in self.buckets])
        scale = 1.0 / self.group.size if self.average else 1.0
        with torch.no_grad():
            for b in self.buckets:
                offset = 0
                for p in b.params:
                    n = p.numel()
                    part = b.buffer[offset:offset + n].view(p.shape)
                    p.grad.copy_(part.to(device=p.grad.device, dtype=p.grad.dtype) * scale
                                 if scale != 1.0 else part)
                    offset += n
                b.buffer, b.request = None, None
        if self._overrun:
            raise MpiparError(f"GradBuckets: {self._overrun} (gradients were reduced too early)")

    def close(self) -> None:
        """Remove the hooks."""
        for h in self._hooks:
            h.remove()
        self._hooks = []


def _pack(params, bucket_bytes: int) -> list[_Bucket]:
    """Consecutive parameters in buckets of about bucket_bytes (at least one parameter each)."""
    buckets, current, size = [], [], 0
    for p in params:
        current.append(p)
        size += p.numel() * p.element_size()
        if size >= bucket_bytes:
            buckets.append(_Bucket(current))
            current, size = [], 0
    if current:
        buckets.append(_Bucket(current))
    return buckets
