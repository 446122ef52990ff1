"""Seconds of one transformer block, the embedding and the head, per microbatch and rank, by phase.

Phases follow the pipeline simulator: F (forward), B (input gradient) and W
(weight gradient). Each is split into compute, tp communication (Megatron
all-reduces, or all-gathers and reduce-scatters with sequence parallelism)
and sp communication (ring attention's exposed KV passes, Ulysses'
all-to-alls). Recompute adds the recomputed forward to B: the whole block
("full") or the attention core ("selective", Korthikanti et al. 2022).

Work counted per op (a GEMM, the attention kernel, one elementwise pass) and
each op pays the system's launch / eager overhead (see System.op).
FLOPs: a GEMM (m x k)(k x n) is 2mnk; its B and W are one GEMM each of the
same size. Attention: 4 * s_q * s_kv * head_dim per head forward, halved for
causal flash kernels (masked tiles are skipped), 2.5x forward in the backward
(flash recomputes the scores) or 2x for the unfused kernels, which also move
the s^2 score tensors through memory (softmax, dropout).
"""
from __future__ import annotations

from dataclasses import dataclass

from .spec import DTYPE_BYTES, Layout, ModelSpec


@dataclass(frozen=True)
class PhaseCost:
    """Seconds per microbatch and rank: compute, tp and sp communication of F, B and W."""

    f: float = 0.0
    f_tp: float = 0.0
    f_sp: float = 0.0
    b: float = 0.0
    b_tp: float = 0.0
    b_sp: float = 0.0
    w: float = 0.0
    flops: float = 0.0      # hardware FLOPs of F + B + W (recompute included)
    share_f: float = 0.0    # the part of f_tp + f_sp (b_tp + b_sp) that is the host's sync_share:
    share_b: float = 0.0    # waiting for peers while other ranks hold the cores
    work: float = 0.0       # the part of f + b + w that is device work (GEMMs, memory passes), not per-op
                            # overhead: the two slow down differently where ranks share cores (System.slowdown)

    def __add__(self, o: "PhaseCost") -> "PhaseCost":
        return PhaseCost(*(a + b for a, b in zip(self.astuple(), o.astuple())))

    def scale(self, k: float, compute_only: float = 1.0) -> "PhaseCost":
        """Every time times k; compute times (f, b, w) also times compute_only."""
        c = k * compute_only
        return PhaseCost(self.f * c, self.f_tp * k, self.f_sp * k, self.b * c, self.b_tp * k, self.b_sp * k,
                         self.w * c, self.flops * k, self.share_f * k, self.share_b * k, self.work * c)

    def astuple(self) -> tuple:
        return (self.f, self.f_tp, self.f_sp, self.b, self.b_tp, self.b_sp, self.w, self.flops, self.share_f,
                self.share_b, self.work)

    @property
    def total_f(self) -> float:
        return self.f + self.f_tp + self.f_sp

    @property
    def total_b(self) -> float:
        return self.b + self.b_tp + self.b_sp

    @property
    def work_share(self) -> float:
        """The device-work fraction of the compute (f + b + w); the rest is per-op overhead."""
        compute = self.f + self.b + self.w
        return min(1.0, self.work / compute) if compute > 0 else 0.0


# mpipar's eager Llama block runs this many more kernels than its GPT-2 block (forward, backward),
# counted per block with a torch dispatch mode (tests/unit/test_plan.py keeps it true): RMSNorm is
# six ops where LayerNorm is one, rotary five on each of q and k, q/k/v and gate/up are separate
# GEMMs (one each in this model)
LLAMA_EXTRA_KERNELS = (22, 41)


# eager kernels of ring attention beyond those of one rank alone (forward, backward): per ring
# step, with equal and with grouped K/V heads (grouped: the step repeats its K/V block to the
# query heads and folds the gradients back), plus RING_SLOT_KERNELS per K/V buffer (one per
# step, at most two: the pass is double-buffered); counted with a torch dispatch mode, views
# left out (tests/mpi/test_ring_attention.py keeps them true). A step is the block's attention,
# its log-sum-exp merge (sub, exp, logaddexp, mul_, addcmul_) and the copies of the K/V pass.
RING_STEP_KERNELS = {False: (9, 9), True: (11, 15)}
RING_SLOT_KERNELS = 2


