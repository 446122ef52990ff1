"""search(spec, system, world_size, global_batch): every layout that fits, fastest first.

Enumerates dp x pp x sp x tp (every factorisation of world_size), schedule
(every one when pp > 1), interleaving chunks, micro-batch (powers of two that
divide the per-dp batch), recompute, ZeRO stage (when data ranks > 1),
sp_mode (when sp > 1) and Megatron sequence parallelism (when tp > 1).
Layouts the model cannot split, or whose memory (plus the framework's own)
exceeds memory_limit (default: the system's capacity), are dropped.
Speed comes from the estimate's caches: block costs per (shape, tp, sp,
micro-batch, recompute), stage models per (that, pp, chunks), pipeline
makespans per (schedule, p, m, v, cost ratios).
"""
from __future__ import annotations

import time

from ..errors import MpiparError
from .estimate import estimate
from .spec import RECOMPUTE, SCHEDULES, Layout, ModelSpec


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def layouts(spec: ModelSpec, world_size: int, global_batch: int, *, dtype: str = "bf16",
            schedules=SCHEDULES, chunks=(2, 4), micro_batches=None, recompute=RECOMPUTE, zero=(0, 1, 2, 3),
            max_micro_batch: int = 16):
    """Yield every candidate Layout (unchecked against the model: estimate() checks)."""
    for tp in _divisors(world_size):
        if spec.num_heads % tp or spec.ffn_hidden % tp or spec.vocab_size % tp:
            continue
        for sp in _divisors(world_size // tp):
            for pp in _divisors(world_size // (tp * sp)):
                if pp > spec.num_layers:
                    continue
                dp = world_size // (tp * sp * pp)
                if global_batch % dp:
                    continue
                per_dp = global_batch // dp
                mbs = [b for b in (micro_batches or [2**i for i in range(12)]) if per_dp % b == 0
                       and b <= max_micro_batch]
                scheds = [("1f1b", 1)] if pp == 1 else \
                    [(s, 1) for s in schedules if s != "interleaved-1f1b"] + \
                    [("interleaved-1f1b", v) for v in chunks if "interleaved-1f1b" in schedules
                     and spec.num_layers >= pp * v]
                modes = ("ring", "ulysses") if sp > 1 else ("ring",)
                seqpars = (False, True) if tp > 1 else (False,)
                zeros = zero if dp * sp > 1 else (0,)
                for mb in mbs:
                    m = per_dp // mb
                    for sched, v in scheds:
                        if v > 1 and m > pp and m % pp:
                            continue
                        for mode in modes:
                            for seqpar in seqpars:
                                for rc in recompute:
                                    for z in zeros:
                                        yield Layout(tp=tp, pp=pp, dp=dp, sp=sp, sp_mode=mode, num_chunks=v,
                                                     schedule=sched, micro_batch=mb, global_batch=global_batch,
                                                     sequence_parallel=seqpar, recompute=rc, zero=z, dtype=dtype)


def search(spec: ModelSpec, system, world_size: int, global_batch: int, memory_limit: float | None = None,
           *, stats: dict | None = None, **choices) -> list:
    """Estimates of every layout that fits, fastest first (ties: less memory first).

    choices narrow the enumeration (see `layouts`: dtype, schedules, chunks,
    micro_batches, recompute, zero). stats, if given, receives counts and the rate.
    """
    if not isinstance(world_size, int) or world_size < 1:
        raise MpiparError(f"search: world_size must be a positive int, got {world_size!r}")
    if not isinstance(global_batch, int) or global_batch < 1:
        raise MpiparError(f"search: global_batch must be a positive int, got {global_batch!r}")
    limit = system.capacity if memory_limit is None else float(memory_limit)
    t0, c0 = time.perf_counter(), time.process_time()
    out, tried, invalid, too_big = [], 0, 0, 0
    for layout in layouts(spec, world_size, global_batch, **choices):
        tried += 1
        try:
            est = estimate(spec, system, layout)
        except MpiparError:
            invalid += 1
            continue
        if est.memory + est.runtime_memory > limit:
            too_big += 1
            continue
        out.append(est)
    out.sort(key=lambda e: (e.step_time, e.memory))
    if stats is not None:
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
        stats.update(tried=tried, invalid=invalid, too_big=too_big, kept=len(out), seconds=dt, cpu_seconds=cpu,
                     layouts_per_s=tried / dt if dt > 0 else float("inf"),
                     layouts_per_cpu_s=tried / cpu if cpu > 0 else float("inf"))
    return out
