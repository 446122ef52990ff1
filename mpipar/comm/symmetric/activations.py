"""Symmetric activations: the tensors a tensor-parallel region all-reduces, born in shared memory.

`reduce_from_region`'s forward all-reduces a copy of its input and
`copy_to_region`'s backward a copy of the incoming gradient. With symmetric
activations that copy is made into a symmetric tensor (a pooled window of the
node, mpipar.comm.symmetric.pool; the window goes back to the pool when the
activation is dropped), so the all-reduce runs zero-copy through shared memory
(mpipar.comm.symmetric.collectives) instead of through MPI's internal buffers: the same one copy,
a faster reduction.

When: MPIPAR_SYMMETRIC_ACTIVATIONS=1|0 forces it on|off; unset (auto) it is on
for CPU tensors of at least AUTO_BYTES (and the shared-memory all-reduce
crossover) when the group lives on one node. AUTO_BYTES = 1 MiB because the
symmetric allocation is itself a small collective: it pays for large
activations and costs small ones (results/TUNING.md). Forced on, groups spanning
nodes all-reduce hierarchically. Every rank must see the same setting.
"""
from __future__ import annotations

import torch

from ...errors import require
from ...settings import current
from .. import tuning
from .pool import pool_of, symmetric_empty

ENV = "MPIPAR_SYMMETRIC_ACTIVATIONS"
AUTO_BYTES = 1 << 20


def mode() -> bool | None:
    """True / False when MPIPAR_SYMMETRIC_ACTIVATIONS forces it, None for auto."""
    value = current().symmetric_activations or ""
    if not value:
        return None
    require(value in ("0", "1"), f"{ENV} must be 0 or 1, got {value!r}")
    return value == "1"


def reduction_copy(x: torch.Tensor, g) -> torch.Tensor:
    """A copy of `x` to all-reduce in place over `g`: symmetric when that pays (collective
    then, like the all-reduce that follows), else `x.clone()`."""
    forced = mode()
    nbytes = x.numel() * x.element_size()
    wanted = (g.size > 1 and forced is not False and x.device.type == "cpu" and nbytes > 0
              and (forced or (nbytes >= AUTO_BYTES and tuning.shm_pays("all_reduce", nbytes))))
    if not wanted:
        return x.clone()
    pool = pool_of(g, create=True)  # collective the first time
    if not pool.one_node and not forced:
        return x.clone()
    y = symmetric_empty(x.shape, x.dtype, g)
    y.copy_(x)
    return y
