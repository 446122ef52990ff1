"""Collectives whose data rides in the shared table's payload slots (fast.c's KIND_SLOT_COPY,
KIND_SLOT_REDUCE and KIND_SLOT_SPLIT, planned in mpipar.comm.agreement.fast_plan._in_slots).

Where a group's ranks outnumber cores on one node, an all_reduce, broadcast, all_gather,
reduce_scatter or all_to_all whose data (each rank's) is past the agreement row's 4 KiB and within
tuning.SLOT_BYTES goes through the payload slots: each rank copies its data in before the
agreement's exchange and reads the others' after it. Every rank must take that C call, so a rank
whose tensor is not contiguous takes it too (from a copy). Checked against the Python path and a
serial reference, byte for byte, at the sizes and dtypes of test_fast_mpi; with one rank's tensor
not contiguous; disagreements; calls back to back (the slots' parity, with other exchanges in
between); all_gather's uneven pieces and out=; broadcast in place; all_reduce, in one step and
split in two (a reduce-scatter, then an all-gather through a second exchange); and a symmetric
pool, which turns the slots off. Where ranks have their own cores (2 ranks here) there are no slots: skipped.
"""
from __future__ import annotations

import pytest
import torch

from mpipar import MpiparError, comm
from mpipar.comm.agreement import inline
from test_fast_mpi import ROWS, cases, checked_paths, disagreeing_calls, gather_into, raise_on_every_rank, rows_of
from test_inline import fast_group, python_path, run_op, same_bytes, serial  # noqa: F401 (fast_group: a fixture)

pytestmark = pytest.mark.mpi


@pytest.fixture
def slotted(fast_group):
    """fast_group where its agreement has payload slots (else skip), and the group's buffers."""
    g, calls = fast_group
    buf = inline.buffers(g)
    if buf.slot_bytes == 0:
        pytest.skip("no payload slots: the ranks have their own cores (or several nodes)")
    return g, calls, buf


def slot_plans(buf) -> int:
    return sum(bool(p.slots) for p in buf.plans.values())


def in_slots(name, dtype, kw, x, cma=False) -> bool:
    """Whether cases()' call of input `x` rides in the slots: within tuning.SLOT_BYTES, and not a
    reduction without a C kernel (bfloat16 and float16 reduce in float32; floats by sum only); or,
    where the group reads its peers' memory (`cma`), from tuning.CMA_BYTES (its plan is a slot
    plan too: test_cma.py)."""
    from mpipar.comm import tuning

    nbytes = x.numel() * x.element_size()
    if cma and nbytes >= tuning.CMA_BYTES.get(name, tuning.NEVER):
        return True
    if nbytes > tuning.SLOT_BYTES[name]:
        return False
    if name != "reduce_scatter":
        return True
    if dtype in (torch.bfloat16, torch.float16):
        return False
    return not (dtype.is_floating_point and kw["op"] != "sum")


def test_slot_calls_are_the_python_path_bit_for_bit(slotted, world, checks):
    """Every case of test_fast_mpi through the slots: the Python path's bytes, the serial
    reference's, on every rank; a slot plan exactly where in_slots() says."""
    from conftest import rank_tensor

    g, calls, buf = slotted
    n, r = g.size, g.rank
    for k, (name, dtype, shape, kw, mpi) in enumerate(cases(n)):
        xs = [rank_tensor(shape, dtype, q, seed=k) for q in range(n)]
        what = f"{name} {dtype} {shape} {kw}"
        plans = slot_plans(buf)
        _, took_c = checked_paths(checks, g, calls, name, xs, kw, what)
        expect = in_slots(name, dtype, kw, xs[r], buf.cma)
        checks.true((slot_plans(buf) - plans, took_c) == (int(expect), expect or mpi), f"{what}: slots {expect}")
    checks.finish()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.int64, torch.int32, torch.int16, torch.int8,
                                   torch.uint8, torch.bool], ids=str)
