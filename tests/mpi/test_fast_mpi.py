"""Larger broadcast, all_gather, reduce_scatter and all_to_all in one C call: the agreement, then
MPI's own collective (fast.c's KIND_MPI, planned in mpipar.comm.agreement.fast_ops).

Where collectives.py's Python path would agree and then call MPI's blocking MPI_Bcast,
MPI_Allgather, MPI_Reduce_scatter_block or MPI_Alltoall, the C call does both (and, where
MPI's contiguous blocks are not the result's, copies MPI's pieces from a scratch buffer into
the result). Checked against that Python path and a serial reference, byte for byte: every
dtype MPI carries for mpipar (bfloat16 and float16 as int16, bool as uint8), each op, every
kind of dim, out= and the in-place all-gather; a rank on the Python path meeting C ranks;
a disagreement found in the C call raising on every rank.
"""
from __future__ import annotations

import pytest
import torch

from mpipar import MpiparError, comm
from mpipar.comm.agreement.inline import INLINE_BYTES
from mpi4py import MPI
from test_inline import (both_paths, fast_group, inline_buffers_shared, mixed_paths,  # noqa: F401
                         same_bytes, serial)  # (fast_group: a fixture)

pytestmark = pytest.mark.mpi


@pytest.fixture(autouse=True)
def no_payload_slots(monkeypatch):
    """These calls would ride in the payload slots where ranks outnumber cores (tuning.SLOT_BYTES,
    tested in test_payload_slots.py): here MPI's collective moves them, as past the slots' sizes.
    (Each test's group is new, so no plan was made with the slots.)"""
    from mpipar.comm import tuning

    monkeypatch.setattr(tuning, "SLOT_BYTES", {})

DTYPES = [torch.float32, torch.float64, torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool,
          torch.bfloat16, torch.float16]
ROWS = INLINE_BYTES // 12 + 5  # rows of 3 float32: past the table's slot


def rows_of(dtype) -> int:
    """Rows of 3 elements past the table's slot (INLINE_BYTES) in `dtype`."""
    return INLINE_BYTES // (3 * dtype.itemsize) + 5


def bits(t: torch.Tensor) -> torch.Tensor:
    """`t` with its bytes as a dtype numpy has (bfloat16, float16: int16), shape kept."""
    return t.view(torch.int16) if t.dtype in (torch.bfloat16, torch.float16) else t


def checked_paths(checks, g, calls, name, xs, kw, what):
    """(result, C call taken) of this rank's call on xs[g.rank], its bytes checked against the
    Python path's and the serial reference's."""
    got, want, took_c = both_paths(g, calls, name, xs[g.rank], kw)
    same_bytes(checks, bits(got), bits(want.contiguous()), what + " vs the Python path")
    same_bytes(checks, bits(got), bits(serial(name, xs, g.rank, g.size, kw)), what + " vs serial")
    return got, took_c


