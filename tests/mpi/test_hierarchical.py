"""Hierarchical all-reduce (mpipar.comm.symmetric.hierarchical) on faked node boundaries.

MPIPAR_FAKE_RANKS_PER_NODE=k makes groups of k consecutive ranks act as nodes,
so the inter-node path (shared-memory reduce-scatter inside each "node", MPI
all-reduce of the shards across nodes, shared-memory all-gather) runs on one
machine. Results must equal the one-node shared-memory path and the numpy
reference (exactly, on data whose sums are exact), and be identical on every rank.
"""
from __future__ import annotations

import pytest
import torch
from conftest import SHM_COUNTS, np_reduce, rank_tensor, same_on_all_ranks

from mpipar import MpiparError, comm, settings
from mpipar.comm.symmetric import pool as symmetric
from mpipar.mesh import Group

pytestmark = pytest.mark.mpi

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16,
          torch.int32, torch.int64, torch.int8, torch.uint8, torch.bool]
OPS = ["sum", "max", "min"]


def _group(ranks_per_node):
    from mpi4py import MPI

    with settings.override(fake_ranks_per_node=ranks_per_node or None):
        g = Group(MPI.COMM_WORLD.Dup(), f"fake{ranks_per_node}")
        comm.symmetric_empty((1,), torch.float32, g)  # the pool reads the setting now
    return g


@pytest.fixture(scope="module", params=[1, 2], ids=lambda k: f"rpn{k}")
def module_groups(request):
    """(group faking nodes of 1 or 2 ranks, one-node group), kept for the module (windows reused)."""
    fake, real = _group(request.param), _group(0)
    yield fake, real
    for g in (fake, real):
        symmetric.free_symmetric(g)
        g.comm.Free()


@pytest.fixture
def groups(module_groups, monkeypatch, shm_counts):
    """The module's groups, their shared-memory calls counted from zero, 1 KiB shm chunks, shm at
    every size."""
    monkeypatch.setenv("MPIPAR_SHM_CHUNK_BYTES", "1024")
    monkeypatch.setenv("MPIPAR_SHM_CROSSOVER_ALL_REDUCE", "0")
    return module_groups


def hier_calls(g) -> int:
    return SHM_COUNTS.calls(g, "all_reduce", "hier")


def spans_nodes(g) -> bool:
    return not symmetric.pool_of(g).one_node


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op", OPS)
def test_faked_nodes_equal_one_node(groups, checks, op, dtype):
    fake, real = groups
    n, r = fake.size, fake.rank
    for shape in [(1,), (2 * n + 1, 3, 67)]:
        ins = [rank_tensor(shape, dtype, k, seed=11) for k in range(n)]
        a = comm.symmetric_empty(shape, dtype, fake)
        b = comm.symmetric_empty(shape, dtype, real)
        a.copy_(ins[r])
        b.copy_(ins[r])
        comm.all_reduce(a, fake, op=op)
        comm.all_reduce(b, real, op=op)
        checks.equal(a, b, f"faked nodes vs one node {shape}")
        checks.equal(a, np_reduce(ins, op), f"faked nodes vs numpy {shape}")
    checks.true(hier_calls(fake) == (2 if spans_nodes(fake) else 0), "hierarchical path not taken")
    checks.true(hier_calls(real) == 0, "one node must not go hierarchical")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_precision_rounds_once(groups, checks, dtype):
    """bf16/fp16 are summed in float32 inside the node AND across nodes, then rounded once."""
    fake, _ = groups
    big = 256.0 if dtype is torch.bfloat16 else 2048.0
    ins = [torch.full((300,), big if k == 0 else 1.0, dtype=dtype) for k in range(fake.size)]
    t = comm.symmetric_empty((300,), dtype, fake)
    t.copy_(ins[fake.rank])
    comm.all_reduce(t, fake)
    checks.equal(t, np_reduce(ins, "sum"), "rounded more than once?")


def test_random_floats_close_and_identical(groups, checks):
    fake, real = groups
    gen = torch.Generator().manual_seed(7 + fake.rank)
    src = torch.randn(3001, generator=gen)
    a, b = comm.symmetric_empty((3001,), torch.float32, fake), comm.symmetric_empty((3001,), torch.float32, real)
    a.copy_(src)
    b.copy_(src)
    comm.all_reduce(a, fake)
    comm.all_reduce(b, real)
    checks.close(a, b, rtol=1e-5, atol=1e-5, msg="faked nodes vs one node")
    checks.true(same_on_all_ranks(fake.comm, a.numpy().tobytes()), "results differ between ranks")


def test_forced_hier_on_plain_tensor(groups, checks):
    fake, _ = groups
    n = fake.size
    ins = [rank_tensor((4, 2 * n + 3), torch.bfloat16, k, seed=12) for k in range(n)]
    t = ins[fake.rank].clone()
    comm.all_reduce(t, fake, algorithm="hier")
    checks.equal(t, np_reduce(ins, "sum"), "hier on a plain bf16 tensor")
    t = ins[fake.rank].clone()
    comm.all_reduce(t, fake, algorithm="shm")  # shm on a group spanning nodes -> hierarchical
    checks.equal(t, np_reduce(ins, "sum"), "shm on a plain bf16 tensor")


def test_other_collectives_across_fake_nodes(groups, checks):
    """Symmetric tensors on a group spanning nodes: auto falls back to MPI; forced shm raises."""
    fake, _ = groups
    n, r = fake.size, fake.rank
    ins = [rank_tensor((2 * n + 1, 3), torch.float32, k, seed=13) for k in range(n)]
    t = comm.symmetric_empty(ins[r].shape, torch.float32, fake)
    t.copy_(ins[r])
    checks.equal(comm.reduce_scatter(t, fake), torch.tensor_split(np_reduce(ins, "sum"), n)[r], "RS")
    checks.equal(comm.all_gather(t, fake), torch.cat(ins), "AG")
    comm.broadcast(t, fake, root=n - 1)
    checks.equal(t, ins[n - 1], "broadcast")
    checks.finish()
    if spans_nodes(fake):
        with pytest.raises(MpiparError, match="one node"):
            comm.reduce_scatter(t, fake, algorithm="shm")
