"""estimate(spec, system, layout) -> Estimate: step time by component, memory by kind, throughput, MFU.

The step, on the critical path:
  pipeline   the makespan of the schedule (pipeline.py) over per-stage costs
             (costs.py: blocks of the stage, the embedding on stage 0, the head
             on stage p-1); with pp = 1, m microbatches back to back
  dp_comm    gradient reduction over dp * sp (all-reduce, or ZeRO's
             reduce-scatter / all-gathers) in buckets, less the part the last
             backward hides (software.dp_overlap), plus ZeRO-3's parameter gathers
  optimizer  one Adam update of the rank's (ZeRO-sharded) parameters: memory traffic
             plus the host overhead per parameter tensor
Breakdown (seconds, sums to step_time): compute, tp_comm and sp_comm are the
busiest stage's m microbatches of work; bubble is the rest of the makespan
without p2p costs; pp_comm what p2p adds to the makespan.
On CPU systems (`cores`) ranks share the host: compute slows by the
system's measured contention for the ranks busy at once (world size times the
pipeline's busy fraction), or by busy ranks per core without a measurement.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

from ..errors import MpiparError
from ..pipeline.partition import balanced_edges
from ..pipeline.schedules import check_args
from .costs import PhaseCost, embedding_cost, head_cost, host_ranks, layer_cost
from .memory import (end_activation_bytes, end_params_per_rank, layer_activation_bytes, layer_params_per_rank,
                     state_bytes_per_param)
from .pipeline import pipeline_time
from .shared_host import LIMIT as SHARED_LIMIT, makespan_shared
from .spec import DTYPE_BYTES, Layout, ModelSpec, check_fit

COMPONENTS = ("compute", "tp_comm", "sp_comm", "pp_comm", "dp_comm", "bubble", "optimizer")


@dataclass
class Estimate:
    """Predicted step of one layout; times in seconds, memory in bytes (the heaviest rank)."""

    layout: Layout
    step_time: float
    breakdown: dict
    memory: float
    memory_breakdown: dict
    tokens_per_s: float
    mfu: float
    runtime_memory: float = 0.0         # the framework's own bytes (system.runtime_bytes), not in memory
    details: dict = field(default_factory=dict, repr=False)

    def fits(self, limit: float) -> bool:
        return self.memory + self.runtime_memory <= limit

    def explain(self) -> str:
        """The per-component reasoning, one line each."""
        d, b, L = self.details, self.breakdown, self.layout
        p, m, crit, cs = L.pp, L.num_microbatches, d["critical_stage"], d["critical"]
        ends = (" + embedding" if crit == 0 else "") + (" + head" if crit == p - 1 else "")
        why = {
            "compute": f"{m} microbatches x (F {cs.f * 1e3:.3f} + B {cs.b * 1e3:.3f} + W {cs.w * 1e3:.3f} ms) "
                       f"on stage {crit} ({d['stage_layers'][crit]} blocks{ends})"
                       + (f", x{d['slowdown']:.2f}: {L.world_size} ranks share {d['cores']} cores"
                          if d["slowdown"] > 1 else ""),
            "tp_comm": (f"tp={L.tp}: " + ("2 all-gathers + 2 reduce-scatters" if L.sequence_parallel
                                          else "2 all-reduces") + " per block each way") if L.tp > 1 else "tp=1",
            "sp_comm": (f"sp={L.sp} {L.sp_mode}: " + ("KV passes the block compute does not hide"
                        if L.sp_mode == "ring" else "4 all-to-alls per block each way")) if L.sp > 1 else "sp=1",
            "pp_comm": f"p2p {d['p2p'] * 1e6:.1f} us per boundary crossing" if p > 1 else "pp=1",
            "bubble": (f"{L.schedule} p={p} m={m} v={L.num_chunks}: idle "
                       f"{b['bubble'] / max(d['makespan_no_p2p'], 1e-30):.1%} of the makespan") if p > 1
                      else "no pipeline",
            "dp_comm": d["dp_comm"],
            "optimizer": f"Adam on {d['optimizer_params'] / 1e6:.2f}M parameters, {d['optimizer_tensors']} tensors",
        }
        lines = [f"layout {L.name()}: step {self.step_time * 1e3:.3f} ms, "
                 f"{self.tokens_per_s:,.0f} tokens/s, MFU {self.mfu:.1%}"]
        for k in COMPONENTS:
            lines.append(f"  {k:<10}{b[k] * 1e3:10.3f} ms  {b[k] / self.step_time:6.1%}  {why[k]}")
        ms = d["memory_stage"]
        lines.append(f"  memory {self.memory / 2**30:.3f} GiB + runtime {self.runtime_memory / 2**30:.2f} GiB: "
                     + ", ".join(f"{k} {v / 2**30:.3f}" for k, v in self.memory_breakdown.items())
                     + f" GiB (stage {ms}: {d['inflight'][ms] if p > 1 else 1:g} microbatches in flight x "
                     f"{d['stage_layers'][ms]} blocks x {d['layer_activation_bytes'] / 2**20:.2f} MiB; "
                     f"ZeRO {L.zero} over {d['data_ranks']} data ranks)")
        return "\n".join(lines)


def model_flops_per_token(spec: ModelSpec) -> float:
    """Training FLOPs per token without recompute: 6 per matmul parameter + 12 * L * s * h for attention."""
    matmul = spec.num_layers * (spec.layer_params()) + spec.vocab_size * spec.hidden
    return 6.0 * matmul + 12.0 * spec.num_layers * spec.seq_len * spec.hidden


@functools.lru_cache(maxsize=4096)
def stage_layers(num_layers: int, p: int, v: int) -> list[int]:
    """Blocks per stage, as mpipar's ParallelGPT splits them (balanced_edges over p * v virtual stages)."""
    edges = balanced_edges([1.0] * num_layers, p * v)
    sizes = [edges[i + 1] - edges[i] for i in range(p * v)]
    return [sum(sizes[c * p + s] for c in range(v)) for s in range(p)]


