"""Rotary position embedding (RoPE), half-split as in Hugging Face's `rotate_half`. Plain torch.

    cos, sin = rotary_tables(positions, head_dim, theta, dtype)   # [seq, head_dim] each
    q = apply_rotary(q, cos, sin)                                  # q [..., heads, seq, head_dim]

The tables are computed in float32 and then cast, exactly as transformers'
LlamaRotaryEmbedding does, so a model holds the same numbers as the
transformers one in every dtype. `positions` are GLOBAL token positions: a
rank holding part of the sequence (mpipar.sequence.layout.local_positions)
rotates its tokens as the serial model does.
"""
from __future__ import annotations

import torch


def inverse_frequencies(head_dim: int, theta: float) -> torch.Tensor:
    """theta^(-2i/head_dim), i < head_dim/2, in float32."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))


def rotary_tables(positions: torch.Tensor, head_dim: int, theta: float, dtype=None):
    """(cos, sin) [len(positions), head_dim] for the given integer positions."""
    freqs = positions.to(torch.float32)[:, None] * inverse_frequencies(head_dim, theta).to(positions.device)
    emb = torch.cat((freqs, freqs), dim=-1)
    dtype = dtype if dtype is not None else torch.get_default_dtype()
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[x1 | x2] -> [-x2 | x1] on the last dim."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x rotated: x * cos + rotate_half(x) * sin (cos, sin broadcast over the leading dims)."""
    return x * cos + rotate_half(x) * sin


class RotaryCache:
    """(cos, sin) per (positions key, dtype, device), built once (positions are fixed per layout)."""

    def __init__(self, head_dim: int, theta: float):
        self.head_dim, self.theta = head_dim, float(theta)
        self._tables: dict = {}

    def get(self, key, positions_fn, dtype, device):
        k = (key, dtype, str(device))
        if k not in self._tables:
            self._tables[k] = rotary_tables(positions_fn().to(device), self.head_dim, self.theta, dtype)
        return self._tables[k]
