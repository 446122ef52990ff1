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
import contextlib

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
    """A Group over a Dup of WORLD whose small collectives run fast.c (built here even where ranks
    share cores, where mpipar would not choose it), and a counter of its C calls ("fast": the
    all-reduce, "run": the others, mpipar.comm.agreement.fast_ops)."""
    from mpipar.comm.agreement import fast, inline

    g = Group(world.Dup(), "fast")
    buf = inline.buffers(g)
    ctx = fast.build(g, buf.table, buf.shm)
    if not world.allreduce(ctx is not None, op=MPI.LAND):
        g.comm.Free()
        pytest.skip("fast.c is not available here")
    ctx.cma = buf.cma  # (agreed when the buffers were made: cma.works)
    calls = collections.Counter()

    def counted(*args):
        calls["fast"] += 1
        return ctx(*args)

    def counted_run(*args):
        calls["run"] += 1
        return ctx.run(*args)

    buf.fast, buf.run = counted, counted_run
    yield g, calls
    g.comm.Free()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.int64, torch.int32, torch.int16, torch.int8,
                                   torch.uint8, torch.bool], ids=str)
@pytest.mark.parametrize("op", ["sum", "max", "min"])
@pytest.mark.parametrize("cols", [50, 5000], ids=["in-the-table", "MPI_Allreduce"])
def test_fast_all_reduce_is_the_python_path_bit_for_bit(fast_group, world, checks, op, dtype, cols, monkeypatch):
    """fast.c against the Python path on the same inputs: the same bits on every rank, and the
    C path taken exactly when it has the kernel. Small: reduced in rank order from the table
    (floats: sum only); larger: MPI_Allreduce after the agreement (every dtype but bool; also
    where the table goes through shared memory: every rank is then present, as under
    wait.all_present on the Python path; there the payload slots, which would carry it, are
    off: test_payload_slots.py)."""
    from mpipar.comm import tuning
    from mpipar.comm.agreement import inline

    monkeypatch.setattr(tuning, "SLOT_BYTES", {})
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
    expect_c = (op == "sum" or not dtype.is_floating_point) if small else dtype is not torch.bool
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
def test_fast_and_python_paths_meet(fast_group, world, checks, cols, monkeypatch):
    """Rank 0's tensor is not contiguous (the Python path), the others' are (the C path): the
    ranks make the same exchange and get the same bits as when all take one path. Only where
    mpipar takes the C path at all: ranks with their own cores, whose Python path gathers
    with MPI's blocking Allgather, and crowded ranks on one node, whose two paths exchange
    through the same shared table (crowded ranks on several nodes gather non-blocking,
    which a blocking collective does not match). A larger tensor's C call is the agreement
    and MPI's blocking all-reduce, as the Python path's (wait.all_present where crowded; the
    payload slots, where every rank takes the C call, are off: test_payload_slots.py)."""
    from mpipar.comm import tuning
    from mpipar.comm.agreement import inline

    monkeypatch.setattr(tuning, "SLOT_BYTES", {})
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
    c_here = g.rank != 0
    checks.true((calls["fast"] - before) == int(c_here), "rank 0 Python, the others C")
    checks.finish()


# ---- the other small collectives in one C call (fast.c's run, mpipar.comm.agreement.fast_ops) ----
FAST_OP_DTYPES = [torch.float32, torch.float64, torch.int64, torch.int16, torch.int8, torch.uint8, torch.bool]


@contextlib.contextmanager
def python_path(g):
    """Every rank of g takes inline_ops' Python path for the calls inside."""
    from mpipar.comm.agreement import inline

    buf = inline.buffers(g)
    run, buf.run = buf.run, None
    try:
        yield
    finally:
        buf.run = run


def same_bytes(checks, got, want, msg):
    """dtype, shape, contiguity, requires_grad and every byte equal."""
    checks.true((got.dtype, tuple(got.shape), got.is_contiguous(), got.requires_grad)
                == (want.dtype, tuple(want.shape), want.is_contiguous(), want.requires_grad),
                f"{msg}: {got.dtype}{tuple(got.shape)} vs {want.dtype}{tuple(want.shape)}")
    checks.true(got.shape != want.shape or got.contiguous().numpy().tobytes() == want.contiguous().numpy().tobytes(),
                f"{msg}: bytes differ")