@dataclass(frozen=True)
class _Stages:
    """What does not depend on dp, zero, schedule or batch: per-stage costs, parameters, activations."""

    layers: list
    costs: list            # PhaseCost per stage
    params: list           # parameters per rank of each stage
    per_layer: float       # activation bytes of one block, one microbatch
    static_acts: list      # per stage: activation bytes that do not scale with microbatches in flight
    crit: int              # the stage with the most work per microbatch
    heavy: int             # the stage with the most parameters
    n_tensors: int         # parameter tensors of the heavy stage
    p2p_bytes: float


def _stages(spec: ModelSpec, system, L: Layout) -> _Stages:
    cache = system.__dict__.setdefault("_plan_cache", {})
    key = ("stage-model", spec, L.tp, L.sp, L.sp_mode, L.sequence_parallel, L.micro_batch, L.recompute, L.dtype,
           L.pp, L.num_chunks, host_ranks(system, L))
    hit = cache.get(key)
    if hit is not None:
        return hit
    check_fit(spec, L)
    system.peak(L.dtype)
    p, v, t = L.pp, L.num_chunks, L.tp
    layers = stage_layers(spec.num_layers, p, v)
    lc = layer_cost(spec, system, L)
    emb, head = embedding_cost(spec, system, L), head_cost(spec, system, L)
    params = [layer_params_per_rank(spec, t) * layers[s] + end_params_per_rank(spec, t, s == 0, s == p - 1, p)
              for s in range(p)]
    # every microbatch adds its weight gradients into the accumulated ones (a memory pass per parameter)
    accumulate = float(system.software.get("grad_accumulation_bytes", 0.0)) / system.bandwidth
    costs = []
    for s in range(p):
        c = lc.scale(layers[s])
        if s == 0:
            c = c + emb
        if s == p - 1:
            c = c + head
        if accumulate:
            c = c + PhaseCost(w=params[s] * accumulate, work=params[s] * accumulate)
        costs.append(c)
    flash = system.software["attention"] == "flash"
    per_layer = layer_activation_bytes(spec, L, flash)
    # full recompute: the block being recomputed holds its whole activations once
    full_extra = layer_activation_bytes(spec, L.replace(recompute="none"), flash) if L.recompute == "full" else 0.0
    static = [full_extra + end_activation_bytes(spec, L, s == 0, s == p - 1) for s in range(p)]
    crit = max(range(p), key=lambda s: costs[s].total_f + costs[s].total_b + costs[s].w)
    heavy = max(range(p), key=lambda s: params[s])
    # p2p: one activation (and its gradient) per boundary per microbatch, split over tp with SP
    # or Megatron's scatter-gather (each tp rank sends 1/t, an all-gather over tp rebuilds it)
    split = L.sequence_parallel or system.software.get("p2p_scatter_gather", False)
    p2p = L.micro_batch * spec.seq_len / L.sp * spec.hidden * DTYPE_BYTES[L.dtype] / (t if split else 1)
    hit = cache[key] = _Stages(layers, costs, params, per_layer, static, crit, heavy,
                               _param_tensors(spec, layers[heavy], heavy == 0, heavy == p - 1), p2p)
    return hit


