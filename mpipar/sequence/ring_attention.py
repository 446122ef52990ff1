"""Ring attention: exact attention over a sequence split across the ranks of a group.

Forward: at ring step s a rank holds the K/V block of rank (r - s) mod N. The
non-blocking send of that block to rank r+1 and the receive of the next one
from rank r-1 are posted BEFORE the attention on the block in hand, so the
transfer hides behind the compute. Block results are merged with the
online-softmax (log-sum-exp) rule in float32 (float64 for float64 inputs).

Backward: a second ring pass. K/V travel again; the dK/dV of each block
accumulate as they travel behind it and, after N-1 hops, arrive back at their
owner, who kept its own part at home. Each block's gradients come from the kernel's backward fed with the
rows' GLOBAL out and log-sum-exp, which makes their sum exact.

Grouped-query attention: K/V blocks travel with their own (fewer) heads and
are repeated to the query heads only for each block's kernel; their gradients
are summed back over each group of query heads before they travel.

Traffic is a `Channel` (mpipar.comm.channel) on the group's private duplicate
communicator (`Group.p2p`) with tags distinct for forward K/V, backward K/V and backward dK, dV.
"""
from __future__ import annotations

import time

import torch

from ..comm.channel import Channel
from ..mesh import as_group
from . import kernels
from .tiles import col_span, hull, step_plan, travel_span
from .checks import agree_call, qkv_error, signature
from .layout import rank_chunks

TAG_FWD_K, TAG_FWD_V = 7101, 7102
TAG_BWD_K, TAG_BWD_V, TAG_BWD_DK, TAG_BWD_DV = 7201, 7202, 7203, 7204


class _Ring:
    """Non-blocking shifts r -> r+1 on a `Channel` over the group's private communicator.

    CPU tensors (and CUDA tensors with CUDA-aware MPI) go to MPI in place; other
    CUDA tensors pass through host copies. `send`/`recv` return handles that
    `finish` completes (polite waiting, then copy-back of staged receives).
    """

    def __init__(self, g):
        self.channel = Channel(g.p2p, g) if g.size > 1 else None
        self.group = g
        self.next, self.prev = (g.rank + 1) % g.size, (g.rank - 1) % g.size

    def send(self, t: torch.Tensor, tag: int):
        return self.channel.send(t, self.next, tag)

    def recv(self, t: torch.Tensor, tag: int):
        return self.channel.recv(t, self.prev, tag)

    def finish(self, handles) -> None:
        if self.channel is not None:
            self.channel.wait(handles, "ring attention", self.prev)


def finish(handles, ring) -> None:
    """Wait for ring handles (None entries ignored); copy staged receives to their device."""
    ring.finish(handles)


class _Timer:
    """Per-step compute and communication-wait times, appended to `profile` (a list) if given."""

    def __init__(self, profile, phase: str):
        self.profile, self.phase = profile, phase

    def record(self, step: int, compute_s: float, wait_s: float) -> None:
        if self.profile is not None:
            self.profile.append({"pass": self.phase, "step": step, "compute_s": compute_s, "wait_s": wait_s})


def _rows(blk, c: int):
    return slice(blk.q0 * c, blk.q1 * c)


def _cols(blk, c: int):
    return slice(blk.k0 * c, blk.k1 * c)


def _fold(acc, out_b, lse_b, blk, c: int, length: int):
    """Merge one block's (out, lse) into acc = (out, lse) or start it."""
    rows = _rows(blk, c)
    dt = kernels.acc_dtype(out_b.dtype)
    if acc is None and rows == slice(0, length):
        return out_b.to(dt), lse_b
    if acc is None:
        b, h, _, d = out_b.shape
        acc = (out_b.new_zeros((b, h, length, d), dtype=dt),
               lse_b.new_full((b, h, length), float("-inf")))
    kernels.merge_(acc[0][:, :, rows], acc[1][:, :, rows], out_b, lse_b)
    return acc


def _pass_kv(ring, kv, slots, step: int, tag_k: int, tag_v: int):
    """Post the receive of the next K/V block (into ping-pong slot step % 2) and the send of
    the block in hand, before any compute on it. Returns (next block, requests)."""
    slot = step % 2
    if slots[slot] is None:
        slots[slot] = (torch.empty_like(kv[0]), torch.empty_like(kv[1]))
    nxt = slots[slot]
    reqs = [ring.recv(nxt[0], tag_k), ring.recv(nxt[1], tag_v), ring.send(kv[0], tag_k), ring.send(kv[1], tag_v)]
    return nxt, reqs


def _rep(t: torch.Tensor, groups: int) -> torch.Tensor:
    return t if groups == 1 else t.repeat_interleave(groups, dim=1)


