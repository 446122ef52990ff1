"""Serial (single-process) reference blocks: plain torch, no MPI.

These are the modules the tensor-parallel layers shard (`from_serial`) and
reproduce (`full_state_dict`). `seed=s` initialises them exactly like the
parallel layer built with `seed=s` (mpipar.layers.init.seeded_init_);
`seed=None` keeps torch's default (global-RNG) initialisation.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..layers.init import seeded_init_
from ..layers.heads import merge_heads, repeat_kv, split_heads  # noqa: F401  (re-exported)
from ..layers.rotary import RotaryCache, apply_rotary


def _seeded(module: nn.Module, seed: int | None) -> None:
    if seed is not None:
        seeded_init_(module, seed)


class MLP(nn.Module):
    """Transformer feed-forward block: fc1 (hidden -> ffn), GELU, fc2 (ffn -> hidden).

    activation "gelu" (exact) or "gelu_tanh" (the tanh approximation, GPT-2's).
    """

    def __init__(self, hidden: int, ffn_hidden: int, *, seed: int | None = None, dtype=None, device=None,
                 activation: str = "gelu"):
        super().__init__()
        if activation not in ("gelu", "gelu_tanh"):
            raise ValueError(f"activation must be 'gelu' or 'gelu_tanh', got {activation!r}")
        self.fc1 = nn.Linear(hidden, ffn_hidden, dtype=dtype, device=device)
        self.act = nn.GELU(approximate="tanh" if activation == "gelu_tanh" else "none")
        self.fc2 = nn.Linear(ffn_hidden, hidden, dtype=dtype, device=device)
        _seeded(self, seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


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


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight, computed in at least float32 (Llama's norm)."""

    def __init__(self, hidden: int, eps: float = 1e-5, *, dtype=None, device=None):
        super().__init__()
        self.eps = float(eps)
        self.weight = nn.Parameter(torch.ones(hidden, dtype=dtype, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.to(torch.promote_types(x.dtype, torch.float32))
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}"


class SwiGLU(nn.Module):
    """Llama's feed-forward block: down(silu(gate(x)) * up(x)), no biases."""

    def __init__(self, hidden: int, ffn_hidden: int, *, dtype=None, device=None):
        super().__init__()
        kw = dict(bias=False, dtype=dtype, device=device)
        self.gate = nn.Linear(hidden, ffn_hidden, **kw)
        self.up = nn.Linear(hidden, ffn_hidden, **kw)
        self.down = nn.Linear(ffn_hidden, hidden, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class GQAttention(nn.Module):
    """Causal grouped-query attention with rotary positions (Llama): q, k, v, proj, no biases.

    q: hidden -> num_heads*head_dim; k, v: hidden -> num_kv_heads*head_dim;
    query head h attends with K/V head h // (num_heads/num_kv_heads).
    """

    def __init__(self, hidden: int, num_heads: int, num_kv_heads: int, rope_theta: float = 10000.0, *,
                 dtype=None, device=None):
        super().__init__()
        if hidden % num_heads or num_heads % num_kv_heads:
            raise ValueError(f"hidden {hidden}, num_heads {num_heads}, num_kv_heads {num_kv_heads} do not divide")
        self.hidden, self.num_heads, self.num_kv_heads = hidden, num_heads, num_kv_heads
        self.head_dim = hidden // num_heads
        kw = dict(bias=False, dtype=dtype, device=device)
        self.q = nn.Linear(hidden, hidden, **kw)
        self.k = nn.Linear(hidden, num_kv_heads * self.head_dim, **kw)
        self.v = nn.Linear(hidden, num_kv_heads * self.head_dim, **kw)
        self.proj = nn.Linear(hidden, hidden, **kw)
        self.rotary = RotaryCache(self.head_dim, rope_theta)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[-2]
        q = split_heads(self.q(x), self.num_heads)
        k, v = split_heads(self.k(x), self.num_kv_heads), split_heads(self.v(x), self.num_kv_heads)
        cos, sin = self.rotary.get(n, lambda: torch.arange(n), q.dtype, q.device)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        groups = self.num_heads // self.num_kv_heads
        out = F.scaled_dot_product_attention(q, repeat_kv(k, groups), repeat_kv(v, groups), is_causal=True)
        return self.proj(merge_heads(out))