def estimate(spec: ModelSpec, system, layout: Layout) -> Estimate:
    """Predicted step time, memory and throughput of `layout` for `spec` on `system`."""
    if not isinstance(spec, ModelSpec):
        raise MpiparError(f"estimate: spec must be a plan.ModelSpec, got {type(spec).__name__}")
    if not isinstance(layout, Layout):
        raise MpiparError(f"estimate: layout must be a plan.Layout, got {type(layout).__name__}")
    L = layout
    p, v, m, t = L.pp, L.num_chunks, L.num_microbatches, L.tp
    if p > 1:
        check_args(L.schedule, p, m, v)
    system = system.for_arch(spec.arch)
    S = _stages(spec, system, L)
    layers, stages, params = S.layers, S.costs, S.params
    comm = system.collective("send_recv", S.p2p_bytes, 2, t * L.sp * L.dp, host=host_ranks(system, L)) \
        if p > 1 else 0.0

    # CPU hosts: busy ranks beyond the cores slow compute
    slow = 1.0
    shared = None
    world = L.world_size
    span, span0, peaks = _pipeline(system, S, L, comm, 1.0)
    if system.cores:
        busy = sum(m * (c.total_f + c.total_b + c.w) for c in stages) / max(p * span0, 1e-30)
        slow = system.slowdown(world * min(1.0, busy), stages[S.crit].work_share)
        if slow > 1.0:
            shared = _pipeline_shared(system, S, L, comm) if p > 1 else None
            if shared is None:
                span, span0, peaks = _pipeline(system, S, L, comm, slow)
            else:
                span, span0, elapsed, waited = shared

    crit = S.crit
    cs = stages[crit]
    compute = m * (cs.f + cs.b + cs.w) * slow
    tp_comm = m * (cs.f_tp + cs.b_tp)
    sp_comm = m * (cs.f_sp + cs.b_sp)
    if shared:   # what the stage computed and waited as the events ran
        slow = max(1.0, elapsed[crit] / max(m * (cs.f + cs.b + cs.w), 1e-30))
        compute = elapsed[crit]
        k = waited[crit] / max(tp_comm + sp_comm, 1e-30)
        tp_comm, sp_comm = tp_comm * k, sp_comm * k
    bubble = max(0.0, span0 - compute - tp_comm - sp_comm) if p > 1 else 0.0
    pp_comm = max(0.0, span - span0)

    # data-parallel communication
    psi = params[S.heavy]
    d = L.dp * L.sp
    dp_comm, why_dp = _dp_comm(system, L, psi, d, stages[S.heavy], slow, m)

    # optimizer
    opt_params = psi / d if L.zero >= 1 else psi
    opt = system.data["optimizer"]
    optimizer = (opt_params * float(opt["bytes_per_param"]) / system.bandwidth
                 + S.n_tensors * float(opt["per_tensor"])) * slow

    step = compute + tp_comm + sp_comm + bubble + pp_comm + dp_comm + optimizer
    breakdown = {"compute": compute, "tp_comm": tp_comm, "sp_comm": sp_comm, "pp_comm": pp_comm,
                 "dp_comm": dp_comm, "bubble": bubble, "optimizer": optimizer}

    # memory: the stage with the largest total
    kp, kg, ko = state_bytes_per_param(L.dtype, L.zero, d)
    k = kp + kg + ko
    best, mem_stage = -1.0, 0
    for s in range(p):
        total = k * params[s] + (peaks[s] if p > 1 else 1.0) * layers[s] * S.per_layer + S.static_acts[s]
        if total > best:
            best, mem_stage = total, s
    ps, inflight = params[mem_stage], (peaks[mem_stage] if p > 1 else 1.0)
    mem_breakdown = {"params": kp * ps, "grads": kg * ps, "optimizer": ko * ps,
                     "activations": inflight * layers[mem_stage] * S.per_layer + S.static_acts[mem_stage]}

    tokens = L.global_batch * spec.seq_len
    mfu = _flops_per_token(spec) * tokens / (step * world * system.peak(L.dtype)) if step > 0 else 0.0
    details = {"stage_layers": layers, "critical_stage": crit, "memory_stage": mem_stage, "slowdown": slow,
               "critical": cs, "stages": stages, "p2p": comm, "inflight": peaks, "params_per_rank": psi,
               "dp_comm": why_dp, "optimizer_params": opt_params, "optimizer_tensors": S.n_tensors,
               "layer_activation_bytes": S.per_layer, "data_ranks": d, "makespan_no_p2p": span0,
               "cores": system.cores}
    return Estimate(L, step, breakdown, best, mem_breakdown, tokens / step if step > 0 else math.inf, mfu,
                    float(system.data["runtime_bytes"]), details)


_flops_per_token = functools.lru_cache(maxsize=256)(model_flops_per_token)