def fast_op_cases(n):
    """(name, dtype, shape, kwargs): every dim of 1-3-d shapes with odd sizes, both ends of root."""
    for dtype in FAST_OP_DTYPES:
        for shape in ((5, 7), (1,), (3, 1, 2)):
            for root in (0, n - 1):
                yield "broadcast", dtype, shape, {"root": root}
        for shape in ((3, 5, 2), (7,), (1, 3)):
            for dim in range(-1, len(shape)):
                yield "all_gather", dtype, shape, {"dim": dim}
        for op in ("sum", "max", "min"):
            for dim in (-1, 0, 1, 2):
                yield "reduce_scatter", dtype, (2 * n + 1, 3, 2), {"dim": dim, "op": op}
        for sd, gd in ((0, 0), (0, 1), (0, 2), (2, 0), (2, 1), (2, 2), (-1, -3)):
            yield "all_to_all", dtype, (2 * n, 3, n), {"scatter_dim": sd, "gather_dim": gd}


def serial(name, xs, r, n, kw):
    """What rank r must get from the ranks' inputs `xs`, computed here."""
    from conftest import np_reduce

    if name == "broadcast":
        return xs[kw["root"]]
    if name == "all_gather":
        return torch.cat(xs, dim=kw["dim"])
    if name == "reduce_scatter":
        return torch.tensor_split(np_reduce(xs, kw["op"]), n, dim=kw["dim"])[r].contiguous()
    return torch.cat([x.chunk(n, dim=kw["scatter_dim"])[r] for x in xs], dim=kw["gather_dim"])


def run_op(name, x, g, kw):
    if name == "broadcast":
        return comm.broadcast(x, g, **kw)
    return getattr(comm, name)(x, g, **kw)


def both_paths(g, calls, name, x, kw) -> tuple:
    """(the call's result, the Python path's on every rank, whether the first took the C call)."""
    before = calls["run"]
    got = run_op(name, x.clone(), g, kw)
    took_c = calls["run"] - before == 1
    with python_path(g):
        want = run_op(name, x.clone(), g, kw)
    return got, want, took_c


def test_fast_ops_are_the_python_path_bit_for_bit(fast_group, world, checks):
    """fast.c's run against inline_ops' Python path and a serial reference, for every dtype the
    table carries, odd shapes and every dim: the same dtype, shape, layout and bytes, on every
    rank; and the C path taken exactly where it has the kernel (floats reduce by sum only)."""
    from conftest import rank_tensor

    g, calls = fast_group
    if g.size == 1:
        pytest.skip("a single rank communicates nothing")
    n, r = g.size, g.rank
    for k, (name, dtype, shape, kw) in enumerate(fast_op_cases(n)):
        xs = [rank_tensor(shape, dtype, q, seed=k) for q in range(n)]
        what = f"{name} {dtype} {shape} {kw}"
        got, want, took_c = both_paths(g, calls, name, xs[r], kw)
        same_bytes(checks, got, want, what + " vs the Python path")
        same_bytes(checks, got, serial(name, xs, r, n, kw), what + " vs serial")
        expect_c = not (name == "reduce_scatter" and dtype.is_floating_point and kw["op"] != "sum")
        checks.true(took_c == expect_c, f"{what}: C path taken: {took_c}")
    blobs = world.allgather(calls["run"])
    checks.true(all(b == blobs[0] for b in blobs), "ranks took different paths")
    checks.finish()


def test_fast_ops_in_place_and_out(fast_group, checks):
    """broadcast writes its argument in place and bumps its version (autograd sees the write)
    off the root, also on a leaf that requires grad; all_gather(out=) fills `out` (its version
    bumped), the in-place gather (t is this rank's slice of out) included; an `out` that
    requires grad takes the Python path, which raises as before."""
    g, calls = fast_group
    if g.size == 1:
        pytest.skip("a single rank communicates nothing")
    n, r = g.size, g.rank
    leaf = torch.full((6,), float(r), requires_grad=True)
    version, before = leaf._version, calls["run"]
    out = comm.broadcast(leaf, g, root=1)
    checks.true(out is leaf and calls["run"] == before + 1, "broadcast: C path, returns its argument")
    checks.equal(leaf.detach(), torch.full((6,), 1.0), "broadcast of a leaf")
    checks.true((leaf._version > version) == (r != 1), f"broadcast version {version} -> {leaf._version}")
    want = torch.arange(n, dtype=torch.float32).repeat_interleave(6).reshape(n * 2, 3)
    for in_place in (False, True):
        buf = torch.zeros(n * 2, 3)
        piece = buf[2 * r:2 * r + 2] if in_place else torch.full((2, 3), float(r))
        piece.fill_(float(r))
        version, before = buf._version, calls["run"]
        got = comm.all_gather(piece, g, out=buf)
        checks.true(got is buf and calls["run"] == before + 1, f"all_gather out= (in place {in_place}): C path")
        checks.equal(buf, want, f"all_gather out= (in place {in_place})")
        checks.true(buf._version > version, "all_gather out=: version bumped")
    before = calls["run"]
    with pytest.raises(RuntimeError, match="leaf Variable"):
        comm.all_gather(torch.ones(2, 3), g, out=torch.zeros(n * 2, 3, requires_grad=True))
    checks.true(calls["run"] == before, "an out that requires grad: the Python path")
    checks.finish()