def _fold_groups(t: torch.Tensor, groups: int) -> torch.Tensor:
    """Gradient of _rep: sum each K/V head's copies."""
    return t if groups == 1 else t.unflatten(1, (t.shape[1] // groups, groups)).sum(2)


def _ring_forward(q, k, v, g, causal, layout, scale, profile):
    """(out in q.dtype, lse) of this rank's queries against the whole sequence."""
    n, rank, length = g.size, g.rank, q.shape[2]
    c = length // len(rank_chunks(rank, n, layout))
    ring, timer = _Ring(g), _Timer(profile, "forward")
    kv = (k.contiguous(), v.contiguous())
    slots = [None, None]  # ping-pong receive buffers
    acc = None
    groups = q.shape[1] // k.shape[1]
    for s in range(n):
        t0 = time.perf_counter()
        reqs, nxt = [], None
        if s < n - 1:
            nxt, reqs = _pass_kv(ring, kv, slots, s, TAG_FWD_K, TAG_FWD_V)
        t1 = time.perf_counter()
        for blk in step_plan(rank, s, n, layout, causal):
            out_b, lse_b = kernels.block_forward(q[:, :, _rows(blk, c)], _rep(kv[0][:, :, _cols(blk, c)], groups),
                                                 _rep(kv[1][:, :, _cols(blk, c)], groups), blk.causal, scale)
            acc = _fold(acc, out_b, lse_b, blk, c, length)
        t2 = time.perf_counter()
        finish(reqs, ring)
        timer.record(s, t2 - t1, (t1 - t0) + (time.perf_counter() - t2))
        kv = nxt
    return acc[0].to(q.dtype), acc[1]


def _tokens_major(t: torch.Tensor) -> torch.Tensor:
    """[B, H, L, D] as a contiguous [B, L, H, D] tensor: no copy when its memory already is
    (the CPU flash kernel's gradients are), so a gradient goes to MPI as the kernel wrote it."""
    x = t.transpose(1, 2)
    return x if x.is_contiguous() else x.contiguous()


class _RowSum:
    """dq: the sum of row slices of a [B, H, L, D] tensor in the accumulation dtype. The first
    piece that covers every row is adopted as is (no zero-fill, no add)."""

    def __init__(self, like: torch.Tensor, dtype: torch.dtype):
        self.like, self.dtype, self.total = like, dtype, None

    def add(self, rows: slice, x: torch.Tensor) -> None:
        if self.total is None and rows == slice(0, self.like.shape[2]) and x.dtype == self.dtype:
            self.total = x
            return
        if self.total is None:
            b, h, length, d = self.like.shape
            self.total = torch.zeros((b, length, h, d), dtype=self.dtype, device=self.like.device).transpose(1, 2)
        self.total[:, :, rows] += x

    def result(self, dtype: torch.dtype) -> torch.Tensor:
        if self.total is None:
            return torch.zeros(self.like.shape, dtype=dtype, device=self.like.device)
        return self.total.to(dtype)


def _add_at(dst, src, c: int) -> None:
    """dst += src for travelling gradients (span, dk, dv) with src's span inside dst's."""
    at = slice((src[0][0] - dst[0][0]) * c, (src[0][1] - dst[0][0]) * c)
    dst[1][:, at] += src[1]
    dst[2][:, at] += src[2]


def _zeros_span(span, like: torch.Tensor, dtype, c: int, fill=torch.zeros):
    """(span, dk, dv) of zeros (or `fill`), [B, keys of span, H, D] like the K/V block `like` [B, H, L, D]."""
    b, h, _, d = like.shape
    shape = (b, (span[1] - span[0]) * c, h, d)
    return span, fill(shape, dtype=dtype, device=like.device), fill(shape, dtype=dtype, device=like.device)


def _combine(a, b, like, c: int):
    """Sum of two travelling gradients (span, dk, dv) (either may be None), adding into one of
    them when its span holds the other's."""
    if a is None or b is None:
        return a if b is None else b
    span = hull(a[0], b[0])
    if span == b[0]:
        a, b = b, a
    if span != a[0]:
        a, b = _zeros_span(span, like, a[1].dtype, c), (a, b)
        for piece in b:
            _add_at(a, piece, c)
        return a
    _add_at(a, b, c)
    return a


def _block_grads(dout, q, kv, out, lse, plan, c, scale, dq: _RowSum):
    """Add the plan's dq into dq; return this step's dK/dV as (span of local key chunks, dk, dv)
    with dk, dv [B, keys of span, H, D] in dq's dtype, or None if the plan is empty."""
    span = col_span(plan)
    if span is None:
        return None
    groups = q.shape[1] // kv[0].shape[1]
    acc = None
    for blk in plan:
        rows, cols = _rows(blk, c), _cols(blk, c)
        dq_b, dk_b, dv_b = kernels.block_backward(dout[:, :, rows], q[:, :, rows], _rep(kv[0][:, :, cols], groups),
                                                  _rep(kv[1][:, :, cols], groups), out[:, :, rows],
                                                  lse[:, :, rows], blk.causal, scale)
        dq.add(rows, dq_b)
        piece = ((blk.k0, blk.k1),) + tuple(_tokens_major(_fold_groups(x, groups)).to(dq.dtype) for x in (dk_b, dv_b))
        acc = _combine(acc, piece, kv[0], c)
    return acc


def _post_travel(ring, span, like, dtype, c: int):
    """Receive a travelling dK/dV of `span` from the previous rank: ((span, dk, dv), requests)."""
    if span is None:
        return None, []
    buf = _zeros_span(span, like, dtype, c, fill=torch.empty)
    return buf, [ring.recv(buf[1], TAG_BWD_DK), ring.recv(buf[2], TAG_BWD_DV)]


def _ring_backward(dout, q, k, v, out, lse, g, causal, layout, scale, profile):
    """(dq, dk, dv) for this rank's q, k, v: a second ring pass, K/V travel again.

    The gradient of a block is summed along its way round the ring: its owner keeps the part
    of step 0 at home, ranks owner+1 .. owner+N-1 each add theirs to what arrives from the
    previous one and send it on, the last straight home (N-1 hops). Only the key chunks that
    some rank on the way has touched travel (`travel_span`): at N=2 zigzag half of one of
    the two blocks' gradient is zero and is not sent."""
    n, rank = g.size, g.rank
    c = q.shape[2] // len(rank_chunks(rank, n, layout))
    ring, timer = _Ring(g), _Timer(profile, "backward")
    dt = kernels.acc_dtype(q.dtype)
    dq = _RowSum(q, dt)
    kv = (k.contiguous(), v.contiguous())
    slots = [None, None]
    home, pending_sends = None, []
    for s in range(n):
        t0 = time.perf_counter()
        reqs, nxt = [], None
        if s < n - 1:
            nxt, reqs = _pass_kv(ring, kv, slots, s, TAG_BWD_K, TAG_BWD_V)
        inc, inc_reqs = (None, [])
        if s >= 2:  # what ranks owner+1 .. owner+s-1 summed for the block in hand
            inc, inc_reqs = _post_travel(ring, travel_span((rank - s) % n, s - 1, n, layout, causal), kv[0], dt, c)
        if s == n - 1 and n > 1:  # this rank's own block, coming home after N-1 hops
            back, back_reqs = _post_travel(ring, travel_span(rank, n - 1, n, layout, causal), k, dt, c)
        t1 = time.perf_counter()
        mine = _block_grads(dout, q, kv, out, lse, step_plan(rank, s, n, layout, causal), c, scale, dq)
        t2 = time.perf_counter()
        if s == 0:
            home = mine
        else:
            finish(inc_reqs, ring)
            travel = _combine(inc, mine, kv[0], c)
            if travel is not None:  # the handles keep the buffers alive
                pending_sends += [ring.send(travel[1], TAG_BWD_DK), ring.send(travel[2], TAG_BWD_DV)]
        finish(reqs, ring)
        timer.record(s, t2 - t1, (t1 - t0) + (time.perf_counter() - t2))
        kv = nxt
    if n > 1:
        t0 = time.perf_counter()
        finish(back_reqs + pending_sends, ring)
        home = _combine(home, back, k, c)
        timer.record(n, 0.0, time.perf_counter() - t0)
    whole = (0, len(rank_chunks(rank, n, layout)))
    if home is None or home[0] != whole:
        home = _combine(_zeros_span(whole, k, dt, c), home, k, c)
    return dq.result(q.dtype), home[1].transpose(1, 2).to(k.dtype), home[2].transpose(1, 2).to(v.dtype)


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g, causal, layout, scale, profile):
        out, lse = _ring_forward(q.detach(), k.detach(), v.detach(), g, causal, layout, scale, profile)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (g, causal, layout, scale, profile)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = _ring_backward(dout, q, k, v, out, lse, *ctx.args)
        return dq, dk, dv, None, None, None, None, None


def ring_attention(q, k, v, group, causal: bool = True, layout: str = "zigzag", *,
                   scale: float | None = None, profile: list | None = None) -> torch.Tensor:
    """Exact attention of this rank's queries over the whole sequence, K/V passed in a ring.

    q, k, v: [batch, heads, local_seq, head_dim], this rank's part of the
    sequence in `layout` ("contiguous" or "zigzag", see mpipar.sequence.layout);
    k and v may have fewer heads, dividing q's (grouped-query attention: query
    head h uses K/V head h // (q_heads / kv_heads)).
    Returns out of the same shape; out and the gradients of q, k, v equal
    SDPA(..., is_causal=causal) on the full sequence, sharded the same way.
    scale: softmax scale (default 1/sqrt(head_dim)). profile: a list that
    receives one dict per ring step (pass, step, compute_s, wait_s).
    Collective over `group`: bad input raises MpiparError on every rank.
    """
    g = as_group(group)
    err = qkv_error(q, k, v, layout, grouped=True)
    if err is None and scale is not None and not isinstance(scale, (int, float)):
        err = f"scale must be a number, got {type(scale).__name__}"
    agree_call(g, "ring_attention", err, signature(q, causal, layout, scale=scale,
                                                   kv_heads=getattr(k, "shape", (0, 0))[1],
                                                   device=getattr(getattr(q, "device", None), "type", None)))
    scale = kernels.default_scale(q.shape[-1]) if scale is None else float(scale)
    return _RingAttention.apply(q, k, v, g, bool(causal), layout, scale, profile)
