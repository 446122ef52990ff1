"""Cut a full tensor into this rank's shard, and gather shards back into the full tensor.

`stride` handles fused weights: the dimension is viewed as `stride` equal
blocks (e.g. [q | k | v] for stride=3) and each block is split over the group
separately; rank r keeps slice r of every block, concatenated in block order
(Megatron's `stride`). stride=1 is the plain contiguous split: rank r holds
elements r*n/N .. (r+1)*n/N. `take_shard` / `assemble` are the same cuts by
part number, without a group (pure torch).
"""
from __future__ import annotations

import torch

from .. import comm
from ..errors import require
from ..mesh import as_group


def shard(full: torch.Tensor, group, dim: int = 0, stride: int = 1) -> torch.Tensor:
    """This rank's shard of `full` along `dim` (a fresh contiguous tensor). No communication."""
    g = as_group(group)
    n = full.shape[dim]
    require(n % (stride * g.size) == 0,
            f"shard: size {n} along dim {dim} is not divisible by {stride} x group size {g.size}")
    blocks = full.chunk(stride, dim=dim) if stride > 1 else (full,)
    mine = [b.chunk(g.size, dim=dim)[g.rank] for b in blocks]
    return torch.cat(mine, dim=dim).contiguous().clone()


def unshard(local: torch.Tensor, group, dim: int = 0, stride: int = 1) -> torch.Tensor:
    """Inverse of `shard`: the full tensor on every rank (one all-gather; collective)."""
    g = as_group(group)
    gathered = comm.all_gather(local.detach().contiguous(), g, dim=dim)
    if stride == 1 or g.size == 1:
        return gathered
    per_rank = [part.chunk(stride, dim=dim) for part in gathered.chunk(g.size, dim=dim)]
    return torch.cat([per_rank[r][s] for s in range(stride) for r in range(g.size)], dim=dim)


def take_shard(full: torch.Tensor, part: int, parts: int, dim: int | None, stride: int = 1) -> torch.Tensor:
    """Part `part` of `parts` of `full` (see module doc); `full` itself when dim is None."""
    if dim is None or parts == 1:
        return full
    blocks = full.chunk(stride, dim=dim) if stride > 1 else (full,)
    return torch.cat([b.chunk(parts, dim=dim)[part] for b in blocks], dim=dim)


def assemble(pieces: list[torch.Tensor], dim: int | None, stride: int = 1) -> torch.Tensor:
    """The full tensor from all parts (pieces[r] = part r); inverse of `take_shard`."""
    if dim is None or len(pieces) == 1:
        return pieces[0]
    per_part = [p.chunk(stride, dim=dim) for p in pieces]
    return torch.cat([per_part[r][s] for s in range(stride) for r in range(len(pieces))], dim=dim)
