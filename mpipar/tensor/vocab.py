"""Vocabulary-parallel embedding and cross-entropy (Megatron).

The vocabulary is split in contiguous blocks: rank r owns ids
r*V/N .. (r+1)*V/N, both the embedding rows and the logit columns.

VocabParallelEmbedding looks up the ids it owns, writes zeros for the others
and sums over the group (one all-reduce; a reduce-scatter along the sequence
with sequence_parallel=True).

vocab_parallel_cross_entropy never gathers the logits: the max (for
stability), the sum of exponentials and the target's logit are reduced over
the group (two small all-reduces: [max], then [sum-exp, target logit]).
The gradient, softmax - onehot, is computed locally from the saved softmax.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import comm
from ..errors import require
from ..mesh import as_group
from . import checks
from ..layers.init import embedding_params, generator
from .sharding import shard, unshard


def _id_error(ids, limit: int, what: str) -> str | None:
    if not isinstance(ids, torch.Tensor) or ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        return f"{what}: expected an integer tensor of ids, got {getattr(ids, 'dtype', type(ids).__name__)}"
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= limit):
        return f"{what}: ids must be in [0, {limit}), got values in [{int(ids.min())}, {int(ids.max())}]"
    return None


class VocabParallelEmbedding(nn.Module):
    """nn.Embedding split by vocabulary rows. `weight` is this rank's [V/N, dim] rows.

    Input ids [...] (the same on every rank), output [..., dim] replicated; with
    sequence_parallel=True the output is this rank's block of dim -2 (sequence).
    """

    _what = "VocabParallelEmbedding"
    check_inputs = True

    def __init__(self, num_embeddings, embedding_dim, group, seed=0, *, sequence_parallel=False,
                 dtype=None, device=None, full_weight=None):
        super().__init__()
        self.group = g = checks.group_of(group, self._what)
        checks.agree_config(g, self._what, [num_embeddings, embedding_dim, seed, sequence_parallel])
        self.local_vocab = checks.divisible(num_embeddings, g, self._what, "num_embeddings")
        checks.positive(embedding_dim, self._what, "embedding_dim")
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.sequence_parallel = sequence_parallel
        self.vocab_start = g.rank * self.local_vocab
        self.vocab_end = self.vocab_start + self.local_vocab
        if full_weight is None:
            full_weight = embedding_params(generator(seed), num_embeddings, embedding_dim)
        require(tuple(full_weight.shape) == (num_embeddings, embedding_dim),
                f"{self._what}: full weight has shape {tuple(full_weight.shape)}, "
                f"expected {(num_embeddings, embedding_dim)}")
        dtype = dtype if dtype is not None else torch.get_default_dtype()
        self.weight = nn.Parameter(shard(full_weight.detach(), g, 0).to(dtype=dtype, device=device))

    @classmethod
    def from_serial(cls, emb: nn.Embedding, group, **kwargs) -> "VocabParallelEmbedding":
        """Shard an existing nn.Embedding."""
        kwargs.pop("seed", None)
        kwargs.setdefault("dtype", emb.weight.dtype)
        kwargs.setdefault("device", emb.weight.device)
        return cls(emb.num_embeddings, emb.embedding_dim, group, full_weight=emb.weight.detach(), **kwargs)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        err = _id_error(ids, self.num_embeddings, self._what)
        if err is None and self.sequence_parallel and (ids.dim() < 1 or ids.shape[-1] % self.group.size):
            err = (f"{self._what}: sequence length (last dim of ids {tuple(ids.shape)}) is not divisible by "
                   f"the tensor-parallel size {self.group.size} (sequence_parallel=True)")
        if self.check_inputs:
            checks.agree_input(self.group, self._what, err, [ids])
        else:
            require(err is None, err or "")
        outside = (ids < self.vocab_start) | (ids >= self.vocab_end)
        local = (ids.long() - self.vocab_start).masked_fill(outside, 0)
        out = F.embedding(local, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        if self.sequence_parallel:
            return comm.reduce_scatter_to_sequence(out, self.group, dim=-2)
        return comm.reduce_from_region(out, self.group)

    def full_state_dict(self) -> dict:
        """nn.Embedding's state_dict ({"weight": [V, dim]}) on every rank (collective)."""
        return {"weight": unshard(self.weight, self.group, 0)}

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim} (local rows {self.vocab_start}..{self.vocab_end}), "
                f"tp={self.group.size}, sequence_parallel={self.sequence_parallel}")


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Per-token cross-entropy of vocab-sharded logits; backward local (softmax - onehot)."""

    @staticmethod
    def forward(ctx, logits, targets, g):
        compute = torch.promote_types(logits.dtype, torch.float32)
        x = logits.detach().to(compute)
        vocab = x.shape[-1]
        start = g.rank * vocab
        logit_max = comm.all_reduce(x.max(dim=-1).values, g, op="max")
        x = x - logit_max.unsqueeze(-1)
        local_t = targets.long() - start
        mine = (local_t >= 0) & (local_t < vocab)
        local_t = local_t.masked_fill(~mine, 0)
        target_logit = x.gather(-1, local_t.unsqueeze(-1)).squeeze(-1).masked_fill(~mine, 0.0)
        exp = x.exp_()
        stats = torch.stack([exp.sum(dim=-1), target_logit])
        comm.all_reduce(stats, g)
        sum_exp, target_logit = stats[0], stats[1]
        loss = sum_exp.log() - target_logit
        ctx.save_for_backward(exp.div_(sum_exp.unsqueeze(-1)), local_t, mine)
        ctx.in_dtype = logits.dtype
        return loss

    @staticmethod
    def backward(ctx, dloss):
        softmax, local_t, mine = ctx.saved_tensors
        grad = softmax.clone()
        onehot = torch.zeros_like(grad).scatter_(-1, local_t.unsqueeze(-1), 1.0) * mine.unsqueeze(-1)
        grad.sub_(onehot).mul_(dloss.to(grad.dtype).unsqueeze(-1))
        return grad.to(ctx.in_dtype), None, None


def vocab_parallel_cross_entropy(logits_shard: torch.Tensor, targets: torch.Tensor, group) -> torch.Tensor:
    """Per-token loss [...] (the same on every rank) of logits split by vocabulary.

    logits_shard: [..., V/N], this rank's contiguous block of the vocabulary
    (rank r: ids r*V/N .. (r+1)*V/N, e.g. the output of a ColumnParallelLinear
    with gather_output=False). targets: [...] ids in [0, V). Equals
    F.cross_entropy(full_logits, targets, reduction="none"), computed in at
    least float32 (the loss is returned in that dtype; the gradient in the
    logits' dtype). Collective over `group`.
    """
    what = "vocab_parallel_cross_entropy"
    g = as_group(group)
    err = checks.last_dim_error(logits_shard, logits_shard.shape[-1] if isinstance(logits_shard, torch.Tensor)
                                else -1, what, min_dim=1)
    if err is None:
        err = _id_error(targets, g.size * logits_shard.shape[-1], what)
    if err is None and tuple(targets.shape) != tuple(logits_shard.shape[:-1]):
        err = f"{what}: targets shape {tuple(targets.shape)} != logits shape without the last dim " \
              f"{tuple(logits_shard.shape[:-1])}"
    checks.agree_input(g, what, err, [logits_shard, targets])
    return _VocabParallelCrossEntropy.apply(logits_shard, targets, g)
