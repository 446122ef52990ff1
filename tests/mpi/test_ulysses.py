"""Ulysses attention vs torch SDPA on the full sequence (outputs and dq, dk, dv), any world size."""
import itertools

import pytest
import torch
from mpi4py import MPI

from conftest import attention_vs_sdpa

from mpipar.errors import MpiparError
from mpipar.mesh import as_group
from mpipar.sequence import ulysses_attention
from mpipar.sequence.ulysses import heads_to_seq, seq_to_heads

pytestmark = pytest.mark.mpi
COMM = MPI.COMM_WORLD
N = COMM.Get_size()
HEADS = 12  # divisible by 1, 2, 3 and 4


def compare(fn, causal, layout, dtype, heads=HEADS, **kw):
    """Max abs error of fn's out, dq, dk, dv vs SDPA on the full sequence (conftest helper)."""
    return attention_vs_sdpa(fn, COMM, causal, layout, dtype, heads=heads, seed=1, **kw)


def _raises_everywhere(fn):
    with pytest.raises(MpiparError) as info:
        fn()
    msgs = COMM.allgather(str(info.value))
    assert len(set(msgs)) == 1, msgs


@pytest.mark.parametrize("causal,layout", list(itertools.product([True, False], ["zigzag", "contiguous"])))
@pytest.mark.parametrize("dim,local", [(8, 8), (16, 6)])
def test_ulysses_float64_exact(causal, layout, dim, local):
    compare(ulysses_attention, causal, layout, torch.float64, heads=HEADS, dim=dim, local=local, atol=1e-10)


@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
def test_ulysses_float32(layout):
    compare(ulysses_attention, True, layout, torch.float32, heads=HEADS, local=16, dim=32, atol=2e-5)


def test_ulysses_bfloat16_runs():
    errs = compare(ulysses_attention, True, "zigzag", torch.bfloat16, heads=HEADS, local=16, dim=16,
                   atol=None, ref_dtype=torch.float64)
    errs = [COMM.allreduce(e, op=MPI.MAX) for e in errs]
    if COMM.Get_rank() == 0:
        print(f"\nbf16 ulysses N={N}: max abs err out/dq/dk/dv vs float64 = " + ", ".join(f"{e:.2e}" for e in errs))
    assert max(errs) < 0.1, errs


def test_all_to_all_round_trip_and_adjoint():
    """seq_to_heads then heads_to_seq is the identity; the backward is the adjoint."""
    g = torch.Generator().manual_seed(COMM.Get_rank())
    x = torch.randn(2, HEADS, 4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    grp = as_group(COMM)
    y = seq_to_heads(x, grp, heads_dim=1, seq_dim=2)
    assert y.shape == (2, HEADS // N, 4 * N, 3)
    assert torch.equal(heads_to_seq(y, grp, heads_dim=1, seq_dim=2), x)
    w = torch.randn(y.shape, generator=g, dtype=torch.float64)
    (y * w).sum().backward()
    lhs = COMM.allreduce((y * w).sum().item())
    rhs = COMM.allreduce((x * x.grad).sum().item())
    assert abs(lhs - rhs) < 1e-9


def test_ulysses_indivisible_heads_raise_on_every_rank():
    q = torch.randn(1, N + 1, 8, 4, dtype=torch.float64)
    if N > 1:
        _raises_everywhere(lambda: ulysses_attention(q, q, q, COMM))
    odd = torch.randn(1, HEADS, 7, 4, dtype=torch.float64)
    _raises_everywhere(lambda: ulysses_attention(odd, odd, odd, COMM, layout="zigzag"))
    with pytest.raises(MpiparError):
        ulysses_attention(q, q, q, COMM, layout="nope")
