"""How a sequence is cut across the ranks of a sequence-parallel group.

"contiguous": the sequence is cut into N chunks; rank r holds chunk r.
"zigzag":     the sequence is cut into 2N chunks; rank r holds chunks r and
              2N-1-r (in that order), so under a causal mask every rank does the
              same amount of attention work.

The pure helpers (`num_chunks`, `rank_chunks`, `storage_order`,
`local_positions`) need no MPI; `shard_sequence` slices locally and
`gather_sequence` all-gathers (differentiable: its backward keeps this rank's
part of the gradient, like `comm.gather_from_region`).
"""
from __future__ import annotations

import torch

from ..agree import agree_call
from ..errors import require
from ..mesh import as_group

LAYOUTS = ("contiguous", "zigzag")


def check_layout(layout: str) -> None:
    """MpiparError unless `layout` is one of LAYOUTS."""
    require(layout in LAYOUTS, f"sequence layout must be one of {LAYOUTS}, got {layout!r}")


def num_chunks(size: int, layout: str) -> int:
    """Number of equal chunks the full sequence is cut into: N or 2N."""
    check_layout(layout)
    return size if layout == "contiguous" else 2 * size


def rank_chunks(rank: int, size: int, layout: str) -> list[int]:
    """Global chunk indices held by `rank`, in local (storage) order."""
    check_layout(layout)
    return [rank] if layout == "contiguous" else [rank, 2 * size - 1 - rank]


def storage_order(size: int, layout: str) -> list[int]:
    """Global chunk indices in the order of the ranks' parts concatenated (rank 0 first)."""
    return [c for r in range(size) for c in rank_chunks(r, size, layout)]


def local_positions(seq_len: int, rank: int, size: int, layout: str) -> torch.Tensor:
    """Global token positions (LongTensor) of this rank's part, in local order."""
    n = num_chunks(size, layout)
    require(seq_len % n == 0, f"sequence length {seq_len} is not divisible by {n} chunks "
                              f"({layout} layout over {size} ranks)")
    c = seq_len // n
    return torch.cat([torch.arange(i * c, (i + 1) * c) for i in rank_chunks(rank, size, layout)])


def _reorder(x: torch.Tensor, dim: int, order: list[int]) -> torch.Tensor:
    """Concatenate the len(order) equal chunks of x along dim, chunk order[i] i-th."""
    parts = x.chunk(len(order), dim=dim)
    return torch.cat([parts[i] for i in order], dim=dim)


def natural_from_storage(x: torch.Tensor, size: int, layout: str, dim: int = 2) -> torch.Tensor:
    """Reorder a rank-order concatenation of all parts into the natural sequence order."""
    order = storage_order(size, layout)
    inverse = [order.index(i) for i in range(len(order))]
    return _reorder(x, dim, inverse) if order != sorted(order) else x


def storage_from_natural(x: torch.Tensor, size: int, layout: str, dim: int = 2) -> torch.Tensor:
    """Inverse of `natural_from_storage`."""
    order = storage_order(size, layout)
    return _reorder(x, dim, order) if order != sorted(order) else x


def _shard(x: torch.Tensor, rank: int, size: int, dim: int, layout: str) -> torch.Tensor:
    n = num_chunks(size, layout)
    require(-x.dim() <= dim < x.dim(), f"shard_sequence: dim {dim} out of range for a {x.dim()}-d tensor")
    require(x.shape[dim] % n == 0, f"shard_sequence: length {x.shape[dim]} of dim {dim} is not divisible "
                                   f"by {n} chunks ({layout} layout over {size} ranks)")
    parts = x.chunk(n, dim=dim)
    return torch.cat([parts[i] for i in rank_chunks(rank, size, layout)], dim=dim)


def shard_sequence(x: torch.Tensor, group, dim: int = 2, layout: str = "zigzag") -> torch.Tensor:
    """This rank's part of the full tensor `x` along `dim` (no communication).

    Differentiable as a local slice. Raises MpiparError if the length of `dim`
    is not divisible by the number of chunks (N or 2N).
    """
    g = as_group(group)
    check_layout(layout)
    return _shard(x, g.rank, g.size, dim, layout)


class _GatherSequence(torch.autograd.Function):
    """forward: all-gather + reorder to natural order / backward: keep own part."""

    @staticmethod
    def forward(ctx, x, g, dim, layout):
        from ..comm import all_gather

        ctx.g, ctx.dim, ctx.layout = g, dim, layout
        full = all_gather(x.contiguous(), g, dim=dim)
        return natural_from_storage(full, g.size, layout, dim).contiguous()

    @staticmethod
    def backward(ctx, dy):
        g = ctx.g
        return _shard(dy, g.rank, g.size, ctx.dim, ctx.layout).contiguous(), None, None, None


def gather_sequence(x: torch.Tensor, group, dim: int = 2, layout: str = "zigzag") -> torch.Tensor:
    """The full tensor along `dim` from every rank's part (inverse of shard_sequence).

    Collective over `group`; mismatched shapes or dtypes raise MpiparError on
    every rank. The backward keeps this rank's part of the gradient.
    """
    g = as_group(group)
    err = None
    if layout not in LAYOUTS:
        err = f"layout must be one of {LAYOUTS}, got {layout!r}"
    elif not -x.dim() <= dim < x.dim():
        err = f"dim {dim} out of range for a {x.dim()}-d tensor"
    elif layout == "zigzag" and x.shape[dim] % 2:
        err = f"zigzag part length {x.shape[dim]} is odd (each rank holds 2 equal chunks)"
    agree_call(g, "gather_sequence", err, {"layout": str(layout), "dim": dim % max(x.dim(), 1)})
    return _GatherSequence.apply(x, g, dim % x.dim(), layout)
