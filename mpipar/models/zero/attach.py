"""attach(model, zero, bucket_bytes): the gradient reduction object of a ParallelGPT for a ZeRO stage."""
from __future__ import annotations

from ...agree import agree, agree_ints
from ..data_parallel import GradBuckets

STAGES = (0, 1, 2, 3)


def check_stage(zero) -> str | None:
    """Why `zero` is not a ZeRO stage, or None."""
    if isinstance(zero, bool) or not isinstance(zero, int) or zero not in STAGES:
        return f"zero must be one of {STAGES}, got {zero!r}"
    return None


def attach(model, zero: int, bucket_bytes: int):
    """Collective over the model's mesh: check `zero` (MpiparError on every rank) and build
    GradBuckets (zero=0) or ShardedBuckets (1-3) over the model's data-parallel group."""
    world = model.mesh.world.comm
    agree(world, check_stage(zero))
    agree_ints(world, [zero], lambda lo, hi: f"GPT(cfg, mesh, zero=...): zero differs across ranks "
                                             f"({int(lo[0])} .. {int(hi[0])})")
    if zero == 0:
        return GradBuckets(model.parameters(), model.data_group, bucket_bytes)
    from .sharded import ShardedBuckets

    return ShardedBuckets(model, zero, bucket_bytes)
