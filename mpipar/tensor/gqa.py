"""ParallelGQAttention: Llama's attention (grouped-query, rotary) under tensor parallelism.

q is column-parallel by heads. K/V heads follow Megatron's rule: when the
tensor-parallel size N divides num_kv_heads, k and v are sharded by heads like
q; when num_kv_heads divides N, each rank keeps the one K/V head its query
heads use (N/num_kv_heads ranks hold each K/V head; their weight gradients
are summed in the backward: ColumnParallelLinear's `replicas`); anything else
is an MpiparError on every rank. The input enters the region once for q, k
and v; proj is row-parallel (one all-reduce, or a reduce-scatter under
Megatron sequence parallelism).

Rotary positions: each rank rotates its tokens with their GLOBAL positions.
Under sequence parallelism (`sp_group`, ring or Ulysses) those are the
positions of this rank's part in `sp_layout` (mpipar.sequence.layout), so q and
k are rotated before any K/V leaves the rank and the attention itself is
position-free.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import comm
from ..errors import require
from ..layers.heads import merge_heads, repeat_kv, split_heads
from ..layers.rotary import RotaryCache, apply_rotary
from ..sequence.layout import local_positions
from . import checks
from .attention import ParallelSelfAttention
from .linear import ColumnParallelLinear, RowParallelLinear


def kv_split(num_kv_heads: int, tp: int) -> tuple[int, int] | str:
    """(local K/V heads, replicas) of Megatron's rule, or why num_kv_heads cannot run on tp ranks."""
    if num_kv_heads % tp == 0:
        return num_kv_heads // tp, 1
    if tp % num_kv_heads == 0:
        return 1, tp // num_kv_heads
    return (f"num_kv_heads = {num_kv_heads} and tp = {tp}: one must divide the other "
            f"(K/V heads sharded, or replicated over tp / num_kv_heads ranks)")


class ParallelGQAttention(nn.Module):
    """Tensor-parallel models.GQAttention. Input/output [..., seq, hidden] ([b, seq, hidden] with sp).

    `full_params=(w_q, w_k, w_v, w_proj)`: the serial weights (no biases).
    """

    _what = "ParallelGQAttention"
    check_inputs = True
    _check_sp = ParallelSelfAttention._check_sp

    def __init__(self, hidden, num_heads, num_kv_heads, group, full_params, rope_theta=10000.0, sp_group=None,
                 sp_mode=None, *, sequence_parallel=False, sp_layout="zigzag", dtype=None, device=None):
        super().__init__()
        self.group = g = checks.group_of(group, self._what)
        sp_size = checks.group_of(sp_group, self._what).size if sp_group is not None else 1
        config = [hidden, num_heads, num_kv_heads, float(rope_theta), sp_mode, sp_size, sequence_parallel, sp_layout]
        checks.agree_config(g, self._what, config)
        checks.positive(hidden, self._what, "hidden")
        checks.positive(num_kv_heads, self._what, "num_kv_heads")
        self.local_heads = checks.divisible(num_heads, g, self._what, "num_heads")
        require(hidden % num_heads == 0 and num_heads % num_kv_heads == 0,
                f"{self._what}: hidden {hidden}, num_heads {num_heads}, num_kv_heads {num_kv_heads} do not divide")
        split = kv_split(num_kv_heads, g.size)
        require(not isinstance(split, str), f"{self._what}: {split}")
        self.local_kv_heads, replicas = split
        self.sp_group = self._check_sp(sp_group, sp_mode, sp_layout)
        if self.sp_group is not None:
            checks.agree_config(self.sp_group, self._what, config + [g.size])
        self.hidden, self.num_heads, self.num_kv_heads = hidden, num_heads, num_kv_heads
        self.head_dim = hidden // num_heads
        self.sp_mode, self.sp_layout, self.sequence_parallel = sp_mode, sp_layout, sequence_parallel
        w_q, w_k, w_v, w_proj = full_params
        kw = dict(bias=False, dtype=dtype, device=device)
        kv = num_kv_heads * self.head_dim
        self.q = ColumnParallelLinear(hidden, hidden, g, full_params=(w_q, None), input_in_region=True, **kw)
        self.k = ColumnParallelLinear(hidden, kv, g, full_params=(w_k, None), input_in_region=True,
                                      replicas=replicas, **kw)
        self.v = ColumnParallelLinear(hidden, kv, g, full_params=(w_v, None), input_in_region=True,
                                      replicas=replicas, **kw)
        self.proj = RowParallelLinear(hidden, hidden, g, full_params=(w_proj, None),
                                      sequence_parallel=sequence_parallel, **kw)
        for m in (self.q, self.k, self.v, self.proj):
            m.check_inputs = False  # checked here once
        self.rotary = RotaryCache(self.head_dim, rope_theta)

    @classmethod
    def from_serial(cls, attn: nn.Module, group, **kwargs) -> "ParallelGQAttention":
        """Shard a serial models.GQAttention (q, k, v, proj; num_heads, num_kv_heads, rotary theta)."""
        kwargs.setdefault("dtype", attn.q.weight.dtype)
        kwargs.setdefault("device", attn.q.weight.device)
        kwargs.setdefault("rope_theta", attn.rotary.theta)
        params = tuple(lin.weight.detach() for lin in (attn.q, attn.k, attn.v, attn.proj))
        return cls(attn.hidden, attn.num_heads, attn.num_kv_heads, group, params, **kwargs)

    def _positions(self, n: int) -> torch.Tensor:
        """Global positions of the n tokens this rank attends with (its sp part, in layout order)."""
        sg = self.sp_group
        if sg is None or sg.size == 1:
            return torch.arange(n)
        return local_positions(n * sg.size, sg.rank, sg.size, self.sp_layout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        checks.attention_input(self, x)
        x = comm.gather_from_sequence(x, self.group, dim=-2) if self.sequence_parallel \
            else comm.copy_to_region(x, self.group)
        q = split_heads(self.q(x), self.local_heads)
        k, v = split_heads(self.k(x), self.local_kv_heads), split_heads(self.v(x), self.local_kv_heads)
        n = q.shape[-2]
        cos, sin = self.rotary.get(n, lambda: self._positions(n), q.dtype, q.device)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        return self.proj(merge_heads(self._attend(q, k, v)))

    def _attend(self, q, k, v):
        """Attention of this rank's query heads with their K/V heads: [..., heads, seq, head_dim]."""
        groups = self.local_heads // self.local_kv_heads
        if self.sp_mode is None:
            return F.scaled_dot_product_attention(q, repeat_kv(k, groups), repeat_kv(v, groups), is_causal=True)
        from .. import sequence

        fn = sequence.ring_attention if self.sp_mode == "ring" else sequence.ulysses_attention
        return fn(q, k, v, self.sp_group, causal=True, layout=self.sp_layout)

    def full_state_dict(self) -> dict:
        """models.GQAttention's state_dict on every rank (collective over the group)."""
        return {f"{n}.weight": getattr(self, n).full_state_dict()["weight"] for n in ("q", "k", "v", "proj")}

    def extra_repr(self) -> str:
        return (f"hidden={self.hidden}, num_heads={self.num_heads} (local {self.local_heads}), "
                f"num_kv_heads={self.num_kv_heads} (local {self.local_kv_heads}), tp={self.group.size}, "
                f"sp_mode={self.sp_mode}, sequence_parallel={self.sequence_parallel}")
