"""The transformer block of a parallel GPT, and how the parallel pieces split their work.

`ParallelBlock` shards a serial Block, so its numbers are exactly the
serial block's. Activations are [batch, local_seq, hidden]: local_seq is this
rank's part of the sequence over the sp group (zigzag by default) and, under
Megatron sequence parallelism, further this rank's contiguous block of that
over the tp group.
"""
from __future__ import annotations

import copy
import dataclasses

import torch
from torch import nn

from ..tensor import ParallelMLP, ParallelSelfAttention
from ..tensor.gqa import ParallelGQAttention
from ..tensor.swiglu import ParallelSwiGLU


@dataclasses.dataclass
class Parallelism:
    """How the pieces split their work: groups and modes."""

    tp: object
    sp: object
    sp_mode: str | None
    sp_layout: str
    sequence_parallel: bool


def quiet(module: nn.Module) -> nn.Module:
    """Turn off per-call collective input checks (the model checks its input once per step)."""
    for m in module.modules():
        if hasattr(m, "check_inputs"):
            m.check_inputs = False
    return module


class ParallelBlock(nn.Module):
    """A serial Block sharded: TP attention (ring/Ulysses over sp) and TP MLP, replicated norms.

    gpt2 blocks become ParallelSelfAttention + ParallelMLP, llama blocks (those
    with q/k/v and gate/up/down) ParallelGQAttention + ParallelSwiGLU.
    """

    def __init__(self, block: nn.Module, par: Parallelism):
        super().__init__()
        sp = par.sp if par.sp is not None and par.sp.size > 1 else None
        llama = hasattr(block.attn, "num_kv_heads")
        self.ln1 = copy.deepcopy(block.ln1)
        attn_cls = ParallelGQAttention if llama else ParallelSelfAttention
        self.attn = quiet(attn_cls.from_serial(
            block.attn, par.tp, sp_group=sp, sp_mode=par.sp_mode if sp else None,
            sequence_parallel=par.sequence_parallel, sp_layout=par.sp_layout))
        self.ln2 = copy.deepcopy(block.ln2)
        mlp_cls = ParallelSwiGLU if llama else ParallelMLP
        self.mlp = quiet(mlp_cls.from_serial(block.mlp, par.tp, sequence_parallel=par.sequence_parallel))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))
