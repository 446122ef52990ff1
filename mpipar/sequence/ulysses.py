"""Ulysses (DeepSpeed) sequence parallelism: all-to-all from sequence-split to head-split.

Each rank holds all heads for its part of the sequence. One all-to-all (q, k
and v stacked into one message) gives every rank H/N heads over the whole
sequence; it runs full SDPA on those heads; a second all-to-all brings the
output back to the sequence split. With the zigzag layout the gathered
sequence is put in natural order before attention and back after. The
all-to-all is differentiable: its backward is the inverse all-to-all.
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from ..comm import all_to_all
from ..mesh import as_group
from . import kernels
from .checks import agree_call, qkv_error, signature
from .layout import natural_from_storage, storage_from_natural


def _timed_all_to_all(x, g, scatter_dim, gather_dim, profile, phase):
    t0 = time.perf_counter()
    y = all_to_all(x.contiguous(), g, scatter_dim, gather_dim)
    if profile is not None:
        profile.append({"pass": phase, "op": "all_to_all", "comm_s": time.perf_counter() - t0})
    return y


class _AllToAll(torch.autograd.Function):
    """forward: all_to_all(scatter_dim, gather_dim) / backward: the inverse all-to-all."""

    @staticmethod
    def forward(ctx, x, g, scatter_dim, gather_dim, profile):
        ctx.g, ctx.dims, ctx.profile = g, (scatter_dim, gather_dim), profile
        return _timed_all_to_all(x, g, scatter_dim, gather_dim, profile, "forward")

    @staticmethod
    def backward(ctx, dy):
        scatter_dim, gather_dim = ctx.dims
        return _timed_all_to_all(dy, ctx.g, gather_dim, scatter_dim, ctx.profile, "backward"), None, None, None, None


def seq_to_heads(x: torch.Tensor, g, heads_dim: int, seq_dim: int, profile=None) -> torch.Tensor:
    """Sequence-split, all heads -> H/N heads, whole sequence (rank order of parts)."""
    return x if g.size == 1 else _AllToAll.apply(x, g, heads_dim, seq_dim, profile)


def heads_to_seq(x: torch.Tensor, g, heads_dim: int, seq_dim: int, profile=None) -> torch.Tensor:
    """Inverse of seq_to_heads."""
    return x if g.size == 1 else _AllToAll.apply(x, g, seq_dim, heads_dim, profile)


def ulysses_attention(q, k, v, group, causal: bool = True, layout: str = "zigzag", *,
                      scale: float | None = None, profile: list | None = None) -> torch.Tensor:
    """Exact attention over a sequence split across `group`, by all-to-all to a head split.

    q, k, v: [batch, heads, local_seq, head_dim], this rank's part of the
    sequence in `layout` (k, v may have fewer heads, dividing q's: grouped-query
    attention). heads % N != 0 raises MpiparError on every rank.
    Returns out like q; out and gradients equal SDPA on the full sequence.
    profile: a list that receives one dict per all-to-all (pass, op, comm_s).
    """
    g = as_group(group)
    err = qkv_error(q, k, v, layout, grouped=True)
    if err is None and q.shape[1] % g.size:
        err = f"heads {q.shape[1]} are not divisible by the group size {g.size}"
    agree_call(g, "ulysses_attention", err, signature(q, causal, layout, scale=scale,
                                                      kv_heads=getattr(k, "shape", (0, 0))[1]))
    scale = kernels.default_scale(q.shape[-1]) if scale is None else float(scale)
    groups = q.shape[1] // k.shape[1]
    if groups == 1 or k.shape[1] % g.size:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        qkv = seq_to_heads(torch.stack([q, k, v]), g, heads_dim=2, seq_dim=3, profile=profile)
        q, k, v = natural_from_storage(qkv, g.size, layout, dim=3).unbind(0)
    else:
        q = natural_from_storage(seq_to_heads(q, g, heads_dim=1, seq_dim=2, profile=profile), g.size, layout, dim=2)
        kv = seq_to_heads(torch.stack([k, v]), g, heads_dim=2, seq_dim=3, profile=profile)
        k, v = natural_from_storage(kv, g.size, layout, dim=3).repeat_interleave(groups, dim=2).unbind(0)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=bool(causal), scale=scale)
    out = storage_from_natural(out, g.size, layout, dim=2)
    return heads_to_seq(out, g, heads_dim=1, seq_dim=2, profile=profile)
