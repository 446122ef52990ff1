"""ParallelSelfAttention: heads split over the tensor-parallel group (Megatron).

qkv is a ColumnParallelLinear sharded by heads: the serial weight is
[q | k | v] (each [hidden, hidden]) and rank r keeps the rows of q, k and v of
heads r*H/N .. (r+1)*H/N, in the same [q | k | v] local layout (stride=3).
Each rank attends with its heads (torch SDPA), and proj is a RowParallelLinear
over the concatenated heads: one all-reduce in the forward.

Sequence (context) parallelism over a second group: with `sp_group` and
sp_mode "ring" or "ulysses", the input is this rank's part of the sequence
(layout `sp_layout`, default "zigzag") and the attention itself runs through
mpipar.sequence.ring_attention / ulysses_attention on
[batch, local_heads, local_seq, head_dim]. Megatron sequence parallelism
inside the TP group (`sequence_parallel=True`) composes with either.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import require
from ..layers.heads import merge_heads, split_heads
from . import checks
from ..layers.init import generator, linear_params
from .linear import ColumnParallelLinear, RowParallelLinear

SP_MODES = (None, "ring", "ulysses")


class ParallelSelfAttention(nn.Module):
    """Tensor-parallel models.SelfAttention. Input/output [..., seq, hidden].

    `full_params=((w_qkv, b_qkv), (w_proj, b_proj))` shards given full
    parameters instead of drawing them from `seed` (qkv first, then proj).
    """

    _what = "ParallelSelfAttention"
    check_inputs = True

    def __init__(self, hidden, num_heads, group, causal=True, seed=0, sp_group=None, sp_mode=None, *,
                 sequence_parallel=False, sp_layout="zigzag", dtype=None, device=None, full_params=None):
        super().__init__()
        self.group = g = checks.group_of(group, self._what)
        sp_size = checks.group_of(sp_group, self._what).size if sp_group is not None else 1
        config = [hidden, num_heads, causal, seed, sp_mode, sp_size, sequence_parallel, sp_layout]
        checks.agree_config(g, self._what, config)
        checks.positive(hidden, self._what, "hidden")
        self.local_heads = checks.divisible(num_heads, g, self._what, "num_heads")
        require(hidden % num_heads == 0, f"{self._what}: hidden {hidden} is not divisible by num_heads {num_heads}")
        require(isinstance(causal, bool), f"{self._what}: causal must be a bool, got {causal!r}")
        self.sp_group = self._check_sp(sp_group, sp_mode, sp_layout)
        self.hidden, self.num_heads, self.causal = hidden, num_heads, causal
        self.head_dim = hidden // num_heads
        self.sp_mode, self.sp_layout, self.sequence_parallel = sp_mode, sp_layout, sequence_parallel
        if self.sp_group is not None:
            checks.agree_config(self.sp_group, self._what, config + [g.size])
        if full_params is None:
            gen = generator(seed)
            full_params = (linear_params(gen, hidden, 3 * hidden), linear_params(gen, hidden, hidden))
        kw = dict(sequence_parallel=sequence_parallel, seed=seed, dtype=dtype, device=device)
        self.qkv = ColumnParallelLinear(hidden, 3 * hidden, g, stride=3, full_params=full_params[0], **kw)
        self.proj = RowParallelLinear(hidden, hidden, g, full_params=full_params[1], **kw)
        self.qkv.check_inputs = self.proj.check_inputs = False  # checked here once; local checks only

    def _check_sp(self, sp_group, sp_mode, sp_layout):
        """Validate the sequence-parallel arguments (the same on every rank)."""
        require(sp_mode in SP_MODES, f"{self._what}: sp_mode must be one of {list(SP_MODES)}, got {sp_mode!r}")
        require(sp_layout in ("zigzag", "contiguous"),
                f"{self._what}: sp_layout must be 'zigzag' or 'contiguous', got {sp_layout!r}")
        if sp_group is None:
            require(sp_mode is None, f"{self._what}: sp_mode={sp_mode!r} needs an sp_group")
            return None
        sg = checks.group_of(sp_group, self._what)
        require(sp_mode is not None or sg.size == 1,
                f"{self._what}: an sp_group of size {sg.size} needs sp_mode 'ring' or 'ulysses'")
        if sg.size > 1 and self.group.size > 1:
            from mpi4py import MPI

            same = MPI.Comm.Compare(sg.comm, self.group.comm) in (MPI.IDENT, MPI.CONGRUENT)
            require(not same, f"{self._what}: sp_group and group are the same ranks; they must be different "
                              "dimensions of a Mesh (e.g. mesh.tp and mesh.sp)")
        if sp_mode == "ulysses":
            require(self.local_heads % sg.size == 0,
                    f"{self._what}: ulysses needs the local heads ({self.local_heads}) divisible by the "
                    f"sp size {sg.size}")
        return sg

    @classmethod
    def from_serial(cls, attn: nn.Module, group, **kwargs) -> "ParallelSelfAttention":
        """Shard a serial models.SelfAttention (qkv, proj, num_heads, causal)."""
        kwargs.pop("seed", None)
        kwargs.setdefault("causal", attn.causal)
        kwargs.setdefault("dtype", attn.qkv.weight.dtype)
        kwargs.setdefault("device", attn.qkv.weight.device)
        params = tuple((lin.weight.detach(), lin.bias.detach()) for lin in (attn.qkv, attn.proj))
        return cls(attn.qkv.in_features, attn.num_heads, group, full_params=params, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        checks.attention_input(self, x)
        qkv = self.qkv(x)  # as modules: their forward hooks fire (mpipar.pipeline.weight_grad)
        q, k, v = (split_heads(t, self.local_heads) for t in qkv.chunk(3, dim=-1))
        return self.proj(merge_heads(self._attend(q, k, v)))

    def _attend(self, q, k, v):
        """Attention of this rank's heads: [..., local_heads, seq, head_dim]."""
        if self.sp_mode is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        from .. import sequence

        fn = sequence.ring_attention if self.sp_mode == "ring" else sequence.ulysses_attention
        return fn(q, k, v, self.sp_group, causal=self.causal, layout=self.sp_layout)

    def full_state_dict(self) -> dict:
        """models.SelfAttention's state_dict (qkv.*, proj.*) on every rank (collective over group)."""
        out = {}
        for name in ("qkv", "proj"):
            out.update({f"{name}.{k}": v for k, v in getattr(self, name).full_state_dict().items()})
        return out

    def extra_repr(self) -> str:
        return (f"hidden={self.hidden}, num_heads={self.num_heads} (local {self.local_heads}), "
                f"causal={self.causal}, tp={self.group.size}, sp_mode={self.sp_mode}, "
                f"sequence_parallel={self.sequence_parallel}")
