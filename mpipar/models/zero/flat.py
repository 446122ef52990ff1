"""One flat bucket of parameters, cut into equal contiguous shards over the data-parallel group.

    b = FlatBucket(params, index, size=d, rank=r, keep_full=True)

The parameters are laid end to end in `b.full` (padded with zeros to a
multiple of d elements) and each parameter's `.data` becomes a view into it,
so an all-gather of the shards writes the parameters in place. Rank r owns
elements [r * n/d, (r + 1) * n/d) of every bucket: `b.shard` (its parameter
values, a view into `full` when `keep_full`, else a tensor of its own: ZeRO-3,
where `full` is materialised only while a block runs) and `b.master`, the
Parameter the optimizer steps (the shard itself for float32/float64
parameters, a float32 copy for bf16/fp16: master weights). `fragments` says
which part of which parameter each span of the shard holds, for the norm,
tensor-parallel reductions and checkpoints.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ...comm.buffers import reduce_dtype
from ...errors import require


@dataclasses.dataclass
class Fragment:
    """Shard elements [shard_lo, shard_hi) hold param `index`'s flat elements [lo, hi)."""

    index: int
    lo: int
    hi: int
    shard_lo: int

    @property
    def shard_hi(self) -> int:
        return self.shard_lo + self.hi - self.lo


class FlatBucket:
    def __init__(self, params: list, index: int, size: int, rank: int, keep_full: bool = True,
                 full=None, shard=None):
        """full / shard: where `full` (padded elements) / the shard of keep_full=False live
        (views into ZeRO's shared-memory buffers, mpipar.models.zero.shared); new tensors when None."""
        require(len({p.dtype for p in params}) == 1 and len({p.device for p in params}) == 1,
                "ZeRO: the parameters of one bucket must share a dtype and device")
        self.params, self.index = params, index
        self.dtype, self.device = params[0].dtype, params[0].device
        self.offsets, pos = [], 0
        for p in params:
            self.offsets.append(pos)
            pos += p.numel()
        self.numel = pos
        self.shard_numel = -(-pos // size)
        self.padded = self.shard_numel * size
        self.lo, self.hi = rank * self.shard_numel, (rank + 1) * self.shard_numel
        self.fragments = []
        for i, (p, off) in enumerate(zip(params, self.offsets)):
            lo, hi = max(off, self.lo), min(off + p.numel(), self.hi)
            if lo < hi:
                self.fragments.append(Fragment(i, lo - off, hi - off, lo - self.lo))
        self.full = torch.zeros(self.padded, dtype=self.dtype, device=self.device) if full is None else full.zero_()
        with torch.no_grad():
            for p, off in zip(params, self.offsets):
                self.full[off:off + p.numel()].copy_(p.detach().reshape(-1))
                p.data = self.full[off:off + p.numel()].view(p.shape)
        if keep_full:
            self.shard = self.full[self.lo:self.hi]
        else:
            self.shard = self.full[self.lo:self.hi].clone() if shard is None else shard.copy_(self.full[self.lo:self.hi])
        self.reduce_dtype = reduce_dtype(self.dtype)
        if self.reduce_dtype == self.dtype:
            self.master = nn.Parameter(self.shard, requires_grad=True)   # shares the shard's storage
        else:
            self.master = nn.Parameter(self.shard.to(self.reduce_dtype), requires_grad=True)
        self.gathered = True     # `full` holds the parameters (ZeRO-3 frees it between uses)

    @property
    def separate_master(self) -> bool:
        return self.master.dtype != self.dtype

    def param_views(self, flat: torch.Tensor):
        """(param, its slice of a flat tensor laid out like `full`) for every parameter."""
        for p, off in zip(self.params, self.offsets):
            yield p, flat[off:off + p.numel()]

    def release_full(self) -> None:
        """Free the full parameter storage (the parameters keep their shapes, no data)."""
        self.full.untyped_storage().resize_(0)
        self.gathered = False

    def allocate_full(self) -> None:
        self.full.untyped_storage().resize_(self.padded * self.full.element_size())
