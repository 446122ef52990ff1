"""Ring attention and Ulysses with grouped K/V heads (fewer than the query heads) equal serial SDPA.

float64, outputs and the gradients of q, k and v, both layouts, at every world
size; Ulysses with K/V heads that divide the group size (they travel as they
are) and that do not (repeated before the all-to-all).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from mpi4py import MPI

import mpipar
from mpipar import sequence
from mpipar.errors import MpiparError

WORLD = MPI.COMM_WORLD
F64 = torch.float64


def reference(q, k, v):
    groups = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(q, k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1),
                                          is_causal=True)


@pytest.mark.mpi
@pytest.mark.parametrize("fn", ["ring", "ulysses"])
@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
@pytest.mark.parametrize("kv_heads", [1, 4])
def test_grouped_kv_equals_serial(fn, layout, kv_heads):
    n = WORLD.Get_size()
    heads = 4 * n  # q heads divide by the group size for Ulysses; 4 K/V heads divide it only when n | 4
    g = torch.Generator().manual_seed(7)
    q = torch.randn(2, heads, 8 * n, 8, dtype=F64, generator=g, requires_grad=True)
    k, v = (torch.randn(2, kv_heads, 8 * n, 8, dtype=F64, generator=g, requires_grad=True) for _ in range(2))
    dout = torch.randn(2, heads, 8 * n, 8, dtype=F64, generator=g)
    ref = reference(q, k, v)
    ref.backward(dout)
    mesh = mpipar.Mesh(sp=n)
    parts = [sequence.shard_sequence(t.detach(), mesh.sp, dim=2, layout=layout).requires_grad_() for t in (q, k, v)]
    attend = sequence.ring_attention if fn == "ring" else sequence.ulysses_attention
    out = attend(*parts, mesh.sp, causal=True, layout=layout)
    out.backward(sequence.shard_sequence(dout, mesh.sp, dim=2, layout=layout))
    expect = [sequence.shard_sequence(t, mesh.sp, dim=2, layout=layout) for t in (ref, q.grad, k.grad, v.grad)]
    for got, want in zip([out] + [p.grad for p in parts], expect):
        assert got.shape == want.shape and float((got - want).detach().abs().max()) < 1e-10


@pytest.mark.mpi
def test_kv_heads_that_do_not_divide_raise_everywhere():
    n = WORLD.Get_size()
    mesh = mpipar.Mesh(sp=n)
    q = torch.zeros(1, 6, 4, 8, dtype=F64)
    kv = torch.zeros(1, 4, 4, 8, dtype=F64)
    with pytest.raises(MpiparError, match="equal shapes"):
        sequence.ring_attention(q, kv, kv, mesh.sp, layout="contiguous")
