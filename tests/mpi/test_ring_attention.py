"""Ring attention vs torch SDPA on the full sequence (outputs and dq, dk, dv), any world size."""
import itertools

import pytest
import torch
import torch.nn.functional as F
from mpi4py import MPI

from conftest import attention_vs_sdpa, full_attention_inputs as full_inputs, kernel_count

from mpipar.errors import MpiparError
from mpipar.sequence import gather_sequence, ring_attention, shard_sequence

pytestmark = pytest.mark.mpi
COMM = MPI.COMM_WORLD
N = COMM.Get_size()


def compare(fn, causal, layout, dtype, **kw):
    """Max abs error of fn's out, dq, dk, dv vs SDPA on the full sequence (conftest helper)."""
    return attention_vs_sdpa(fn, COMM, causal, layout, dtype, **kw)


CASES = list(itertools.product([True, False], ["zigzag", "contiguous"]))


@pytest.mark.parametrize("causal,layout", CASES)
@pytest.mark.parametrize("dim,local", [(8, 8), (16, 12), (64, 4)])
def test_ring_float64_exact(causal, layout, dim, local):
    compare(ring_attention, causal, layout, torch.float64, dim=dim, local=local, atol=1e-10)


@pytest.mark.parametrize("causal,layout", CASES)
def test_ring_float32(causal, layout):
    compare(ring_attention, causal, layout, torch.float32, local=16, dim=32, atol=2e-5)


@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
def test_ring_bfloat16_runs_close_to_float64(layout):
    errs = compare(ring_attention, True, layout, torch.bfloat16, local=16, dim=16, atol=None,
                   ref_dtype=torch.float64)
    errs = [COMM.allreduce(e, op=MPI.MAX) for e in errs]
    if COMM.Get_rank() == 0:
        print(f"\nbf16 ring {layout} N={N}: max abs err out/dq/dk/dv vs float64 = "
              + ", ".join(f"{e:.2e}" for e in errs))
    assert max(errs) < 0.1, errs


def test_ring_batch_one_and_many_heads():
    compare(ring_attention, True, "zigzag", torch.float64, batch=1, heads=5, local=6, dim=4)


def test_two_stacked_ring_calls_match_serial():
    """out = ring(ring(q, k, v), k, v): traffic of successive calls and their backward never mixes."""
    seq = 8 * N
    q, k, v, dout = full_inputs(2, 2, seq, 8, torch.float64, seed=3)
    full = [t.clone().requires_grad_() for t in (q, k, v)]
    mid = F.scaled_dot_product_attention(*full, is_causal=True)
    ref = F.scaled_dot_product_attention(mid, full[1], full[2], is_causal=False)
    ref_grads = torch.autograd.grad(ref, full, dout)
    mine = [shard_sequence(t, COMM).requires_grad_() for t in (q, k, v)]
    out = ring_attention(ring_attention(*mine, COMM, causal=True), mine[1], mine[2], COMM, causal=False)
    grads = torch.autograd.grad(out, mine, shard_sequence(dout, COMM))
    torch.testing.assert_close(out, shard_sequence(ref.detach(), COMM), rtol=0, atol=1e-10)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, shard_sequence(b, COMM), rtol=0, atol=1e-10)


def test_non_contiguous_inputs_from_a_fused_qkv():
    """q, k, v as strided views of one [B, L, 3, H, D] tensor, as an attention layer makes them."""
    seq = 8 * N
    g = torch.Generator().manual_seed(5)
    qkv = torch.randn(2, seq, 3, 2, 8, generator=g, dtype=torch.float64)
    local = shard_sequence(qkv, COMM, dim=1).requires_grad_()
    q, k, v = (local[:, :, i].transpose(1, 2) for i in range(3))
    assert not q.is_contiguous()
    out = ring_attention(q, k, v, COMM)
    full = qkv.clone().requires_grad_()
    ref = F.scaled_dot_product_attention(*(full[:, :, i].transpose(1, 2) for i in range(3)), is_causal=True)
    torch.testing.assert_close(out, shard_sequence(ref.detach(), COMM), rtol=0, atol=1e-10)
    out.sum().backward()
    ref.sum().backward()
    torch.testing.assert_close(local.grad, shard_sequence(full.grad, COMM, dim=1), rtol=0, atol=1e-10)


def test_profile_records_every_ring_step():
    q, k, v, _ = full_inputs(1, 2, 8 * N, 8, torch.float32)
    mine = [shard_sequence(t, COMM).requires_grad_() for t in (q, k, v)]
    prof = []
    ring_attention(*mine, COMM, profile=prof).sum().backward()
    fwd = [p for p in prof if p["pass"] == "forward"]
    bwd = [p for p in prof if p["pass"] == "backward"]
    assert [p["step"] for p in fwd] == list(range(N))
    assert [p["step"] for p in bwd] == list(range(N + (N > 1)))
    assert all(p["compute_s"] >= 0 and p["wait_s"] >= 0 for p in prof)


def test_gather_sequence_round_trip_and_backward():
    x = full_inputs(2, 3, 4 * N, 5, torch.float64)[0]
    for layout in ("zigzag", "contiguous"):
        part = shard_sequence(x, COMM, layout=layout).requires_grad_()
        back = gather_sequence(part, COMM, layout=layout)
        assert torch.equal(back, x)
        w = torch.arange(x.numel(), dtype=torch.float64).view_as(x)
        (back * w).sum().backward()
        assert torch.equal(part.grad, shard_sequence(w, COMM, layout=layout))


