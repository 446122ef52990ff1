"""The output end of a parallel GPT: final norm and the vocab-parallel projection (tied or not)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import comm
from ..tensor import ColumnParallelLinear
from .parallel_block import Parallelism, quiet


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
    return quiet(ColumnParallelLinear.from_serial(head, par.tp, gather_output=False,
                                                   sequence_parallel=par.sequence_parallel))