def test_slot_all_reduce(slotted, checks, dtype):
    """all_reduce through the slots (every row reduced in rank order into the tensor itself) against
    MPI_Allreduce after the agreement and a serial reference, byte for byte; floats by sum only (max
    and min take MPI's all-reduce); a rank whose tensor is not contiguous takes the slots too and
    gets its values written back; past tuning.SLOT_BYTES, MPI's all-reduce."""
    from conftest import np_reduce, rank_tensor
    from mpipar.comm import tuning

    g, calls, buf = slotted
    n, r = g.size, g.rank
    cap, rows = tuning.SLOT_BYTES["all_reduce"] // dtype.itemsize, rows_of(dtype)
    for k, (shape, op) in enumerate((((rows, 3), "sum"), ((rows, 3), "max"), ((3, rows), "min"),
                                     ((cap,), "sum"), ((cap + 1,), "sum"))):
        xs = [rank_tensor(shape, dtype, q, seed=k) for q in range(n)]
        want = np_reduce(xs, op)
        plans = slot_plans(buf)
        x = xs[r].clone()
        if r == 0 and x.dim() == 2:  # the same values, not contiguous
            x = x.t().contiguous().t()
        checks.true(comm.all_reduce(x, g, op=op) is x, "returns its argument")
        same_bytes(checks, x.contiguous(), want, f"{dtype} {shape} {op}")
        fast, buf.fast = buf.fast, None
        try:
            with python_path(g):  # MPI_Allreduce after the agreement
                y = xs[r].clone()
                comm.all_reduce(y, g, op=op)
        finally:
            buf.fast = fast
        same_bytes(checks, y, want, f"{dtype} {shape} {op}: the Python path")
        expect = (op == "sum" or not dtype.is_floating_point) and xs[r].numel() <= cap
        checks.true(slot_plans(buf) - plans == int(expect), f"{dtype} {shape} {op}: slots {expect}")
    checks.finish()


def _split_plans(buf) -> int:
    """Plans of fast.c's KIND_SLOT_SPLIT (the key's kind word follows the head's 3 words)."""
    import numpy as np
    from mpipar.comm.agreement.fast_plan import _SLOT_SPLIT

    return sum(p.slots and int(np.frombuffer(p.key, np.int64)[3]) == _SLOT_SPLIT for p in buf.plans.values())


def rank_order_sum(xs):
    """((x0 + x1) + x2) + ..: each add rounded, as the C reduction adds the rows."""
    want = xs[0] + xs[1]
    for x in xs[2:]:
        want = want + x
    return want


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.int16, torch.int8, torch.bool], ids=str)
def test_split_all_reduce(slotted, checks, monkeypatch, dtype):
    """all_reduce in two steps (fast.c's KIND_SLOT_SPLIT: each rank reduces its chunk of the rows,
    a second exchange, every chunk copied out), forced for every size past the table's row: chunks
    of whole cache lines leave the last rank a shorter one, ending mid-line or not. Byte for byte
    against the serial reference; every op with a kernel; a split plan for each call."""
    from conftest import np_reduce, rank_tensor
    from mpipar.comm import tuning

    monkeypatch.setattr(tuning, "SLOT_SPLIT_BYTES", 0)
    g, calls, buf = slotted
    n, r = g.size, g.rank
    line = 64 // dtype.itemsize
    ops = ("sum",) if dtype.is_floating_point else ("sum", "max", "min")
    base = rows_of(dtype) * 3
    for k, count in enumerate((base, base + 1, base + line * n - 1, base * 2 + line + 3, 40_001)):
        for op in ops:
            xs = [rank_tensor((count,), dtype, q, seed=k) for q in range(n)]
            x = xs[r].clone()
            splits = _split_plans(buf)
            checks.true(comm.all_reduce(x, g, op=op) is x, "returns its argument")
            same_bytes(checks, x, np_reduce(xs, op), f"{dtype} {count} {op}")
            checks.true(_split_plans(buf) == splits + 1, f"{dtype} {count} {op}: a split plan")
    checks.finish()


