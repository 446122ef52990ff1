"""Layout-independent, seeded initialisation: build the FULL weight, then shard.

A parallel layer built with ``seed=s`` draws its full (serial) parameters from
``torch.Generator().manual_seed(s)`` exactly as its serial counterpart does
with `seeded_init_`, then keeps this rank's shard. So its numbers never depend
on the tensor-parallel size.

Draws follow nn.Linear / nn.Embedding's defaults: weight kaiming_uniform
(a=sqrt(5), i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in))), bias U(+-1/sqrt(fan_in)),
embedding N(0, 1). Values are always drawn in float32 on the CPU and then cast,
so they are also the same for every dtype and device. Pure torch: no MPI.
"""
from __future__ import annotations

import math

import torch
from torch import nn


def generator(seed: int) -> torch.Generator:
    """A CPU generator seeded with `seed` (independent of torch's global RNG)."""
    return torch.Generator(device="cpu").manual_seed(int(seed))


def linear_params(gen: torch.Generator, in_features: int, out_features: int,
                  bias: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Full float32 (weight [out, in], bias [out] or None) of nn.Linear's default init."""
    weight = torch.empty(out_features, in_features, dtype=torch.float32)
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5), generator=gen)
    b = None
    if bias:
        bound = 1.0 / math.sqrt(in_features) if in_features > 0 else 0.0
        b = torch.empty(out_features, dtype=torch.float32).uniform_(-bound, bound, generator=gen)
    return weight, b


def embedding_params(gen: torch.Generator, num_embeddings: int, embedding_dim: int) -> torch.Tensor:
    """Full float32 [num, dim] weight of nn.Embedding's default init, N(0, 1)."""
    weight = torch.empty(num_embeddings, embedding_dim, dtype=torch.float32)
    return nn.init.normal_(weight, generator=gen)


@torch.no_grad()
def seeded_init_(module: nn.Module, seed: int) -> nn.Module:
    """Re-initialise every nn.Linear and nn.Embedding of `module`, in registration order,
    from one generator seeded with `seed`. Returns `module`.

    This is the serial reference of the parallel layers' `seed=` argument:
    e.g. ``seeded_init_(models.MLP(h, f), s)`` holds the full weights of
    ``ParallelMLP(h, f, group, seed=s)`` (fc1 drawn first, then fc2).
    """
    gen = generator(seed)
    for m in module.modules():
        if isinstance(m, nn.Linear):
            w, b = linear_params(gen, m.in_features, m.out_features, m.bias is not None)
            m.weight.copy_(w)
            if b is not None:
                m.bias.copy_(b)
        elif isinstance(m, nn.Embedding):
            m.weight.copy_(embedding_params(gen, m.num_embeddings, m.embedding_dim))
    return module


def seeded_linear(in_features: int, out_features: int, bias: bool = True, seed: int = 0,
                  dtype: torch.dtype | None = None, device=None) -> nn.Linear:
    """The serial nn.Linear that ColumnParallelLinear/RowParallelLinear(seed=seed) shard."""
    lin = nn.Linear(in_features, out_features, bias=bias, dtype=dtype, device=device)
    return seeded_init_(lin, seed)


def seeded_embedding(num_embeddings: int, embedding_dim: int, seed: int = 0,
                     dtype: torch.dtype | None = None, device=None) -> nn.Embedding:
    """The serial nn.Embedding that VocabParallelEmbedding(seed=seed) shards."""
    emb = nn.Embedding(num_embeddings, embedding_dim, dtype=dtype, device=device)
    return seeded_init_(emb, seed)