class _Ops:
    """Accumulates per-op work by phase, each op paying the system's overhead once."""

    def __init__(self, system):
        self.sys = system
        self.t = {"F": 0.0, "B": 0.0, "W": 0.0}
        self.fl = {"F": 0.0, "B": 0.0, "W": 0.0}
        self.wk = {"F": 0.0, "B": 0.0, "W": 0.0}   # device work without the per-op overhead

    @property
    def flops(self) -> float:
        return self.fl["F"] + self.fl["B"] + self.fl["W"]

    def add(self, phase: str, work: float, count: int = 1, flops: float = 0.0) -> None:
        if count:
            self.t[phase] += count * self.sys.op(work / count, phase != "F")
            self.wk[phase] += work
        self.fl[phase] += flops

    @property
    def work(self) -> float:
        return self.wk["F"] + self.wk["B"] + self.wk["W"]

    def gemm(self, m, n, k, dtype, e, split_w: bool = True, batch: int = 1) -> None:
        """Forward GEMM and its two backward GEMMs (B: input gradient; W: weight gradient when split_w)."""
        work = batch * self.sys.matmul(m, n, k, dtype, e)
        fl = 2.0 * m * n * k * batch
        self.add("F", work, flops=fl)
        self.add("B", work, flops=fl)
        self.add("W" if split_w else "B", work, flops=fl)


def _heads(spec: ModelSpec, tp: int) -> tuple[float, float]:
    """(query heads, kv heads) per tp rank; kv heads are replicated when tp exceeds them."""
    return spec.num_heads / tp, max(spec.num_kv_heads / tp, 1.0)


def layer_cost(spec: ModelSpec, system, layout: Layout) -> PhaseCost:
    """One block, one microbatch, one rank. Cached on the system per shape-relevant layout fields."""
    system = system.for_arch(spec.arch)
    key = ("layer", spec, layout.tp, layout.sp, layout.sp_mode, layout.sequence_parallel, layout.micro_batch,
           layout.recompute, layout.dtype, host_ranks(system, layout))
    cache = _cache(system)
    if key not in cache:
        cache[key] = _layer_cost(spec, system, layout)
    return cache[key]


def host_ranks(system, L: Layout):
    """Ranks sharing the host when the system's collective fits depend on it (calibrated CPU hosts)."""
    return L.world_size if system.cores else None


def _cache(system) -> dict:
    if not hasattr(system, "_plan_cache"):
        system._plan_cache = {}
    return system._plan_cache


