"""VocabParallelEmbedding and vocab_parallel_cross_entropy against nn.Embedding / F.cross_entropy."""
import collections

import pytest
import torch
import torch.nn.functional as F
from mpi4py import MPI

import mpipar
from mpipar import comm, tensor
from mpipar.tensor import VocabParallelEmbedding, vocab_parallel_cross_entropy

pytestmark = pytest.mark.mpi

W = MPI.COMM_WORLD
N, R = W.Get_size(), W.Get_rank()
B, S, V, D = 2, 12, 36, 8  # V and S divisible by 1, 2, 3 and 4
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def part(t, dim):
    n = t.shape[dim] // N
    return t.narrow(dim, R * n, n)


def close(a, b, dtype):
    assert a.shape == b.shape, (a.shape, b.shape)
    torch.testing.assert_close(a, b, rtol=TOL[dtype], atol=TOL[dtype])


def ids(seed, shape=(B, S), high=V):
    return torch.randint(0, high, shape, generator=torch.Generator().manual_seed(seed))


def logits(seed, dtype, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(B, S, V, generator=g, dtype=torch.float64)).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("sp", [False, True])
def test_embedding_matches_serial(dtype, sp):
    ser = tensor.seeded_embedding(V, D, seed=4, dtype=dtype)
    par = VocabParallelEmbedding(V, D, W, seed=4, sequence_parallel=sp, dtype=dtype)
    tok = ids(1)
    tok[0, :4] = torch.tensor([0, V - 1, (V // N) % V, V // N - 1])  # shard edges
    dy = torch.randn(B, S, D, generator=torch.Generator().manual_seed(2), dtype=torch.float64).to(dtype)
    y_ref = ser(tok)
    y_ref.backward(dy)
    y = par(tok)
    y.backward(part(dy, 1) if sp else dy)
    close(y, part(y_ref, 1).detach() if sp else y_ref.detach(), dtype)
    close(par.weight.grad, part(ser.weight.grad, 0), dtype)


def test_embedding_seed_and_round_trip():
    ser = tensor.seeded_embedding(V, D, seed=3)
    par = VocabParallelEmbedding(V, D, W, seed=3)
    solo = VocabParallelEmbedding(V, D, MPI.COMM_SELF, seed=3)
    assert torch.equal(par.weight, part(solo.weight, 0))
    assert torch.equal(par.full_state_dict()["weight"], ser.weight.detach())
    again = VocabParallelEmbedding.from_serial(ser, W)
    assert torch.equal(again.full_state_dict()["weight"], ser.weight.detach())
    assert (par.vocab_start, par.vocab_end) == (R * V // N, (R + 1) * V // N)


def test_embedding_one_all_reduce(monkeypatch):
    counts = collections.Counter()
    for mod in (mpipar.comm.autograd, mpipar.comm.collectives, mpipar.comm):
        for name in ("all_reduce", "all_gather", "reduce_scatter"):
            orig = getattr(mod, name)
            monkeypatch.setattr(mod, name, lambda *a, _o=orig, _n=name, **k: (counts.update([_n]), _o(*a, **k))[1])
    VocabParallelEmbedding(V, D, W)(ids(1))
    assert dict(counts) == {"all_reduce": 1}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("scale", [3.0, 1e4])
def test_cross_entropy_matches_serial(dtype, scale):
    """Loss and gradient; scale=1e4 checks numerical stability (naive exp would overflow)."""
    full = logits(5, dtype, scale).requires_grad_()
    tgt = ids(6)
    tgt[0, :3] = torch.tensor([0, V - 1, (V // N) % V])
    w = torch.rand(B, S, generator=torch.Generator().manual_seed(7), dtype=torch.float64).to(dtype)
    ref = F.cross_entropy(full.transpose(1, 2), tgt, reduction="none")
    (ref * w).sum().backward()
    shard = part(full.detach(), -1).clone().requires_grad_()
    loss = vocab_parallel_cross_entropy(shard, tgt, W)
    (loss * w).sum().backward()
    assert torch.isfinite(loss).all()
    close(loss, ref.detach(), dtype)
    close(shard.grad, part(full.grad, -1), dtype)


def test_cross_entropy_tokens_2d():
    full = logits(8, torch.float64)[0]
    tgt = ids(9)[0]
    loss = vocab_parallel_cross_entropy(part(full, -1), tgt, W)
    close(loss, F.cross_entropy(full, tgt, reduction="none"), torch.float64)


def test_embedding_head_and_loss_end_to_end():
    """Embedding -> column-parallel vocab head -> vocab-parallel loss == serial, float64, with gradients."""
    dt = torch.float64
    emb_ref, head_ref = tensor.seeded_embedding(V, D, seed=1, dtype=dt), tensor.seeded_linear(D, V, seed=2, dtype=dt)
    emb = VocabParallelEmbedding(V, D, W, seed=1, dtype=dt)
    head = tensor.ColumnParallelLinear(D, V, W, seed=2, dtype=dt)
    tok, tgt = ids(10), ids(11)
    ref = F.cross_entropy(head_ref(emb_ref(tok)).transpose(1, 2), tgt)
    ref.backward()
    loss = vocab_parallel_cross_entropy(head(emb(tok)), tgt, W).mean()
    loss.backward()
    close(loss, ref.detach(), dt)
    close(emb.weight.grad, part(emb_ref.weight.grad, 0), dt)
    close(head.weight.grad, part(head_ref.weight.grad, 0), dt)


def test_bf16_runs():
    full = logits(12, torch.bfloat16)
    tgt = ids(13)
    shard = part(full, -1).clone().requires_grad_()
    loss = vocab_parallel_cross_entropy(shard, tgt, W)
    loss.sum().backward()
    assert shard.grad.dtype == torch.bfloat16 and torch.isfinite(shard.grad.float()).all()
    ref = F.cross_entropy(full.double().transpose(1, 2), tgt, reduction="none")
    torch.testing.assert_close(loss.double(), ref, rtol=2e-2, atol=2e-2)
    emb = VocabParallelEmbedding(V, D, W, seed=1, dtype=torch.bfloat16)
    assert emb(tgt).dtype == torch.bfloat16
    assert comm.all_reduce(torch.ones(1), W).item() == N
