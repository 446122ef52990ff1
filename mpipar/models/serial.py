"""Serial (single-process) reference blocks: plain torch, no MPI.

These are the modules the tensor-parallel layers shard (`from_serial`) and
reproduce (`full_state_dict`). `seed=s` initialises them exactly like the
parallel layer built with `seed=s` (mpipar.tensor.init.seeded_init_);
`seed=None` keeps torch's default (global-RNG) initialisation.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _seeded(module: nn.Module, seed: int | None) -> None:
    if seed is not None:
        from ..tensor.init import seeded_init_  # pure torch; imported lazily

        seeded_init_(module, seed)


class MLP(nn.Module):
    """Transformer feed-forward block: fc1 (hidden -> ffn), exact GELU, fc2 (ffn -> hidden)."""

    def __init__(self, hidden: int, ffn_hidden: int, *, seed: int | None = None, dtype=None, device=None):
        super().__init__()
        self.fc1 = nn.Linear(hidden, ffn_hidden, dtype=dtype, device=device)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(ffn_hidden, hidden, dtype=dtype, device=device)
        _seeded(self, seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def split_heads(t: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[..., seq, heads*head_dim] -> [..., heads, seq, head_dim] (SDPA's layout)."""
    return t.unflatten(-1, (num_heads, t.shape[-1] // num_heads)).transpose(-3, -2)


def merge_heads(t: torch.Tensor) -> torch.Tensor:
    """[..., heads, seq, head_dim] -> [..., seq, heads*head_dim]."""
    return t.transpose(-3, -2).flatten(-2)


class SelfAttention(nn.Module):
    """Multi-head self-attention: qkv (hidden -> 3*hidden, output [q | k | v]), SDPA, proj.

    Input and output are [..., seq, hidden] (typically [batch, seq, hidden]).
    """

    def __init__(self, hidden: int, num_heads: int, causal: bool = True, *, seed: int | None = None,
                 dtype=None, device=None):
        super().__init__()
        if hidden % num_heads:
            raise ValueError(f"hidden {hidden} is not divisible by num_heads {num_heads}")
        self.hidden, self.num_heads, self.causal = hidden, num_heads, causal
        self.head_dim = hidden // num_heads
        self.qkv = nn.Linear(hidden, 3 * hidden, dtype=dtype, device=device)
        self.proj = nn.Linear(hidden, hidden, dtype=dtype, device=device)
        _seeded(self, seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (split_heads(t, self.num_heads) for t in self.qkv(x).chunk(3, dim=-1))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return self.proj(merge_heads(out))
