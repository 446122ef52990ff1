"""Small collectives ride along with the argument agreement (mpipar.comm.agreement.inline, inline_ops).

A validated all_reduce, broadcast, reduce_scatter, all_gather or all_to_all of at most
INLINE_BYTES (per rank's piece, for all_gather) makes exactly ONE collective (the
fixed-size Allgather that also agrees on the arguments: MPI's, or, for ranks that
outnumber cores on one node, one exchange through shared memory, counted here as
"ShmTable"); larger ones make the agreement plus their own collective. Inline
reductions are in rank order, bit-identical on every rank.
"""
from __future__ import annotations

import collections

import pytest
import torch
from mpi4py import MPI

from mpipar import comm
from mpipar.comm.agreement import shm_table
from mpipar.comm.agreement.inline import INLINE_BYTES
from mpipar.mesh import Group

pytestmark = pytest.mark.mpi

COLLECTIVES = ("Allgather", "Iallgather", "Allreduce", "Iallreduce", "Reduce_scatter", "Ireduce_scatter",
               "Reduce_scatter_block", "Ireduce_scatter_block", "Allgatherv", "Iallgatherv", "Bcast", "Ibcast",
               "Alltoall", "Ialltoall")


class CountingComm:
    """Forwards to an mpi4py communicator, counting collective calls by name."""

    def __init__(self, comm_):
        self._comm = comm_
        self.calls = collections.Counter()

    def __getattr__(self, name):
        attr = getattr(self._comm, name)
        if name in COLLECTIVES:
            def counted(*args, **kwargs):
                self.calls[name] += 1
                return attr(*args, **kwargs)
            return counted
        return attr


@pytest.fixture
def counted(world, monkeypatch):
    c = CountingComm(world.Dup())
    gather = shm_table.ShmTable.gather

    def counted_gather(self, table):
        c.calls["ShmTable"] += 1
        return gather(self, table)

    monkeypatch.setattr(shm_table.ShmTable, "gather", counted_gather)
    g = Group(c, "counted")
    comm.all_reduce(torch.ones(1), g)  # the first agreement decides how the group gathers (collective)
    c.calls.clear()
    yield g, c.calls
    c._comm.Free()


def gathers(calls) -> int:
    """Agreement exchanges among the counted calls."""
    return calls["Allgather"] + calls["Iallgather"] + calls["ShmTable"]