def _layer_cost(spec: ModelSpec, system, L: Layout) -> PhaseCost:
    H = host_ranks(system, L)
    e, dt = DTYPE_BYTES[L.dtype], L.dtype
    t, c = L.tp, L.sp
    h, hd, f = spec.hidden, spec.head_dim, spec.ffn_hidden
    a, g = _heads(spec, t)
    s_q = spec.seq_len / c
    T = L.micro_batch * s_q                     # tokens per microbatch on this rank
    T_ew = T / t if L.sequence_parallel else T  # tokens of the hidden-wide elementwise ops
    flash = system.software["attention"] == "flash"
    ops = _Ops(system)

    # GEMMs
    ops.gemm(T, (a + 2 * g) * hd, h, dt, e)
    ops.gemm(T, h, a * hd, dt, e)
    if spec.arch == "gpt2":
        ops.gemm(T, f / t, h, dt, e)
        ops.gemm(T, h, f / t, dt, e)
    else:
        ops.gemm(T, 2 * f / t, h, dt, e)
        ops.gemm(T, h, f / t, dt, e)

    # attention core
    s_kv = spec.seq_len
    attn_f = attn_b = 0.0
    core_flops = 4.0 * L.micro_batch * s_q * s_kv * hd * a
    if flash:
        core_flops *= 0.5
        nbytes = (2 * a + 2 * g) * hd * T * e
        attn_f = system.attention(core_flops, nbytes, hd, dt)
        attn_b = system.attention(2.5 * core_flops, 2 * nbytes, hd, dt)
        ops.add("F", attn_f, flops=core_flops)
        ops.add("B", attn_b, flops=2.5 * core_flops)
        ops_f, ops_b = 3, 3
    else:
        bh = L.micro_batch * a
        bmm = system.matmul(s_q, s_kv, hd, dt, e) * bh
        score = bh * s_q * s_kv
        drop = 1 if spec.dropout else 0
        ew_f = system.memory_bound(score * (2 * e + drop * (2 * e + 1)))   # softmax (+ dropout)
        ew_b = system.memory_bound(score * (3 * e + drop * (2 * e + 1)))
        attn_f, attn_b = 2 * bmm + ew_f, 4 * bmm + ew_b
        ops.add("F", 2 * bmm, count=2, flops=core_flops)
        ops.add("F", ew_f, count=1 + drop)
        ops.add("B", 4 * bmm, count=4, flops=2 * core_flops)
        ops.add("B", ew_b, count=1 + drop)
        ops_f, ops_b = 4, 4

    # elementwise passes (forward bytes; the backward moves about twice as much)
    if spec.arch == "gpt2":
        hid = T_ew * (2 * 2 * h * e + 2 * (3 * e + (1 if spec.dropout else 0)) * h)  # 2 LayerNorms, 2 (dropout-)adds
        wide = T * 2 * e * f / t                          # bias-GeLU
        n_ew = n_ew_b = 5
    else:
        hid = T_ew * (2 * 2 * h * e + 2 * 3 * h * e)         # two RMSNorms, two residual adds
        wide = T * (3 * e * f / t + 2 * e * (a + g) * hd)   # SwiGLU, rotary on q and k
        n_ew, n_ew_b = 5 + LLAMA_EXTRA_KERNELS[0], 5 + LLAMA_EXTRA_KERNELS[1]
    ops.add("F", system.memory_bound(hid + wide), count=n_ew)
    ops.add("B", system.memory_bound(2 * (hid + wide)), count=n_ew_b)
    ops.add("F", 0.0, count=ops_f + 4)   # views, reshapes, splits of the eager code
    ops.add("B", 0.0, count=ops_b + 4)

    # tensor-parallel communication: two per direction (attention out, MLP out)
    act = T * h * e
    if t > 1:
        if L.sequence_parallel:
            tp_f = system.collective("all_gather", act, t, 1, 2, host=H) + system.collective("reduce_scatter", act, t, 1, 2, host=H)
        else:
            tp_f = system.collective("all_reduce", act, t, 1, 2, host=H)
        tp_b = tp_f
    else:
        tp_f = tp_b = 0.0

    # sequence-parallel communication
    sp_f = sp_b = 0.0
    if c > 1:
        if L.sp_mode == "ring":
            kv = L.micro_batch * s_q * 2 * g * hd * e
            ov = float(system.software["ring_overlap"])
            step_f = system.collective("send_recv", kv, c, t, host=H)
            step_b = system.collective("send_recv", 2 * kv, c, t, host=H)
            sp_f = (c - 1) * max(0.0, step_f - ov * attn_f / c)
            sp_b = (c - 1) * max(0.0, step_b - ov * attn_b / c)
            step_f, step_b = RING_STEP_KERNELS[g < a]
            slots = RING_SLOT_KERNELS * min(c - 1, 2)
            ops.add("F", 0.0, count=step_f * (c - 1) + slots)
            ops.add("B", 0.0, count=step_b * (c - 1) + slots)
        else:
            q = T * a * hd * e
            kvb = T * g * hd * e
            sp_f = system.collective("all_to_all", 2 * q + 2 * kvb, c, t, 4, host=H)
            sp_b = sp_f

    F, B, W = ops.t["F"], ops.t["B"], ops.t["W"]
    flops, work = ops.flops, ops.work
    # A tp or sp group smaller than the host's busy ranks meets its peers while other groups
    # hold the cores: its ranks lose a share of the compute between collectives waiting.
    # The ring too: its messages are posted ahead of the block computation they cross, but
    # each step still waits for a peer that may not hold a core (docs/plan.md: without the
    # share pp2 x sp2 came out 15-25% too fast; with it, back when a waiting rank was charged
    # for its whole wait, 75% too slow).
    share_f = share_b = 0.0
    if t > 1:
        share = system.sync_share(t, H)
        tp_f, tp_b = tp_f + share * F, tp_b + share * (B + W)
        share_f, share_b = share * F, share * (B + W)
    if c > 1:
        share = system.sync_share(c * t, H) if t > 1 else system.sync_share(c, H)
        sp_f, sp_b = sp_f + share * F, sp_b + share * (B + W)
        share_f, share_b = share_f + share * F, share_b + share * (B + W)
    if L.recompute == "full":
        B += F
        tp_b += tp_f
        sp_b += sp_f
        share_b += share_f
        flops += ops.fl["F"]
        work += ops.wk["F"]
    elif L.recompute == "selective":
        B += system.op(attn_f, True)
        flops += core_flops
        work += attn_f
        if L.sp_mode == "ring":
            sp_b += sp_f
    return PhaseCost(F, tp_f, sp_f, B, tp_b, sp_b, W, flops, share_f, share_b, work)


