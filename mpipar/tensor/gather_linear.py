"""The column-parallel linear of Megatron sequence parallelism, fused with its all-gather.

Forward: all-gather the sequence shards of X (dim -2) and multiply. Unlike
`gather_from_sequence(x)` followed by F.linear, autograd keeps only this rank's
shard of X for the backward (1/N of the activation) and all-gathers it again
there (Korthikanti et al. 2022, Megatron's LinearWithGradAccumulationAndAsync-
Communication): the memory saving is what sequence parallelism is for.
Backward: dX = reduce-scatter(dY W) along the sequence, dW = dY^T X_full, db = sum dY.
"""
from __future__ import annotations

import torch

from .. import comm


class _GatherLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_local, weight, bias, g):
        ctx.g, ctx.has_bias = g, bias is not None
        ctx.save_for_backward(x_local, weight)
        total = comm.all_gather(x_local.contiguous(), g, dim=-2)
        return torch.nn.functional.linear(total, weight, bias)

    @staticmethod
    def backward(ctx, dy):
        x_local, weight = ctx.saved_tensors
        g = ctx.g
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = comm.reduce_scatter(dy.matmul(weight).contiguous(), g, dim=-2)
        if ctx.needs_input_grad[1]:
            total = comm.all_gather(x_local.contiguous(), g, dim=-2)
            dw = dy.reshape(-1, dy.shape[-1]).t().matmul(total.reshape(-1, total.shape[-1]))
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dy.reshape(-1, dy.shape[-1]).sum(dim=0)
        return dx, dw, db, None


def gather_linear(x_local: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, group) -> torch.Tensor:
    """F.linear(all_gather(x_local, dim=-2), weight, bias), saving only x_local for the backward."""
    return _GatherLinear.apply(x_local, weight, bias, group)
