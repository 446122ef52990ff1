"""The pieces a parallel GPT is assembled from: block, embedding, head, pipeline chunk.

Each piece shards the serial module it is built from (`from_serial`), so its
numbers are exactly the serial model's. Activations between pieces are
[batch, local_seq, hidden]: local_seq is this rank's part of the sequence over
the sp group (zigzag by default) and, under Megatron sequence parallelism,
further this rank's contiguous block of that over the tp group.
"""
from __future__ import annotations

import copy
import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from .. import comm
from ..tensor import ColumnParallelLinear, ParallelMLP, ParallelSelfAttention, VocabParallelEmbedding
from ..tensor.gqa import ParallelGQAttention
from ..tensor.swiglu import ParallelSwiGLU
from .gpt import autocast_context, run_blocks


@dataclasses.dataclass
class Runtime:
    """Options shared by a model and its chunks, changeable between steps."""

    activation_checkpointing: bool = False
    autocast_dtype: torch.dtype | None = None


@dataclasses.dataclass
class Parallelism:
    """How the pieces split their work: groups and modes."""

    tp: object
    sp: object
    sp_mode: str | None
    sp_layout: str
    sequence_parallel: bool


def _quiet(module: nn.Module) -> nn.Module:
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
        self.attn = _quiet(attn_cls.from_serial(
            block.attn, par.tp, sp_group=sp, sp_mode=par.sp_mode if sp else None,
            sequence_parallel=par.sequence_parallel, sp_layout=par.sp_layout))
        self.ln2 = copy.deepcopy(block.ln2)
        mlp_cls = ParallelSwiGLU if llama else ParallelMLP
        self.mlp = _quiet(mlp_cls.from_serial(block.mlp, par.tp, sequence_parallel=par.sequence_parallel))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class Embedding(nn.Module):
    """Vocab-parallel token embedding plus this rank's rows of the position embedding (if any:
    rotary models have none)."""

    def __init__(self, tok: VocabParallelEmbedding, pos: nn.Embedding | None, positions: torch.Tensor):
        super().__init__()
        self.tok, self.pos = tok, pos
        self.register_buffer("positions", positions, persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.tok(ids)
        return x if self.pos is None else x + self.pos(self.positions)


class TiedProjection(nn.Module):
    """Head sharing the token embedding's vocab shard: logits [..., V/tp] = x @ W_shard^T.

    Given `weight`, it holds its own copy (the last pipeline stage; kept equal
    to the first stage's by summing their gradients); given `source`, it reads
    that module's weight (same stage).
    """

    vocab_parallel = True

    def __init__(self, par: Parallelism, weight: torch.Tensor | None = None, source: nn.Module | None = None):
        super().__init__()
        self.tp, self.sequence_parallel = par.tp, par.sequence_parallel
        self._source = [source]  # a list: not registered as a child (its parameter has one owner)
        # reading another module's parameter breaks the pipeline's weight-gradient split
        # (mpipar.pipeline.weight_grad), which then runs full backwards for this chunk
        self.uses_foreign_parameters = source is not None
        self.weight = None if weight is None else nn.Parameter(weight.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.sequence_parallel:
            x = comm.gather_from_sequence(x, self.tp, dim=-2)
        else:
            x = comm.copy_to_region(x, self.tp)
        weight = self.weight if self.weight is not None else self._source[0].weight
        return F.linear(x, weight)


class Head(nn.Module):
    """Final norm, then the vocab-parallel projection: logits shard [..., seq_local_sp, V/tp]."""

    def __init__(self, ln_f: nn.Module, proj: nn.Module):
        super().__init__()
        self.ln_f, self.proj = ln_f, proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.ln_f(x))


def make_head_projection(head: nn.Linear, par: Parallelism) -> ColumnParallelLinear:
    """The untied head, column-parallel over the vocabulary."""
    return _quiet(ColumnParallelLinear.from_serial(head, par.tp, gather_output=False,
                                                   sequence_parallel=par.sequence_parallel))


class Chunk(nn.Module):
    """One pipeline chunk: [embedding], its blocks, [head]. The unit PipelineRunner runs."""

    def __init__(self, blocks, runtime: Runtime, embedding: nn.Module | None = None, head: nn.Module | None = None):
        super().__init__()
        self.embedding, self.head = embedding, head
        self.blocks = nn.ModuleList(blocks)
        self.runtime = runtime

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        device = next(self.parameters()).device
        with autocast_context(self.runtime.autocast_dtype, device):
            if self.embedding is not None:
                x = self.embedding(x)
            x = run_blocks(self.blocks, x, self.runtime.activation_checkpointing)
            if self.head is not None:
                x = self.head(x)
        return x