def test_split_all_reduce_is_rank_order_on_every_rank(slotted, checks):
    """Sums that round (random normal float32): every rank holds ((x0 + x1) + x2) + .., rounded
    after each add, as the table's small all-reduce; the split and the one-step slot paths agree."""
    from mpipar.comm import tuning

    g, calls, buf = slotted
    n, r = g.size, g.rank
    count = tuning.SLOT_SPLIT_BYTES // 4 + 1001  # past the split size
    xs = [torch.randn(count, generator=torch.Generator().manual_seed(31 + q)) for q in range(n)]
    want = rank_order_sum(xs)
    splits = _split_plans(buf)
    x = xs[r].clone()
    comm.all_reduce(x, g)
    same_bytes(checks, x, want, "split")
    checks.true(_split_plans(buf) == splits + 1, "a split plan")
    y = xs[r][:tuning.SLOT_SPLIT_BYTES // 4].clone()  # at the split size: one step
    comm.all_reduce(y, g)
    same_bytes(checks, y, want[:y.numel()], "one step")
    checks.true(_split_plans(buf) == splits + 1, "no split plan at the split size")
    # from 2 MiB fast.c copies with non-temporal stores: an odd length, and a tensor whose data
    # starts 4 bytes past a 16-byte boundary (the copy's unaligned head)
    big = (2 << 20) // 4 + 1037
    zs = [torch.randn(big + 1, generator=torch.Generator().manual_seed(71 + q))[1:] for q in range(n)]
    want = rank_order_sum(zs)
    z = torch.empty(big + 1)[1:].copy_(zs[r])
    checks.true(z.is_contiguous() and z.data_ptr() % 16 != 0, "an unaligned contiguous tensor")
    comm.all_reduce(z, g)
    same_bytes(checks, z, want, "2 MiB and more, unaligned")
    checks.finish()


def test_streamed_slot_calls(slotted, checks):
    """Calls of 2 MiB and more, whose copies into and out of the slots use non-temporal stores
    (fast.c's stream_copy): broadcast in place into a tensor 4 bytes past a 16-byte boundary,
    all_gather of odd pieces, reduce_scatter; each the serial reference's result, in the slots."""
    g, calls, buf = slotted
    n, r = g.size, g.rank
    count = (2 << 20) // 4 + 2 * n + 1  # past 2 MiB of float32, odd
    xs = [torch.randn(count, generator=torch.Generator().manual_seed(5 + q)) for q in range(n)]
    plans = slot_plans(buf)
    t = torch.empty(count + 1)[1:].copy_(xs[r])
    checks.true(t.data_ptr() % 16 != 0, "unaligned")
    checks.true(comm.broadcast(t, g, root=n - 1) is t, "returns its argument")
    same_bytes(checks, t, xs[n - 1], "broadcast")
    same_bytes(checks, comm.all_gather(xs[r], g), torch.cat(xs), "all_gather")
    flat = count - count % n
    want = rank_order_sum([x[:flat] for x in xs])
    same_bytes(checks, comm.reduce_scatter(xs[r][:flat].clone(), g), want.chunk(n)[r], "reduce_scatter")
    checks.true(slot_plans(buf) - plans == 3, f"{slot_plans(buf) - plans} slot plans")
    checks.finish()


def test_a_noncontiguous_rank_takes_the_slots_too(slotted, checks):
    """Rank 0's tensor is not contiguous (a transposed copy): it takes the same C call from a
    contiguous copy, and every rank gets the serial reference's result."""
    from conftest import rank_tensor

    g, calls, buf = slotted
    n, r = g.size, g.rank
    for k, (name, dtype, shape, kw, _) in enumerate(cases(n)):
        xs = [rank_tensor(shape, dtype, q, seed=k) for q in range(n)]
        if dtype not in (torch.float32, torch.int8) or not in_slots(name, dtype, kw, xs[r]):
            continue
        x = xs[r].clone()
        if r == 0:
            x = x.transpose(0, -1).contiguous().transpose(0, -1)
        before = calls["run"]
        got = run_op(name, x, g, kw)
        checks.true(calls["run"] == before + 1, f"{name} {kw}: the C call on rank {r}")
        same_bytes(checks, got.contiguous(), serial(name, xs, r, n, kw), f"{name} {dtype} {shape} {kw}")
    checks.finish()


def test_slot_calls_disagreeing_raise_on_every_rank(slotted, checks):
    """Arguments that differ on the last rank: MpiparError on every rank from the C call's
    agreement, and the group goes on (the next call's slots are sound)."""
    g, calls, _ = slotted
    last = g.rank == g.size - 1
    extra = [("broadcast root", lambda: comm.broadcast(torch.ones(ROWS * 3), g, root=int(last))),
             ("all_reduce shape", lambda: comm.all_reduce(torch.ones(ROWS * 3 + last), g))]
    raise_on_every_rank(checks, g, calls, disagreeing_calls(g) + extra)
    checks.finish()


def test_slot_calls_back_to_back(slotted, checks):
    """Calls of every op back to back, new data each time, with the agreement's other exchanges
    (a small all-reduce in C, a Python-path agreement) in between: each result is its own call's,
    so neither parity of a rank's slots is overwritten while a peer still reads it."""
    from mpipar.comm import tuning

    g, calls, buf = slotted
    n, r = g.size, g.rank
    big = ROWS * 3
    for it in range(12):
        root = it % n
        x = torch.full((big,), float(100 * it + r))
        checks.equal(comm.broadcast(x, g, root=root), torch.full((big,), float(100 * it + root)), f"bcast {it}")
        got = comm.all_gather(torch.full((big,), float(it + r)), g)
        checks.equal(got, torch.cat([torch.full((big,), float(it + q)) for q in range(n)]), f"all_gather {it}")
        got = comm.reduce_scatter(torch.full((n * big,), float(it * r)), g)
        checks.equal(got, torch.full((big,), float(it * n * (n - 1) // 2)), f"reduce_scatter {it}")
        if it % 3 == 0:
            small = torch.full((4,), float(r))
            checks.equal(comm.all_reduce(small, g), torch.full((4,), float(n * (n - 1) // 2)), f"all_reduce {it}")
        if it % 4 == 1:  # an agreement on the Python path (a bad dtype for the C kernels: bfloat16 sum)
            y = torch.full((n * 8,), float(r), dtype=torch.bfloat16)
            checks.equal(comm.reduce_scatter(y, g).float(), torch.full((8,), float(n * (n - 1) // 2)), f"bf16 {it}")
        a = torch.arange(n * big, dtype=torch.float32) + 1000 * it + 10 * r
        want = torch.cat([(torch.arange(n * big, dtype=torch.float32) + 1000 * it + 10 * q).chunk(n)[r]
                          for q in range(n)])
        checks.equal(comm.all_to_all(a, g, 0, 0), want, f"all_to_all {it}")
        if it % 2:  # a split all-reduce: two exchanges in one call
            z = torch.full((tuning.SLOT_SPLIT_BYTES // 4 + 3,), float(it + r))
            checks.equal(comm.all_reduce(z, g), torch.full_like(z, float(n * it + n * (n - 1) // 2)), f"split {it}")
    checks.true(slot_plans(buf) >= 5, f"{slot_plans(buf)} slot plans")
    checks.finish()


def test_slot_all_gather_uneven_pieces(slotted, checks):
    """Pieces of different sizes (each past the row; one within it; one past the slots): the C
    call agrees, then every rank finishes on the Python path (MPI's gather of the sizes)."""
    from mpipar.comm import tuning

    g, calls, _ = slotted
    n, r = g.size, g.rank
    big, past = ROWS * 3, tuning.SLOT_BYTES["all_gather"] // 4 + 1
    for what, size in (("past the row", lambda q: big + q), ("one within the row", lambda q: 8 if q == 0 else big),
                       ("one past the slots", lambda q: (past if q == n - 1 else big))):
        got = comm.all_gather(torch.full((size(r),), float(r)), g)
        want = torch.cat([torch.full((size(q),), float(q)) for q in range(n)])
        checks.equal(got, want, what)
    checks.finish()


def test_slot_all_gather_out(slotted, checks):
    """all_gather(out=): separate, this rank's own slice of out, the next rank's slice (aliased):
    all take the slots and fill out, its version bumped; an out of the wrong size raises the
    same MpiparError on every rank; an out that requires grad raises as on the Python path."""
    g, calls, _ = slotted
    n, r = g.size, g.rank
    rows = ROWS
    gather_into(checks, g, calls, aliased_in_c=True)
    with pytest.raises(MpiparError, match="out must be"):
        comm.all_gather(torch.ones(rows, 3), g, out=torch.empty(n * rows + 1, 3))
    with pytest.raises(RuntimeError):
        comm.all_gather(torch.ones(rows, 3), g, out=torch.zeros(n * rows, 3, requires_grad=True))
    want = torch.arange(n, dtype=torch.float32).repeat_interleave(rows * 3).reshape(n * rows, 3)
    checks.equal(comm.all_gather(torch.full((rows, 3), float(r)), g), want, "after")
    checks.finish()


def test_slot_broadcast_in_place(slotted, checks):
    """broadcast of a leaf that requires grad (version bumped off the root only), and of a tensor
    that is not contiguous off the root (root's values written back into it)."""
    g, calls, _ = slotted
    r, root = g.rank, g.size - 1
    leaf = torch.full((ROWS * 3,), float(r), requires_grad=True)
    version = leaf._version
    checks.true(comm.broadcast(leaf, g, root=root) is leaf, "returns its argument")
    checks.equal(leaf.detach(), torch.full((ROWS * 3,), float(root)), "root's values")
    checks.true((leaf._version > version) == (r != root), f"version {version} -> {leaf._version}")
    base = torch.full((3, ROWS), float(r))
    t = base.t()  # (ROWS, 3), not contiguous
    checks.true(comm.broadcast(t, g, root=0) is t, "returns its argument")
    checks.equal(base, torch.zeros(3, ROWS), "root 0's values, in the strided tensor")
    checks.finish()


def test_a_symmetric_pool_keeps_the_zero_copy_sizes_off_the_slots(slotted, checks):
    """Once the group has a symmetric pool, calls of the sizes where symmetric tensors take the
    zero-copy path (tuning.shm_pays_over_slots: the agreement's table decides it) plan without the
    slots, plain and symmetric tensors alike; smaller ones keep them, symmetric tensors included,
    and a broadcast keeps them at every size. The results are the same."""
    from mpipar.comm import tuning

    g, calls, buf = slotted
    n, r = g.size, g.rank
    small = n * ROWS * 3  # a reduce_scatter input below the zero-copy crossover
    large = -(-tuning.SLOT_SHM_CROSSOVER_BYTES["reduce_scatter"] // (4 * n)) * n  # at it or just past
    checks.true(small * 4 < tuning.SLOT_SHM_CROSSOVER_BYTES["reduce_scatter"] <= large * 4
                <= tuning.SLOT_BYTES["reduce_scatter"], "sizes")
    sym = {k: comm.symmetric_empty((k,), torch.float32, g) for k in (small, large)}
    for k in (small, large):
        want = torch.full((k // n,), float(n * (n - 1) // 2))
        for kind, x in (("plain", torch.full((k,), float(r))), ("symmetric", sym[k].fill_(float(r)))):
            plans = slot_plans(buf)
            checks.equal(comm.reduce_scatter(x, g), want, f"{kind} {k}")
            if kind == "plain":  # (the symmetric tensor's call shape is the plain one's: its plan is made)
                checks.true(slot_plans(buf) - plans == int(k == small), f"{kind} {k}: slots {k == small}")
    total = n * (n - 1) // 2
    for count, slots in ((ROWS * 3, True), (tuning.SLOT_SHM_CROSSOVER_BYTES["all_reduce"] // 4, False)):
        y = sym[large][:count].fill_(float(r))  # symmetric: in the slots below the crossover, else zero-copy
        plans = slot_plans(buf)
        checks.equal(comm.all_reduce(y, g), torch.full((count,), float(total)), f"all_reduce {count}")
        checks.true(slot_plans(buf) - plans == int(slots), f"all_reduce {count}: slots {slots}")
    for kind, x in (("plain", torch.full((large,), float(r))), ("symmetric", sym[large].fill_(float(r)))):
        plans = slot_plans(buf)  # a broadcast as large as the reduce_scatter's: in the slots
        checks.equal(comm.broadcast(x, g, root=n - 1), torch.full((large,), float(n - 1)), f"broadcast {kind}")
        checks.true(kind == "symmetric" or slot_plans(buf) - plans == 1, f"broadcast {kind}: slots")
    checks.finish()