def test_small_all_reduce_is_one_collective(counted, world):
    g, calls = counted
    if g.size == 1:
        pytest.skip("a single rank communicates nothing")
    for algorithm in ("auto", "mpi", "ring"):
        calls.clear()
        x = torch.full((INLINE_BYTES // 4,), 1.0)
        comm.all_reduce(x, g, algorithm=algorithm)
        assert torch.equal(x, torch.full_like(x, float(g.size)))
        assert sum(calls.values()) == 1, (algorithm, dict(calls))
        calls.clear()
        y = torch.full((INLINE_BYTES // 4 + 1,), 1.0)  # one element more: agreement + its collective
        comm.all_reduce(y, g, algorithm=algorithm)
        assert torch.equal(y, torch.full_like(y, float(g.size)))
        data = sum(calls.values()) - 1  # the ring moves its data point-to-point
        assert gathers(calls) >= 1 and data == (0 if algorithm == "ring" else 1), \
            (algorithm, dict(calls))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.int32, torch.int8, torch.bool], ids=str)
@pytest.mark.parametrize("op", ["sum", "max", "min"])
def test_inline_is_rank_order_and_bit_identical(world, checks, op, dtype):
    n, r = world.size, world.rank
    gen = [torch.Generator().manual_seed(40 + i) for i in range(n)]
    inputs = [(torch.randn(5, 7, generator=gen[i]) * 50).to(dtype) for i in range(n)]
    want = inputs[0].clone()
    for x in inputs[1:]:  # the documented order: row 0 op row 1 op ...
        if dtype is torch.bool:
            want = want | x if op in ("sum", "max") else want & x
        else:
            want = {"sum": torch.add, "max": torch.maximum, "min": torch.minimum}[op](want, x)
    got = inputs[r].clone()
    comm.all_reduce(got, world, op=op)
    checks.equal(got, want, f"{op} {dtype}")
    blobs = world.allgather(got.numpy().tobytes())
    checks.true(all(b == blobs[0] for b in blobs), "ranks differ")
    checks.finish()


def test_inline_layouts_and_autograd_leaves(world, checks):
    n = world.size
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    t = base.t()  # non-contiguous
    comm.all_reduce(t, world)
    checks.equal(base, torch.arange(24, dtype=torch.float32).reshape(4, 6) * n, "non-contiguous in place")
    leaf = torch.ones(3, requires_grad=True)
    version = leaf._version
    out = comm.all_reduce(leaf, world)
    checks.true(out is leaf, "returns its argument")
    checks.true(n == 1 or leaf._version > version, "an in-place write autograd records (version counter)")
    checks.equal(leaf.detach(), torch.full((3,), float(n)), "leaf reduced in place")
    scalar = torch.tensor(2.0)
    comm.all_reduce(scalar, world, op="max")
    checks.equal(scalar, torch.tensor(2.0), "0-d")
    checks.finish()


def _other_ops(g, numel, checks):
    """broadcast, reduce_scatter and all_gather of `numel` float32 elements (all_gather: per rank),
    their results recorded in `checks` (collective at finish: a wrong value on one rank must not
    leave the others waiting in the next call); yields each op's name after running it."""
    n, r = g.size, g.rank
    x = torch.full((numel,), float(r))
    comm.broadcast(x, g, root=n - 1)
    checks.true(torch.equal(x, torch.full_like(x, float(n - 1))), f"broadcast {numel}")
    yield "broadcast"
    y = torch.arange(numel, dtype=torch.float32) + r
    out = comm.reduce_scatter(y, g)
    full = n * torch.arange(numel, dtype=torch.float32) + n * (n - 1) / 2
    checks.true(torch.equal(out, torch.tensor_split(full, n)[r]), f"reduce_scatter {numel}")
    yield "reduce_scatter"
    out = comm.all_gather(torch.full((numel,), float(r)), g)
    checks.true(torch.equal(out, torch.arange(n, dtype=torch.float32).repeat_interleave(numel)), f"all_gather {numel}")
    yield "all_gather"


def test_small_broadcast_reduce_scatter_all_gather_are_one_collective(counted, checks):
    g, calls = counted
    if g.size == 1:
        pytest.skip("a single rank communicates nothing")
    calls.clear()
    for name in _other_ops(g, INLINE_BYTES // 4, checks):
        one = dict(calls) in ({"Allgather": 1}, {"Iallgather": 1}, {"ShmTable": 1})
        checks.true(one, f"{name}: {dict(calls)}")
        calls.clear()
    for name in _other_ops(g, INLINE_BYTES // 4 + 1, checks):  # one element more: agreement + its collective
        checks.true(sum(calls.values()) == 2 and gathers(calls) >= 1, f"{name}: {dict(calls)}")
        calls.clear()
    checks.finish()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.int32, torch.int8, torch.bool], ids=str)
@pytest.mark.parametrize("op", ["sum", "max", "min"])
def test_small_reduce_scatter_is_rank_order(world, checks, op, dtype):
    n, r = world.size, world.rank
    gen = [torch.Generator().manual_seed(60 + i) for i in range(n)]
    inputs = [(torch.randn(2 * n + 1, 3, generator=gen[i]) * 50).to(dtype) for i in range(n)]
    want = inputs[0].clone()
    for x in inputs[1:]:
        if dtype is torch.bool:
            want = want | x if op in ("sum", "max") else want & x
        else:
            want = {"sum": torch.add, "max": torch.maximum, "min": torch.minimum}[op](want, x)
    got = comm.reduce_scatter(inputs[r], world, op=op)
    checks.equal(got, torch.tensor_split(want, n)[r].contiguous(), f"{op} {dtype}")
    checks.finish()


def test_unvalidated_small_all_reduce_uses_the_library(counted, monkeypatch):
    g, calls = counted
    if g.size == 1:
        pytest.skip("a single rank communicates nothing")
    x = torch.ones(4)
    comm.all_reduce(x, g, validate=False)
    assert torch.equal(x, torch.full((4,), float(g.size)))
    assert calls["Allreduce"] + calls["Iallreduce"] == 1 and gathers(calls) == 0, calls
    monkeypatch.setenv("MPIPAR_VALIDATE", "0")
    calls.clear()
    comm.all_reduce(x, g)
    assert gathers(calls) == 0, calls


def test_all_to_all_small_is_one_collective_and_large_matches(counted, checks):
    """A small all_to_all finishes from the agreement's table; one just above the slot takes
    MPI's Alltoall after the agreement; both equal the reference."""
    g, calls = counted
    if g.size == 1:
        pytest.skip("a single rank communicates nothing")
    n, r = g.size, g.rank
    for rows, collectives in ((INLINE_BYTES // 4 // 3 // n * n, 1), (INLINE_BYTES // 4 // 3 // n * n + n, 2)):
        xs = [torch.arange(rows * 3, dtype=torch.float32).reshape(rows, 3) * (i + 1) for i in range(n)]
        for sd, gd in ((0, 0), (0, 1)):
            calls.clear()
            out = comm.all_to_all(xs[r], g, scatter_dim=sd, gather_dim=gd)
            want = torch.cat([x.chunk(n, dim=sd)[r] for x in xs], dim=gd)
            checks.equal(out, want, f"{rows} rows, {sd}->{gd}")
            checks.true(sum(calls.values()) == collectives and gathers(calls) == 1, f"{rows} rows: {dict(calls)}")
    checks.finish()


# ---- the small all-reduce in one C call (mpipar.comm.agreement.fast) ---------------------------
@pytest.fixture
def fast_group(world):
    """A Group over a Dup of WORLD whose small all-reduces run fast.c (built here even where ranks
    share cores, where mpipar would not choose it), and a counter of its C calls."""
    from mpipar.comm.agreement import fast, inline

    g = Group(world.Dup(), "fast")
    buf = inline.buffers(g)
    ctx = fast.build(g, buf.table, buf.shm)
    if not world.allreduce(ctx is not None, op=MPI.LAND):
        g.comm.Free()
        pytest.skip("fast.c is not available here")
    calls = collections.Counter()

    def counted(*args):
        calls["fast"] += 1
        return ctx(*args)

    buf.fast = counted
    yield g, calls
    g.comm.Free()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.int64, torch.int32, torch.int16, torch.int8,
                                   torch.uint8, torch.bool], ids=str)
@pytest.mark.parametrize("op", ["sum", "max", "min"])
@pytest.mark.parametrize("cols", [50, 5000], ids=["in-the-table", "MPI_Allreduce"])
def test_fast_all_reduce_is_the_python_path_bit_for_bit(fast_group, world, checks, op, dtype, cols):
    """fast.c against the Python path on the same inputs: the same bits on every rank, and the
    C path taken exactly when it has the kernel. Small: reduced in rank order from the table
    (floats: sum only); larger: MPI_Allreduce after the agreement (every dtype but bool; not
    where the table goes through shared memory: crowded ranks would busy-poll in MPI)."""
    from mpipar.comm.agreement import inline

    g, calls = fast_group
    if g.size == 1:
        pytest.skip("a single rank communicates nothing")
    gen = torch.Generator().manual_seed(7 + g.rank)
    x = (torch.randn(3, cols, generator=gen) * 60).to(dtype)
    got = x.clone()
    comm.all_reduce(got, g, op=op)
    took_c = calls["fast"] == 1
    buf, fast = inline.buffers(g), inline.buffers(g).fast
    buf.fast = None
    try:
        want = x.clone()
        comm.all_reduce(want, g, op=op)
    finally:
        buf.fast = fast
    checks.equal(got, want, f"{op} {dtype}")
    blobs = world.allgather(got.numpy().tobytes())
    checks.true(all(b == blobs[0] for b in blobs), "ranks differ")
    small = x.numel() * x.element_size() <= INLINE_BYTES
    expect_c = (op == "sum" or not dtype.is_floating_point) if small else dtype is not torch.bool and not buf.shared
    checks.true(took_c == expect_c, f"C path taken: {took_c}")
    checks.finish()


def test_fast_all_reduce_disagreement_and_record(fast_group, world, checks):
    """Different shapes on the ranks: MpiparError on every rank, through the C path; a call that
    agrees is in the flight record as an all_reduce on its group with its dtype and shape."""
    from mpipar import MpiparError
    from mpipar.flight import recorder

    g, calls = fast_group
    if g.size == 1:
        pytest.skip("a single rank communicates nothing")
    x = torch.ones(4 + (g.rank == g.size - 1))
    with pytest.raises(MpiparError, match="all_reduce"):
        comm.all_reduce(x, g)
    checks.true(calls["fast"] == 1, f"C calls: {calls['fast']}")
    y = torch.ones(6, dtype=torch.int32)
    comm.all_reduce(y, g)
    checks.equal(y, torch.full((6,), g.size, dtype=torch.int32))
    last = recorder.calls()[-1]
    checks.true((last["op"], last["group"], last["dtype"], last["shape"], last["done"])
                == ("all_reduce", "fast", "int32", [6], True), str(last))
    checks.finish()


@pytest.mark.parametrize("cols", [50, 5000], ids=["in-the-table", "MPI_Allreduce"])
def test_fast_and_python_paths_meet(fast_group, world, checks, cols):
    """Rank 0's tensor is not contiguous (the Python path), the others' are (the C path): the
    ranks make the same exchange and get the same bits as when all take one path. Only where
    mpipar takes the C path at all: ranks with their own cores, whose Python path gathers
    with MPI's blocking Allgather, and crowded ranks on one node, whose two paths exchange
    through the same shared table (crowded ranks on several nodes gather non-blocking,
    which a blocking collective does not match). A larger tensor takes the C path only
    with MPI's Allgather."""
    from mpipar.comm.agreement import inline

    g, calls = fast_group
    if g.size == 1:
        pytest.skip("a single rank communicates nothing")
    shared = inline.buffers(g).shared
    if not world.allreduce(not g.oversubscribed or shared, op=MPI.LAND):
        pytest.skip("ranks outnumber cores on several nodes: mpipar does not take the C path here")
    gen = torch.Generator().manual_seed(11 + g.rank)
    x = torch.randn(cols, 3, generator=gen)
    want = x.t().contiguous()
    comm.all_reduce(want, g)
    got = x.t() if g.rank == 0 else x.t().contiguous()
    before = calls["fast"]
    comm.all_reduce(got, g)
    checks.equal(got.contiguous(), want, "mixed paths")
    c_here = g.rank != 0 and not (shared and cols * 3 * 4 > INLINE_BYTES)
    checks.true((calls["fast"] - before) == int(c_here), "rank 0 Python, the others C")
    checks.finish()
