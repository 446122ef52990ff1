"""Recycled output tensors for the collectives that return a new tensor.

torch has no caching allocator for CPU memory: every large `torch.empty` is a
fresh mmap whose pages fault, and are zeroed by the kernel, on first touch,
and freeing it hands them back to the OS. A collective that returns a fresh
output pays that on every call, which at a few MiB costs more than the copy
itself (results/TUNING.md).

`empty(shape, dtype, device)` hands out a tensor over a pooled buffer. A buffer
is free again once no tensor uses its memory: the storage's use count is back
to the pool's own reference. That covers views, numpy arrays and tensors that
autograd saved, as blocks of the CUDA caching allocator are covered.
- Only CPU outputs of at least MIN_BYTES are pooled. CUDA has its own caching
  allocator, and small CPU allocations come from malloc's heap without faults.
- At most MAX_PER_SIZE buffers are kept per size; past that, outputs are plain.
- Free buffers beyond MPIPAR_OUTPUT_POOL_BYTES (default 1 GiB) are released,
  least recently used first; larger outputs are plain. MPIPAR_OUTPUT_POOL_BYTES=0
  turns the pool off.
"""
from __future__ import annotations

import itertools
import math

import torch

from ..settings import current

MIN_BYTES = 256 * 1024
MAX_PER_SIZE = 64
DEFAULT_IDLE_BYTES = 1 << 30
_use_count = getattr(torch._C, "_storage_Use_Count", None)


def _uses(base: torch.Tensor) -> int:
    return _use_count(base.untyped_storage()._cdata)


class _Buffer:
    __slots__ = ("base", "idle_uses", "stamp")

    def __init__(self, nbytes: int):
        self.base = torch.empty(nbytes, dtype=torch.uint8)
        self.idle_uses = _uses(self.base)  # the count while only the pool holds it
        self.stamp = 0  # when it was last handed out (OutputPool.clock)

    def free(self) -> bool:
        return _uses(self.base) == self.idle_uses


class OutputPool:
    """Buffers by byte size; see the module docstring."""

    def __init__(self):
        self.buffers: dict[int, list[_Buffer]] = {}
        self.clock = itertools.count()
        self.hits = self.misses = 0

    def empty(self, shape, dtype: torch.dtype) -> torch.Tensor:
        nbytes = math.prod(shape) * dtype.itemsize
        limit = idle_limit()
        if not MIN_BYTES <= nbytes <= limit or _use_count is None:
            return torch.empty(shape, dtype=dtype)
        same = self.buffers.get(nbytes, ())
        buf = next((b for b in same if b.free()), None)
        if buf is None:
            if len(same) >= MAX_PER_SIZE:
                return torch.empty(shape, dtype=dtype)
            self.release(limit - nbytes)
            buf = _Buffer(nbytes)
            self.buffers.setdefault(nbytes, []).append(buf)
            self.misses += 1
        else:
            self.hits += 1
        buf.stamp = next(self.clock)
        return buf.base.view(dtype).view(shape)

    def idle(self) -> list[_Buffer]:
        return [b for same in self.buffers.values() for b in same if b.free()]

    def release(self, keep_bytes: int) -> None:
        """Drop free buffers, least recently used first, until at most keep_bytes stay free."""
        free = sorted(self.idle(), key=lambda b: b.stamp)
        held = sum(b.base.numel() for b in free)
        for b in free:
            if held <= max(keep_bytes, 0):
                break
            self.buffers[b.base.numel()].remove(b)
            held -= b.base.numel()
        for size in [s for s, same in self.buffers.items() if not same]:
            del self.buffers[size]

    def clear(self) -> None:
        self.release(0)


def idle_limit() -> int:
    value = current().output_pool_bytes
    return DEFAULT_IDLE_BYTES if value is None else value


POOL = OutputPool()


def empty(shape, dtype: torch.dtype, device=None) -> torch.Tensor:
    """An uninitialised output tensor: recycled (CPU, large) or fresh."""
    on_cpu = device is None or getattr(device, "type", None) == "cpu" or torch.device(device).type == "cpu"
    if not on_cpu or math.prod(shape) * dtype.itemsize < MIN_BYTES:  # (small: no settings to read)
        return torch.empty(shape, dtype=dtype, device=device)
    return POOL.empty(list(shape), dtype)