def embedding_cost(spec: ModelSpec, system, L: Layout) -> PhaseCost:
    """Token (and GPT-2 position) embedding on the first stage, vocab-parallel over tp."""
    key = ("emb", spec, L.tp, L.sp, L.sequence_parallel, L.micro_batch, L.dtype, host_ranks(system, L))
    cache = _cache(system)
    if key in cache:
        return cache[key]
    H = host_ranks(system, L)
    e, t = DTYPE_BYTES[L.dtype], L.tp
    T = L.micro_batch * spec.seq_len / L.sp
    h = spec.hidden
    ops = _Ops(system)
    ops.add("F", system.memory_bound(T * h * e * (4 if spec.arch == "gpt2" else 2)), count=4)
    # backward: zero the fp32 weight gradient shard, scatter-add the rows
    ops.add("B", system.memory_bound(spec.vocab_size / t * h * 4 + T * h * (e + 8)), count=4)
    act = T * h * e
    tp_f = 0.0
    if t > 1:
        tp_f = system.collective("reduce_scatter" if L.sequence_parallel else "all_reduce", act, t, 1, 1, host=H)
    cache[key] = PhaseCost(ops.t["F"], tp_f, 0.0, ops.t["B"], 0.0, 0.0, 0.0, 0.0, work=ops.work)
    return cache[key]


def head_cost(spec: ModelSpec, system, L: Layout) -> PhaseCost:
    """Final norm, vocab-parallel output projection and cross-entropy on the last stage."""
    key = ("head", spec, L.tp, L.sp, L.sequence_parallel, L.micro_batch, L.dtype, L.recompute, host_ranks(system, L))
    cache = _cache(system)
    if key in cache:
        return cache[key]
    H = host_ranks(system, L)
    e, t, dt = DTYPE_BYTES[L.dtype], L.tp, L.dtype
    T = L.micro_batch * spec.seq_len / L.sp
    h, V = spec.hidden, spec.vocab_size
    ops = _Ops(system)
    T_ew = T / t if L.sequence_parallel else T
    ops.add("F", system.memory_bound(T_ew * 2 * h * e), count=1)
    ops.add("B", system.memory_bound(T_ew * 4 * h * e), count=1)
    ops.gemm(T, V / t, h, dt, e)
    # cross-entropy over the vocab shard in fp32: max, exp-sum, pick, loss; backward: softmax - onehot
    ops.add("F", system.memory_bound(T * V / t * (e + 12)), count=6)
    ops.add("B", system.memory_bound(T * V / t * (e + 8)), count=4)
    ops.add("F", 0.0, count=6)
    act = T * h * e
    tp_f = tp_b = 0.0
    if t > 1:
        small = system.collective("all_reduce", T * 4, t, 1, 3, host=H)
        if L.sequence_parallel:
            tp_f = system.collective("all_gather", act, t, 1, 1, host=H) + small
            tp_b = system.collective("reduce_scatter", act, t, 1, 1, host=H)
        else:
            tp_f = small
            tp_b = system.collective("all_reduce", act, t, 1, 1, host=H)
    cache[key] = PhaseCost(ops.t["F"], tp_f, 0.0, ops.t["B"], tp_b, 0.0, ops.t["W"], ops.flops, work=ops.work)
    return cache[key]