def test_fast_ops_bad_arguments_raise_on_every_rank(fast_group, world, checks):
    """A call whose arguments differ on one rank (shape, dtype, root, op, dims, out) raises the
    Python path's MpiparError on every rank, the C ranks included, and the group goes on."""
    from mpipar import MpiparError

    g, calls = fast_group
    if g.size == 1:
        pytest.skip("a single rank communicates nothing")
    n, r, last = g.size, g.rank, g.rank == g.size - 1
    cases = [
        ("broadcast shape", lambda: comm.broadcast(torch.ones(4 + last), g), "arguments differ"),
        ("broadcast root", lambda: comm.broadcast(torch.ones(4), g, root=n if last else 0), "out of range"),
        ("broadcast dtype", lambda: comm.broadcast(torch.ones(4, dtype=torch.float64 if last else torch.float32), g),
         "arguments differ"),
        ("all_gather dtype", lambda: comm.all_gather(torch.ones(3, dtype=torch.int32 if last else torch.int64), g),
         "arguments differ"),
        ("all_gather dim", lambda: comm.all_gather(torch.ones(3, 2), g, dim=1 if last else 0), "arguments differ"),
        ("all_gather bad dim", lambda: comm.all_gather(torch.ones(3, 2), g, dim=5 if last else 0), "out of range"),
        ("all_gather out", lambda: comm.all_gather(torch.ones(2, 3), g, out=torch.zeros(2 * n + last, 3)),
         "out"),
        ("reduce_scatter op", lambda: comm.reduce_scatter(torch.ones(n, 2), g, op="prod" if last else "sum"),
         "unknown op"),
        ("reduce_scatter shape", lambda: comm.reduce_scatter(torch.ones(n + last, 2), g), "arguments differ"),
        ("all_to_all dims", lambda: comm.all_to_all(torch.ones(n, n), g, 0, 1 if last else 0), "arguments differ"),
        ("all_to_all divisible", lambda: comm.all_to_all(torch.ones(n + 1, 2), g, 0, 0), "not divisible"),
    ]
    for what, call, match in cases:
        before = calls["run"]
        try:
            call()
            checks.true(False, f"{what}: no error")
        except MpiparError as e:
            checks.true(match in str(e), f"{what}: {e}")
        except Exception as e:  # noqa: BLE001 - reported on every rank by checks
            checks.true(False, f"{what}: {type(e).__name__}: {e}")
        if what in ("broadcast shape", "all_gather dtype", "reduce_scatter shape"):
            checks.true(calls["run"] == before + 1, f"{what}: the disagreement found in the C call")
        x = torch.full((n, 2), float(r))
        checks.equal(comm.reduce_scatter(x, g), torch.full((1, 2), float(n * (n - 1) // 2)), f"after {what}")
    checks.finish()


def test_fast_ops_and_python_paths_meet(fast_group, world, checks):
    """Rank 0's tensor is not contiguous (the Python path), the others' are (the C path): the
    same exchange, the same results as the serial reference; and an all_gather whose pieces
    differ in size (the C ranks agree in C and leave the finish to inline_ops), or outgrow
    the slot on one rank (then MPI's all-gatherv after the agreement)."""
    from conftest import rank_tensor

    g, calls = fast_group
    if g.size == 1:
        pytest.skip("a single rank communicates nothing")
    if not world.allreduce(not g.oversubscribed or inline_buffers_shared(g), op=MPI.LAND):
        pytest.skip("ranks outnumber cores on several nodes: mpipar does not take the C path here")
    n, r = g.size, g.rank
    for k, (name, dtype, shape, kw) in enumerate(fast_op_cases(n)):
        if dtype not in (torch.float32, torch.int8) or len(shape) < 2:
            continue
        kernel = not (name == "reduce_scatter" and dtype.is_floating_point and kw["op"] != "sum")
        mixed_paths(checks, g, calls, name, dtype, shape, kw, k, kernel)
    for extra, slots in ((1, "in the table"), (INLINE_BYTES // 12, "one rank's piece outgrows the slot")):
        sizes = [2 + q + (extra if q == n - 1 else 0) for q in range(n)]
        xs = [rank_tensor((s, 3), torch.float32, q, seed=99) for q, s in enumerate(sizes)]
        for d, pieces in ((0, xs), (1, [x.t().contiguous() for x in xs])):
            before = calls["run"]
            got = comm.all_gather(pieces[r].clone(), g, dim=d)
            same_bytes(checks, got, torch.cat(pieces, dim=d), f"uneven all_gather dim {d} ({slots})")
            # a piece past the slot takes the C call too (planned for MPI's all-gather); the rows'
            # sizes differ, so inline_ops finishes it either way
            checks.true(calls["run"] - before == 1, f"uneven: C call ({slots})")
            out = torch.zeros(sum(sizes), 3) if d == 0 else torch.zeros(3, sum(sizes))
            comm.all_gather(pieces[r].clone(), g, dim=d, out=out)
            same_bytes(checks, out, torch.cat(pieces, dim=d), f"uneven all_gather out= dim {d} ({slots})")
    checks.finish()


def mixed_paths(checks, g, calls, name, dtype, shape, kw, seed, kernel: bool) -> None:
    """One call with rank 0's tensor not contiguous (the Python path) and the others' contiguous
    (the C path where the call has a `kernel`): the serial reference's result on every rank."""
    from conftest import rank_tensor

    n, r = g.size, g.rank
    xs = [rank_tensor(shape, dtype, q, seed=seed) for q in range(n)]
    x = xs[r].clone()
    if r == 0:  # the same values, not contiguous
        x = x.transpose(0, -1).contiguous().transpose(0, -1)
    before = calls["run"]
    got = run_op(name, x, g, kw)
    took_c = calls["run"] - before == 1
    checks.true(took_c == (x.is_contiguous() and kernel), f"{name} {kw}: rank 0 Python, the others C")
    same_bytes(checks, got.contiguous(), serial(name, xs, r, n, kw), f"mixed {name} {dtype} {shape} {kw}")


def inline_buffers_shared(g) -> bool:
    from mpipar.comm.agreement import inline

    return inline.buffers(g).shared


def test_a_small_symmetric_all_gather_takes_the_c_call(fast_group, checks):
    """In a group with a one-node symmetric pool, an all_gather that fits the table's rows is
    below the zero-copy crossover: a symmetric piece (rank 0's) or a symmetric `out` holding
    this rank's piece takes the C call as plain ones do, and every rank gets torch.cat's bytes."""
    from mpipar.comm.symmetric.pool import _ATTR as _POOL

    g, calls = fast_group
    if g.size == 1:
        pytest.skip("a single rank communicates nothing")
    n, r = g.size, g.rank
    comm.symmetric_empty((1,), torch.float32, g)  # the pool
    if not g.__dict__[_POOL].one_node:
        pytest.skip("the pool spans nodes")
    xs = [torch.arange(16, dtype=torch.float32) + 100 * q for q in range(n)]
    sym = comm.symmetric_empty((16,), torch.float32, g)  # (collective)
    x = sym.copy_(xs[r]) if r == 0 else xs[r].clone()
    before = calls["run"]
    checks.equal(comm.all_gather(x, g), torch.cat(xs), "a symmetric piece on rank 0")
    out = comm.symmetric_empty((16 * n,), torch.float32, g).fill_(-1.0)
    mine = out[16 * r:16 * (r + 1)].copy_(xs[r])
    checks.true(comm.all_gather(mine, g, out=out) is out, "returns out")
    checks.equal(out, torch.cat(xs), "in place into a symmetric out")
    checks.true(calls["run"] - before == 2, f"C calls {calls['run'] - before}")
    checks.finish()


def test_fast_ops_flight_records_match_the_python_path(fast_group, checks):
    """Each op's flight record through the C call is the Python path's: op, group, dtype, shape,
    algorithm, done; and one record per call (an uneven all_gather's too)."""
    from mpipar.flight import recorder

    g, calls = fast_group
    if g.size == 1:
        pytest.skip("a single rank communicates nothing")
    n, r = g.size, g.rank
    fields = ("op", "group", "dtype", "shape", "algorithm", "done")
    ops = [("broadcast", lambda: comm.broadcast(torch.ones(5, dtype=torch.int16), g, root=n - 1)),
           ("all_gather", lambda: comm.all_gather(torch.ones(2, 3), g, dim=1, algorithm="mpi")),
           ("all_gather uneven", lambda: comm.all_gather(torch.ones(1 + r, 3), g)),
           ("reduce_scatter", lambda: comm.reduce_scatter(torch.ones(n, 3, dtype=torch.int32), g, dim=0, op="max")),
           ("all_to_all", lambda: comm.all_to_all(torch.ones(n, 2), g, 0, 1))]
    for what, call in ops:
        records = []
        for path in ("C", "Python"):
            before, count = calls["run"], recorder.count()
            if path == "C":
                call()
            else:
                with python_path(g):
                    call()
            last = recorder.calls()[-1]
            records.append(tuple(last[f] for f in fields))
            checks.true(recorder.count() == count + 1, f"{what} ({path}): {recorder.count() - count} records")
            checks.true((calls["run"] - before == 1) == (path == "C"), f"{what} ({path}): path taken")
        checks.true(records[0] == records[1], f"{what}: C {records[0]} vs Python {records[1]}")
    checks.finish()