def cases(n):
    """(name, dtype, shape, kwargs, whether the C call moves it with MPI)."""
    for dtype in DTYPES:
        rows = rows_of(dtype)
        for root in (0, n - 1):
            yield "broadcast", dtype, (rows, 3), {"root": root}, True
        # MPI's blocks are the result's (the dims before dim are 1), or C rearranges them from scratch
        yield "all_gather", dtype, (rows, 3), {"dim": 0}, True
        yield "all_gather", dtype, (1, rows, 3), {"dim": 1}, True
        yield "all_gather", dtype, (rows, 3), {"dim": 1}, True
        yield "all_gather", dtype, (2, rows, 3), {"dim": -2}, True  # sequence parallel's gather
        reduces = dtype not in (torch.bool, torch.bfloat16, torch.float16)  # (reduced in another dtype)
        for op in ("sum", "max", "min"):
            yield "reduce_scatter", dtype, (n * rows, 3), {"dim": 0, "op": op}, reduces
        yield "reduce_scatter", dtype, (3, n * rows), {"dim": 1, "op": "sum"}, reduces  # (the input permuted)
        yield "reduce_scatter", dtype, (2, n * rows, 3), {"dim": -2, "op": "max"}, reduces
        yield "reduce_scatter", dtype, (n * rows + 1, 3), {"dim": 0, "op": "sum"}, False  # uneven slices
        yield "all_to_all", dtype, (n * rows, 3), {"scatter_dim": 0, "gather_dim": 0}, True
        yield "all_to_all", dtype, (n * rows, 3), {"scatter_dim": 0, "gather_dim": 1}, True
        yield "all_to_all", dtype, (3, n * rows), {"scatter_dim": 1, "gather_dim": 0}, True
        yield "all_to_all", dtype, (2, 2 * n, rows // 2, 3), {"scatter_dim": 1, "gather_dim": 2}, True  # Ulysses'
        yield "all_to_all", dtype, (2, rows, 2 * n, 3), {"scatter_dim": -2, "gather_dim": -2}, True
        if dtype is torch.float32:  # MPI's pieces past the group's spare scratch (a recycled output instead)
            yield "all_gather", dtype, (2, 12000, 3), {"dim": -2}, True
            yield "all_to_all", dtype, (2, 2 * n, 6000, 3), {"scatter_dim": 1, "gather_dim": 2}, True


def test_mpi_calls_are_the_python_path_bit_for_bit(fast_group, world, checks):
    """The C call with MPI's collective against the Python path and a serial reference: the same
    dtype, shape, layout and bytes on every rank, and the C call taken exactly where MPI's
    contiguous blocks are the result's."""
    from conftest import rank_tensor

    g, calls = fast_group
    if g.size == 1:
        pytest.skip("a single rank communicates nothing")
    n, r = g.size, g.rank
    for k, (name, dtype, shape, kw, mpi) in enumerate(cases(n)):
        xs = [rank_tensor(shape, dtype, q, seed=k) for q in range(n)]
        checks.true(xs[r].numel() * xs[r].element_size() > INLINE_BYTES, f"{name} {dtype} {shape}: not past the slot")
        what = f"{name} {dtype} {shape} {kw}"
        got, took_c = checked_paths(checks, g, calls, name, xs, kw, what)
        # (the C call's result is contiguous; the Python all_to_all's may be a strided view)
        checks.true(got.is_contiguous(), f"{what}: not contiguous")
        checks.true(got.dtype == dtype, f"{what}: {got.dtype}")
        checks.true(took_c == mpi, f"{what}: C path taken: {took_c}")
    blobs = world.allgather(calls["run"])
    checks.true(all(b == blobs[0] for b in blobs), "ranks took different paths")
    checks.finish()


def test_mpi_all_gather_out_and_in_place(fast_group, checks):
    """all_gather(out=): a separate piece and this rank's own slice of `out` (MPI_IN_PLACE) both
    take the C call and fill `out`, its version bumped; a piece that overlaps `out` elsewhere
    takes the Python path (MPI forbids aliased buffers) and gets the same result."""
    g, calls = fast_group
    if g.size == 1:
        pytest.skip("a single rank communicates nothing")
    gather_into(checks, g, calls, aliased_in_c=False)
    checks.finish()


def gather_into(checks, g, calls, aliased_in_c: bool) -> None:
    """all_gather(out=) of a separate piece, of this rank's own slice of out, and of the next
    rank's slice of out holding this rank's values (aliased): out filled, its version bumped, the
    C call taken (the aliased one where `aliased_in_c`)."""
    n, r = g.size, g.rank
    rows = ROWS
    want = torch.arange(n, dtype=torch.float32).repeat_interleave(rows * 3).reshape(n * rows, 3)
    for how in ("separate", "in place", "aliased"):
        buf = torch.full((n * rows, 3), -1.0)
        if how == "separate":
            piece = torch.full((rows, 3), float(r))
        else:
            q = r if how == "in place" else (r + 1) % n
            piece = buf[rows * q:rows * (q + 1)]
        piece.fill_(float(r))
        version, before = buf._version, calls["run"]
        got = comm.all_gather(piece, g, out=buf)
        checks.true(got is buf and calls["run"] == before + int(how != "aliased" or aliased_in_c), f"{how}: C call")
        checks.equal(buf, want, how)
        checks.true(buf._version > version, f"{how}: version bumped")


def test_mpi_broadcast_writes_in_place(fast_group, checks):
    """broadcast of a large leaf that requires grad: root's values everywhere, the version bumped
    off the root only, the argument returned."""
    g, calls = fast_group
    if g.size == 1:
        pytest.skip("a single rank communicates nothing")
    r, root = g.rank, g.size - 1
    leaf = torch.full((ROWS * 3,), float(r), requires_grad=True)
    version, before = leaf._version, calls["run"]
    out = comm.broadcast(leaf, g, root=root)
    checks.true(out is leaf and calls["run"] == before + 1, "C call, returns its argument")
    checks.equal(leaf.detach(), torch.full((ROWS * 3,), float(root)), "root's values")
    checks.true((leaf._version > version) == (r != root), f"version {version} -> {leaf._version}")
    checks.finish()


def test_mpi_calls_meet_the_python_path(fast_group, world, checks, monkeypatch):
    """Rank 0's tensor is not contiguous (the Python path: agreement, then the same blocking MPI
    collective on the same bytes), the others' are (the C call): the serial reference's results.
    Only where mpipar takes the C path at all (test_inline.test_fast_and_python_paths_meet). No
    all_to_all reads its peers' inputs here (every rank takes that C call: test_cma.py)."""
    from mpipar.comm import tuning

    monkeypatch.setattr(tuning, "CMA_BYTES", {})
    g, calls = fast_group
    if g.size == 1:
        pytest.skip("a single rank communicates nothing")
    if not world.allreduce(not g.oversubscribed or inline_buffers_shared(g), op=MPI.LAND):
        pytest.skip("ranks outnumber cores on several nodes: mpipar does not take the C path here")
    for k, (name, dtype, shape, kw, mpi) in enumerate(cases(g.size)):
        if mpi and dtype in (torch.float32, torch.int8):
            mixed_paths(checks, g, calls, name, dtype, shape, kw, k, True)
    checks.finish()


def test_mpi_calls_disagreeing_raise_on_every_rank(fast_group, checks):
    """Arguments that differ on the last rank are found in the C call's agreement, before any
    data moves: MpiparError on every rank, and the group goes on."""
    g, calls = fast_group
    if g.size == 1:
        pytest.skip("a single rank communicates nothing")
    raise_on_every_rank(checks, g, calls, disagreeing_calls(g))
    checks.finish()


def disagreeing_calls(g) -> list:
    """(what, call): calls past the table's row whose arguments differ on the last rank."""
    n, last = g.size, g.rank == g.size - 1
    big = ROWS * 3
    return [
        ("broadcast shape", lambda: comm.broadcast(torch.ones(big + last), g)),
        ("broadcast dtype", lambda: comm.broadcast(torch.ones(big, dtype=torch.float64 if last else torch.float32), g)),
        ("all_gather dtype", lambda: comm.all_gather(torch.ones(big, dtype=torch.int32 if last else torch.int64), g)),
        ("reduce_scatter shape", lambda: comm.reduce_scatter(torch.ones(n * (big + last)), g)),
        ("reduce_scatter op", lambda: comm.reduce_scatter(torch.ones(n * big), g, op="max" if last else "sum")),
        ("all_to_all shape", lambda: comm.all_to_all(torch.ones(n * (big + last)), g, 0, 0)),
    ]


def raise_on_every_rank(checks, g, calls, cases_) -> None:
    """Each call raises MpiparError ("differ") on every rank from the C call's agreement, and a
    reduce_scatter right after it is right (the group goes on)."""
    n, r = g.size, g.rank
    big = ROWS * 3
    for what, call in cases_:
        before = calls["run"]
        try:
            call()
            checks.true(False, f"{what}: no error")
        except MpiparError as e:
            checks.true("differ" in str(e), f"{what}: {e}")
        checks.true(calls["run"] == before + 1, f"{what}: the disagreement found in the C call")
        x = torch.full((n * big,), float(r))
        checks.equal(comm.reduce_scatter(x, g), torch.full((big,), float(n * (n - 1) // 2)), f"after {what}")


def test_mpi_calls_keep_the_python_path_where_it_waits_otherwise(fast_group, checks, monkeypatch):
    """2 MiB calls: where ranks outnumber cores, broadcast waits politely (a polled non-blocking
    collective, crowded.stays_polite) and all_to_all does not, and "auto" stages all_gather and reduce_scatter
    through shared memory (tuning.stages_in_shm, on groups that agree through shared memory):
    those keep the Python path, since a blocking MPI collective does not match a non-blocking
    one. Elsewhere MPI's blocking collective moves them (unless "auto" picks the ring, which it
    does not below the staging window where ranks outnumber cores: crowded.choose). No all_to_all
    reads its peers' inputs here (test_cma.py)."""
    from mpipar.comm import tuning
    from mpipar.comm.agreement import inline
    from mpipar.comm.backends import crowded

    monkeypatch.setattr(tuning, "CMA_BYTES", {})

    g, calls = fast_group
    if g.size == 1:
        pytest.skip("a single rank communicates nothing")
    n = g.size
    numel = -(-(2 << 20) // (4 * n)) * n  # 2 MiB of float32 or just past, divisible by n
    staged = inline.buffers(g).shared
    for name in ("all_gather", "reduce_scatter"):  # crowded: MPI's collective below the window, not the ring
        checks.true(not staged or crowded.choose(g, name, "auto", 4 << 20) == "mpi", f"{name}: crowded choice")
    for name, call, nbytes in (
            ("broadcast", lambda: comm.broadcast(torch.ones(numel), g), numel * 4),
            ("all_to_all", lambda: comm.all_to_all(torch.ones(numel), g, 0, 0), numel * 4),
            ("all_gather", lambda: comm.all_gather(torch.ones(numel // n), g), numel * 4),
            ("reduce_scatter", lambda: comm.reduce_scatter(torch.ones(numel), g), numel * 4)):
        if name in ("broadcast", "all_to_all"):
            expect = not (g.oversubscribed and crowded.stays_polite(name, nbytes))
        else:
            expect = (crowded.choose(g, name, "auto", nbytes) == "mpi"
                      and not (staged and tuning.stages_in_shm(name, nbytes)))
        before = calls["run"]
        call()
        made = calls["run"] - before
        checks.true((made == 1) == expect, f"{name}: C calls {made}, expected {int(expect)}")
    # the two paths wait the same way: rank 0 on the Python path, the others in C (blocking both)
    rows = -(-(2 << 20) // (12 * n)) * n  # (rows, 3) float32: 2 MiB or just past, rows divisible by n
    blocking = not (g.oversubscribed and crowded.stays_polite("all_to_all", rows * 12))
    mixed_paths(checks, g, calls, "all_to_all", torch.float32, (rows, 3), {"scatter_dim": 0, "gather_dim": 0}, 7,
                blocking)
    checks.finish()