def _pipeline(system, S: _Stages, L: Layout, comm: float, slow: float):
    cache = system.__dict__.setdefault("_plan_cache", {})
    key = ("pipeline", id(S), L.schedule, L.num_microbatches, comm, slow)
    hit = cache.get(key)
    if hit is None:
        hit = cache[key] = _pipeline_uncached(L, S.costs, comm, slow)
    return hit


def _pipeline_shared(system, S: _Stages, L: Layout, comm: float):
    """(makespan, makespan with free p2p, compute and communication seconds per stage) with the host's slowdown
    following the stages computing at each moment; None for pipelines too long to run as events."""
    p, m, v = L.pp, L.num_microbatches, L.num_chunks
    if p * m * v * 3 > SHARED_LIMIT:
        return None
    cache = system.__dict__.setdefault("_plan_cache", {})
    key = ("pipeline_shared", id(S), L.schedule, m, comm)
    hit = cache.get(key)
    if hit is None:
        work = [(c.f, c.b, c.b + c.w, c.w) for c in S.costs]
        wait = [(c.f_tp + c.f_sp - c.share_f, c.b_tp + c.b_sp - c.share_b, c.b_tp + c.b_sp - c.share_b, 0.0)
                for c in S.costs]
        share = [(c.share_f, c.share_b, c.share_b, 0.0) for c in S.costs]
        per_stage = L.world_size // p
        idle = float(system.data.get("idle_share", 0.0))
        young = float(system.data.get("idle_young_s") or float("inf"))
        shares = [c.work_share for c in S.costs]
        span, elapsed, waited = makespan_shared(L.schedule, p, m, v, work, wait, share, comm, system.slowdown,
                                                per_stage, idle, young, shares)
        span0, _, _ = makespan_shared(L.schedule, p, m, v, work, wait, share, 0.0, system.slowdown, per_stage, idle,
                                      young, shares)
        hit = cache[key] = (span, span0, elapsed, waited)
    return hit


def _pipeline_uncached(L: Layout, stages: list[PhaseCost], comm: float, slow: float):
    m = L.num_microbatches
    if L.pp == 1:
        c = stages[0]
        span = m * ((c.f + c.b + c.w) * slow + c.f_tp + c.b_tp + c.f_sp + c.b_sp)
        return span, span, (1.0,)
    f = [c.f * slow + c.f_tp + c.f_sp for c in stages]
    b = [c.b * slow + c.b_tp + c.b_sp for c in stages]
    w = [c.w * slow for c in stages]
    return pipeline_time(L.schedule, L.pp, m, L.num_chunks, f, b, w, comm)


def _param_tensors(spec: ModelSpec, layers: int, first: bool, last: bool) -> int:
    per_block = 12 if spec.arch == "gpt2" else 7
    return layers * per_block + (2 if first else 0) + (3 if last else 0)


def _dp_comm(system, L: Layout, psi: float, d: int, stage: PhaseCost, slow: float, m: int):
    """Exposed seconds of gradient reduction (and ZeRO gathers) over the d = dp * sp data ranks."""
    if d <= 1:
        return 0.0, "no data parallelism"
    sw = system.software
    H = host_ranks(system, L)
    grad_bytes = psi * float(sw["grad_reduce_bytes"])
    param_bytes = psi * DTYPE_BYTES[L.dtype]
    stride = L.tp
    buckets = max(1, math.ceil(grad_bytes / float(sw["bucket_bytes"])))
    window = float(sw["dp_overlap"]) * (stage.b * slow + stage.w * slow + stage.b_tp + stage.b_sp)
    if L.zero <= 1:
        reduce = system.collective("all_reduce", grad_bytes, d, stride, buckets, host=H)
        what = f"all-reduce {grad_bytes / 2**20:.1f} MiB in {buckets} buckets"
    else:
        reduce = system.collective("reduce_scatter", grad_bytes, d, stride, buckets, host=H)
        what = f"reduce-scatter {grad_bytes / 2**20:.1f} MiB in {buckets} buckets"
    exposed = max(0.0, reduce - window)
    extra = 0.0
    if L.zero in (1, 2):
        extra = system.collective("all_gather", param_bytes, d, stride, buckets, host=H)
        what += f" + all-gather of the updated {param_bytes / 2**20:.1f} MiB"
    elif L.zero == 3:
        gather = system.collective("all_gather", param_bytes, d, stride, buckets, host=H)
        hide_f = float(sw["dp_overlap"]) * (stage.f * slow + stage.f_tp)
        extra = m * (max(0.0, gather - hide_f) + max(0.0, gather - window))
        what += f" + {2 * m} parameter all-gathers of {param_bytes / 2**20:.1f} MiB (forward and backward)"
    small = system.collective("all_reduce", 8, d, stride, 1, host=H)   # the loss mean
    return exposed + extra + small, f"{what}; {min(reduce, window) * 1e3:.3f} ms hidden by the last backward"
