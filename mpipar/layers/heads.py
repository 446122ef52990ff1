"""Attention head reshapes shared by the serial and the parallel attention (plain torch)."""
from __future__ import annotations

import torch


def split_heads(t: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[..., seq, heads*head_dim] -> [..., heads, seq, head_dim] (SDPA's layout)."""
    return t.unflatten(-1, (num_heads, t.shape[-1] // num_heads)).transpose(-3, -2)


def merge_heads(t: torch.Tensor) -> torch.Tensor:
    """[..., heads, seq, head_dim] -> [..., seq, heads*head_dim]."""
    return t.transpose(-3, -2).flatten(-2)


def repeat_kv(t: torch.Tensor, groups: int) -> torch.Tensor:
    """[..., kv_heads, seq, d] -> [..., kv_heads*groups, seq, d]: K/V head j serves q heads j*groups.."""
    return t if groups == 1 else t.repeat_interleave(groups, dim=-3)
