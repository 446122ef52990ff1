"""Autograd region operators: named conjugate pairs (Megatron's mappings).

Each operator's backward is its adjoint: <op(x), y> == <x, op^T(y)>.

  copy_to_region          forward identity        / backward all-reduce    (Megatron f)
  reduce_from_region      forward all-reduce      / backward identity      (Megatron g)
  scatter_to_region       forward split (own)     / backward all-gather
  gather_from_region      forward all-gather      / backward split (own)
  reduce_scatter_to_sequence  forward reduce-scatter / backward all-gather
  gather_from_sequence        forward all-gather     / backward reduce-scatter

Splits follow torch.tensor_split order (rank r keeps slice r); sizes need not divide.
The all-reduces of copy_to_region (backward) and reduce_from_region (forward) run on
a copy that is born in shared memory when that pays (mpipar.comm.symmetric.activations).
"""
from __future__ import annotations

import torch

from ..mesh import as_group
from .symmetric.activations import reduction_copy
from .buffers import flat_chunks
from .collectives import all_gather, all_reduce, reduce_scatter


def _split(x: torch.Tensor, g, dim: int) -> torch.Tensor:
    sizes = flat_chunks(x.shape[dim], g.size)
    start = sum(sizes[: g.rank])
    return x.narrow(dim, start, sizes[g.rank]).contiguous()


class _CopyToRegion(torch.autograd.Function):
    """forward identity / backward all-reduce."""

    @staticmethod
    def forward(ctx, x, g):
        ctx.g = g
        return x.view_as(x)

    @staticmethod
    def backward(ctx, dy):
        # shapes mirror the checked forward: no agreement needed
        return all_reduce(reduction_copy(dy, ctx.g), ctx.g, validate=False), None


class _ReduceFromRegion(torch.autograd.Function):
    """forward all-reduce / backward identity."""

    @staticmethod
    def forward(ctx, x, g):
        return all_reduce(reduction_copy(x, g), g)

    @staticmethod
    def backward(ctx, dy):
        return dy, None


class _ScatterToRegion(torch.autograd.Function):
    """forward split (keep own slice) / backward all-gather."""

    @staticmethod
    def forward(ctx, x, g, dim):
        ctx.g, ctx.dim = g, dim
        return _split(x, g, dim)

    @staticmethod
    def backward(ctx, dy):
        return all_gather(dy.contiguous(), ctx.g, dim=ctx.dim), None, None


class _GatherFromRegion(torch.autograd.Function):
    """forward all-gather / backward split (keep own slice)."""

    @staticmethod
    def forward(ctx, x, g, dim):
        ctx.g, ctx.dim = g, dim
        return all_gather(x.contiguous(), g, dim=dim)

    @staticmethod
    def backward(ctx, dy):
        return _split(dy, ctx.g, ctx.dim), None, None


class _ReduceScatterToSequence(torch.autograd.Function):
    """forward reduce-scatter / backward all-gather."""

    @staticmethod
    def forward(ctx, x, g, dim):
        ctx.g, ctx.dim = g, dim
        return reduce_scatter(x.contiguous(), g, dim=dim)

    @staticmethod
    def backward(ctx, dy):
        return all_gather(dy.contiguous(), ctx.g, dim=ctx.dim), None, None


class _GatherFromSequence(torch.autograd.Function):
    """forward all-gather / backward reduce-scatter."""

    @staticmethod
    def forward(ctx, x, g, dim):
        ctx.g, ctx.dim = g, dim
        return all_gather(x.contiguous(), g, dim=dim)

    @staticmethod
    def backward(ctx, dy):
        return reduce_scatter(dy.contiguous(), ctx.g, dim=ctx.dim, validate=False), None, None


def copy_to_region(x, group):
    """Enter a tensor-parallel region: forward identity, backward all-reduce."""
    return _CopyToRegion.apply(x, as_group(group))


def reduce_from_region(x, group):
    """Leave a tensor-parallel region: forward all-reduce, backward identity."""
    return _ReduceFromRegion.apply(x, as_group(group))


def scatter_to_region(x, group, dim=-1):
    """Forward: keep this rank's slice along dim. Backward: all-gather."""
    return _ScatterToRegion.apply(x, as_group(group), dim)


def gather_from_region(x, group, dim=-1):
    """Forward: all-gather along dim. Backward: keep this rank's slice."""
    return _GatherFromRegion.apply(x, as_group(group), dim)


def reduce_scatter_to_sequence(x, group, dim=-2):
    """Megatron-SP exit of a TP region: forward reduce-scatter along the sequence, backward all-gather."""
    return _ReduceScatterToSequence.apply(x, as_group(group), dim)


def gather_from_sequence(x, group, dim=-2):
    """Megatron-SP entry of a TP region: forward all-gather along the sequence, backward reduce-scatter."""
    return _GatherFromSequence.apply(x, as_group(group), dim)
