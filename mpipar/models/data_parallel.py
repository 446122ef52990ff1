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

Symmetric buckets (`symmetric=`, see mpipar.models.symmetric_buckets; auto:
on for buckets of at least the shared-memory crossover when the group lives
on one node): their flat buffers live in one shared-memory tensor allocated
once; the hook packs the gradients into it (while they are hot in cache),
and `finish` all-reduces it zero-copy in shared memory, one call per dtype,
in the same order on every rank. That reduction is the
rank's own CPU work (no engine runs it in the background, as MPI's progress
does not either), so nothing is lost by not doing it in the hook, and no
blocking collective runs inside the backward, where it could wait on a peer
that waits on this rank's pipeline messages (MPI only progresses them while
this rank calls MPI). Results equal the plain path (bit for bit at 2 ranks;
at more ranks the summation order may differ in the last bit).
"""
from __future__ import annotations

import torch

from ..comm.buffers import mpi_buffer, needs_staging, reduce_dtype
from ..comm.wait import wait_all
from ..flight.recorder import begin, done
from ..errors import MpiparError
from ..mesh import as_group
from .symmetric_buckets import SymmetricArena, choose

DEFAULT_BUCKET_BYTES = 1 << 20


class _Bucket:
    def __init__(self, params, index: int):
        self.params, self.index = params, index
        self.numel = sum(p.numel() for p in params)
        dtype = params[0].dtype
        for p in params[1:]:
            dtype = torch.promote_types(dtype, p.dtype)
        self.dtype = reduce_dtype(dtype)   # the flat buffer's dtype (as torch.cat makes it)
        self.symmetric = False  # flat buffer in the group's shared-memory arena
        self.ready = 0          # parameters whose gradient is complete
        self.request = None     # pending MPI request
        self.buffer = None      # flat gradients being reduced


class GradBuckets:
    """Bucketed, overlapped gradient all-reduce (mean) over a data-parallel group.

    Collective construction. symmetric: True / False forces shared-memory
    (symmetric) flat buffers for every bucket / for none; None (auto) honours
    MPIPAR_SYMMETRIC_BUCKETS=0|1, else picks them for buckets of at least the
    shared-memory all-reduce crossover when the group lives on one node.
    """

    def __init__(self, params, group, bucket_bytes: int = DEFAULT_BUCKET_BYTES, average: bool = True,
                 symmetric: bool | None = None):
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
        self.arena = None       # SymmetricArena of the symmetric buckets, if any
        if self.group.size > 1:
            specs = [(b.numel, b.dtype) for b in self.buckets]
            chosen = choose(self.group, specs, symmetric)  # collective
            if any(chosen):
                self.arena = SymmetricArena(self.group, specs, chosen)  # collective
            for b, sym in zip(self.buckets, chosen):
                b.symmetric = sym
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
        self._next += 1
        if bucket.symmetric:  # pack into the shared-memory arena; reduced in `finish`
            bucket.buffer = self.arena.view(bucket.index, bucket.numel, bucket.dtype)
            offset = 0
            for g in grads:
                bucket.buffer[offset:offset + g.numel()].copy_(g)
                offset += g.numel()
            return
        flat = torch.cat(grads)
        flat = flat.to(reduce_dtype(flat.dtype))
        if needs_staging(flat):
            flat = flat.cpu()
        bucket.buffer = flat.contiguous()
        bucket.request = self.group.comm.Iallreduce(MPI.IN_PLACE, mpi_buffer(bucket.buffer), op=MPI.SUM)

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
        if self.arena is not None:
            self.arena.reduce()  # collective, same runs in the same order on every rank
        slot = begin(self.group, "gradient buckets")  # the watchdog's view of this wait (mpipar.flight)
        try:
            wait_all([b.request for b in self.buckets if b.request is not None])
        finally:
            done(slot)
        scale = 1.0 / self.group.size if self.average else 1.0
        with torch.no_grad():
            for b in self.buckets:
                _write_back(b, scale)
                b.buffer, b.request = None, None
        if self._overrun:
            raise MpiparError(f"GradBuckets: {self._overrun} (gradients were reduced too early)")

    def close(self) -> None:
        """Remove the hooks and release the shared-memory arena (local; its window goes back
        to the group's pool once every rank has closed)."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
        for b in self.buckets:
            b.buffer, b.symmetric = None, False
        if self.arena is not None:
            self.arena.release()
            self.arena = None


def _write_back(bucket: _Bucket, scale: float) -> None:
    """Each parameter's .grad = its part of the reduced flat buffer, times `scale`."""
    offset = 0
    for p in bucket.params:
        n = p.numel()
        part = bucket.buffer[offset:offset + n].view(p.shape)
        offset += n
        if scale == 1.0:
            p.grad.copy_(part)
        elif part.dtype == p.grad.dtype and part.device == p.grad.device:
            torch.mul(part, scale, out=p.grad)  # same numbers as below, without a temporary
        else:
            p.grad.copy_(part.to(device=p.grad.device, dtype=p.grad.dtype) * scale)


def _pack(params, bucket_bytes: int) -> list[_Bucket]:
    """Consecutive parameters in buckets of about bucket_bytes (at least one parameter each)."""
    buckets, current, size = [], [], 0
    for p in params:
        current.append(p)
        size += p.numel() * p.element_size()
        if size >= bucket_bytes:
            buckets.append(_Bucket(current, len(buckets)))
            current, size = [], 0
    if current:
        buckets.append(_Bucket(current, len(buckets)))
    return buckets