def _raises_everywhere(fn):
    with pytest.raises(MpiparError) as info:
        fn()
    msgs = COMM.allgather(str(info.value))
    assert len(set(msgs)) == 1, msgs


def test_bad_inputs_raise_on_every_rank():
    rank = COMM.Get_rank()
    q = torch.randn(1, 2, 8, 4, dtype=torch.float64)
    _raises_everywhere(lambda: ring_attention(q, q, q, COMM, layout="striped"))
    odd = torch.randn(1, 2, 7, 4, dtype=torch.float64)
    _raises_everywhere(lambda: ring_attention(odd, odd, odd, COMM, layout="zigzag"))
    _raises_everywhere(lambda: ring_attention(q, q[..., :2], q, COMM))
    _raises_everywhere(lambda: ring_attention(q, q.float(), q, COMM))
    _raises_everywhere(lambda: ring_attention(q[0], q[0], q[0], COMM))
    # only the last rank is wrong: everyone must still raise (no hang)
    bad = torch.randn(1, 2, 10 if rank == N - 1 and N > 1 else 8, 4, dtype=torch.float64)
    if N > 1:
        _raises_everywhere(lambda: ring_attention(bad, bad, bad, COMM))
        flag = rank == 0
        _raises_everywhere(lambda: ring_attention(q, q, q, COMM, causal=flag))
    local_bad = q[..., :2] if rank == N - 1 else q
    _raises_everywhere(lambda: ring_attention(q, local_bad, q, COMM))


def test_next_block_is_posted_before_computing_on_the_current_one(monkeypatch):
    """Each ring step posts the K/V send/recv first, then runs the kernels (overlap)."""
    import importlib

    from mpipar.sequence import kernels

    ra = importlib.import_module("mpipar.sequence.ring_attention")

    events = []
    real_send, real_fwd, real_bwd = ra._Ring.send, kernels.block_forward, kernels.block_backward

    def send(self, t, tag):
        events.append(("send", tag))
        return real_send(self, t, tag)

    def fwd(*a, **kw):
        events.append(("fwd",))
        return real_fwd(*a, **kw)

    def bwd(*a, **kw):
        events.append(("bwd",))
        return real_bwd(*a, **kw)

    monkeypatch.setattr(ra._Ring, "send", send)
    monkeypatch.setattr(kernels, "block_forward", fwd)
    monkeypatch.setattr(kernels, "block_backward", bwd)
    q, k, v, _ = full_inputs(1, 2, 8 * N, 8, torch.float64)
    mine = [shard_sequence(t, COMM).requires_grad_() for t in (q, k, v)]
    ring_attention(*mine, COMM).sum().backward()
    kinds = [e[0] if e[0] != "send" else e[1] for e in events]
    k_fwd, k_bwd = ra.TAG_FWD_K, ra.TAG_BWD_K
    # forward: N-1 K sends, each before the kernels of its step; the last step sends nothing
    fwd_events = kinds[:kinds.index("bwd")]
    assert fwd_events.count(k_fwd) == N - 1
    if N > 1:
        assert fwd_events[0] == k_fwd and fwd_events.index("fwd") > fwd_events.index(ra.TAG_FWD_V)
    bwd_events = kinds[kinds.index("bwd") - (2 if N > 1 else 0):]
    assert bwd_events.count(k_bwd) == N - 1
    assert bwd_events.count(ra.TAG_BWD_DK) == N - 1  # own block kept home: N-1 hops
    if N > 1:
        assert bwd_events[0] == k_bwd  # the backward's first K/V send precedes its first kernel


def _kernels(group, q, k, v) -> tuple[int, int]:
    """Eager kernels of one ring_attention forward and its backward (torch dispatch, views left out)."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    f, b = kernel_count(), kernel_count()
    with f:
        out = ring_attention(q, k, v, group).sum()
    with b:
        out.backward()
    return f.n, b.n


@pytest.mark.skipif(N < 2, reason="a ring needs 2 ranks")
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_plan_counts_the_kernels_of_a_ring_step(kv_heads):
    """mpipar.plan charges each ring step RING_STEP_KERNELS eager kernels (each pays the op
    overhead), plus RING_SLOT_KERNELS per K/V buffer, beyond the attention of one rank alone:
    count them here, so that a change to the ring's implementation shows."""
    from mpipar.mesh import as_group
    from mpipar.plan.costs import RING_SLOT_KERNELS, RING_STEP_KERNELS

    torch.manual_seed(0)
    q = torch.randn(2, 4, 8, 16)
    k, v = torch.randn(2, kv_heads, 8, 16), torch.randn(2, kv_heads, 8, 16)
    ring = _kernels(as_group(COMM), q, k, v)
    alone = _kernels(as_group(MPI.COMM_SELF), q, k, v)
    step = RING_STEP_KERNELS[kv_heads < 4]
    slots = RING_SLOT_KERNELS * min(N - 1, 2)
    assert (ring[0] - alone[0], ring[1] - alone[1]) == (step[0] * (N - 1) + slots, step[1] * (N - 1) + slots)
