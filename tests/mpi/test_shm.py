"""Shared-memory collectives on symmetric tensors (mpipar.comm.symmetric.collectives, mpipar.comm.symmetric.pool).

Every rank rebuilds every other rank's input (`rank_tensor`: multiples of 1/4,
so float sums are exact) and compares with a numpy reference rounded once to
the dtype. Sizes are not divisible by the world size, and a 1 KiB chunk size
makes even small tensors walk several chunks. Each test checks (through the
pool's call counter) that the shared-memory path really ran.
"""
from __future__ import annotations

import os

import pytest
import torch
from conftest import SHM_COUNTS, np_reduce, rank_tensor, same_on_all_ranks

from mpipar import MpiparError, comm, settings
from mpipar.comm import tuning
from mpipar.comm.symmetric import compiled as shm_compiled, pool as symmetric
from mpipar.device import node_is_oversubscribed
from mpipar.mesh import Group

pytestmark = pytest.mark.mpi

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16,
          torch.int32, torch.int64, torch.int8, torch.uint8, torch.bool]
OPS = ["sum", "max", "min"]


def _new_group(name):
    from mpi4py import MPI

    with settings.override(fake_ranks_per_node=None):
        g = Group(MPI.COMM_WORLD.Dup(), name)
        comm.symmetric_empty((1,), torch.float32, g)  # creates the pool now
    return g


def _close(g):
    symmetric.free_symmetric(g)
    g.comm.Free()


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    """1 KiB shm chunks: small tensors walk several chunks; "auto" takes shm at every size."""
    monkeypatch.setenv("MPIPAR_SHM_CHUNK_BYTES", "1024")
    for op in ("ALL_REDUCE", "ALL_GATHER", "REDUCE_SCATTER", "BROADCAST"):
        monkeypatch.setenv(f"MPIPAR_SHM_CROSSOVER_{op}", "0")


@pytest.fixture(scope="module")
def shared_group():
    """One Group for the module: its pooled windows are reused from test to test."""
    g = _new_group("shm-test")
    yield g
    _close(g)


@pytest.fixture
def group(shared_group, shm_counts):
    """The module's Group, its shared-memory calls counted from zero (`calls`)."""
    return shared_group


@pytest.fixture
def fresh_group():
    """A Group of its own (its own pool, so windows can be counted); freed at teardown."""
    g = _new_group("shm-fresh")
    yield g
    _close(g)


def calls(g, op, how="shm") -> int:
    return SHM_COUNTS.calls(g, op, how)


def sym(g, src: torch.Tensor) -> torch.Tensor:
    t = comm.symmetric_empty(src.shape, src.dtype, g)
    t.copy_(src)
    return t


@pytest.mark.parametrize("kernel", ["fused", "numpy"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op", OPS)
def test_all_reduce(group, checks, op, dtype, kernel, monkeypatch):
    """Both kernels: the compiled one-pass sum (mpipar.comm.symmetric.compiled) where it applies, and numpy."""
    monkeypatch.setenv("MPIPAR_SHM_COMPILED", "1" if kernel == "fused" else "0")
    n = group.size
    fused = kernel == "fused" and n > 1 and shm_compiled.kernel(dtype, op) is not None
    checks.true(fused or kernel == "numpy" or n == 1 or op != "sum" or dtype not in shm_compiled.TYPES
                or shm_compiled.compiler() is None, "the fused kernel did not build")
    for shape in [(1,), (3, 5, 41), (2 * n + 1, 333)]:
        ins = [rank_tensor(shape, dtype, r, seed=1) for r in range(n)]
        t = sym(group, ins[group.rank])
        before, before_fused = calls(group, "all_reduce"), calls(group, "all_reduce", "fused")
        out = comm.all_reduce(t, group, op=op)
        checks.true(out is t, "all_reduce returns its input")
        checks.equal(t, np_reduce(ins, op), f"{shape} {op} {dtype} {kernel}")
        checks.true(n == 1 or calls(group, "all_reduce") == before + 1, "shm path not taken")
        checks.true(calls(group, "all_reduce", "fused") == before_fused + fused, f"fused kernel ran: {not fused}")


def half_inputs(n, dtype):
    """Rank 0 holds a big value, the others 1s: summed in bf16/fp16 step by step the 1s vanish;
    summed in float32 and rounded once (the reference) they do not (for 3+ ranks)."""
    big = 256.0 if dtype is torch.bfloat16 else 2048.0
    return [torch.full((300,), big if k == 0 else 1.0, dtype=dtype) for k in range(n)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_precision_rounds_once(group, checks, dtype):
    ins = half_inputs(group.size, dtype)
    t = sym(group, ins[group.rank])
    comm.all_reduce(t, group)
    checks.equal(t, np_reduce(ins, "sum"), "all_reduce")
    out = comm.reduce_scatter(sym(group, ins[group.rank]), group)
    checks.equal(out, torch.tensor_split(np_reduce(ins, "sum"), group.size)[group.rank], "reduce_scatter")


def test_owner_slices_cover_and_align():
    from mpipar.comm.symmetric.kernels import owner_slices

    for numel, parts, item in [(0, 3, 4), (1, 4, 2), (1000, 3, 4), (4099, 4, 8), (17, 2, 1)]:
        s = owner_slices(numel, parts, item)
        assert len(s) == parts and s[0][0] == 0 and s[-1][1] == numel
        assert all(a[1] == b[0] for a, b in zip(s, s[1:]))
        assert all(lo * item % 64 == 0 or lo == numel for lo, _ in s)


@pytest.fixture(params=["plain", "pooled"])
def output(request, monkeypatch):
    """Reduce-scatter/all-gather outputs: plain torch.empty, or pooled windows (all-gather pushes)."""
    if request.param == "pooled":
        monkeypatch.setenv("MPIPAR_SHM_POOLED_OUTPUT_BYTES", "1")
    return request.param


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("dim", [0, 1, -1])
def test_reduce_scatter(group, checks, output, dim, dtype):
    n = group.size
    shape = [2 * n + 1, n + 2, 5]  # never divisible by n along dim 0 for n > 1
    ins = [rank_tensor(shape, dtype, r, seed=2) for r in range(n)]
    for op in OPS:
        t = sym(group, ins[group.rank])
        out = comm.reduce_scatter(t, group, dim=dim, op=op)
        want = torch.tensor_split(np_reduce(ins, op), n, dim=dim)[group.rank]
        checks.equal(out, want.contiguous(), f"dim {dim} {op} {dtype}")
        checks.equal(t, ins[group.rank], "reduce_scatter must not modify its input")
    checks.true(n == 1 or calls(group, "reduce_scatter") == 3, "shm path not taken")


@pytest.fixture(params=["numpy", "streaming"])
def copies(request, monkeypatch, shm_counts):
    """Copies of every size stream (non-temporal stores, mpipar.comm.symmetric.compiled.copy), or none.
    Returns a function: how many copies streamed since the fixture was set up."""
    monkeypatch.setenv("MPIPAR_SHM_STREAM_BYTES", "1" if request.param == "streaming" else str(1 << 62))
    start = shm_counts.streamed
    return lambda: shm_counts.streamed - start


def streams(group) -> bool:
    return group.size > 1 and os.environ["MPIPAR_SHM_STREAM_BYTES"] == "1" and shm_compiled.streaming()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("dim", [0, 1, -1])
def test_all_gather(group, checks, output, dim, dtype, copies):
    n = group.size
    ins = [rank_tensor((3, 2 * n + 1, 7), dtype, r, seed=3) for r in range(n)]
    out = comm.all_gather(sym(group, ins[group.rank]), group, dim=dim)
    checks.equal(out, torch.cat(ins, dim=dim), f"dim {dim} {dtype}")
    checks.true(n == 1 or calls(group, "all_gather") == 1, "shm path not taken")
    if dim == 0:  # one contiguous piece per rank: n streaming copies (pull every piece, or push into every output)
        checks.true(copies() == n * streams(group), f"{copies()} copies streamed")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int8, torch.bool], ids=str)
def test_broadcast(group, checks, dtype, copies):
    n = group.size
    ins = [rank_tensor((5, 37), dtype, r, seed=4) for r in range(n)]
    t = comm.symmetric_empty((5, 37), dtype, group)
    for root in range(n):
        t.copy_(ins[group.rank])
        comm.broadcast(t, group, root=root)
        checks.equal(t, ins[root], f"root {root} {dtype}")
    checks.true(n == 1 or calls(group, "broadcast") == n, "shm path not taken")
    checks.true(copies() == (n - 1) * streams(group), f"{copies()} copies streamed")


def test_forced_shm_on_plain_tensors(group, checks, output):
    """algorithm="shm" also works on ordinary (even non-contiguous) tensors, through a scratch window."""
    n, r = group.size, group.rank
    ins = [rank_tensor((9, 2 * n + 1), torch.bfloat16, k, seed=5).t() for k in range(n)]
    t = ins[r].clone().t().contiguous().t()  # non-contiguous, own storage
    comm.all_reduce(t, group, algorithm="shm")
    checks.equal(t, np_reduce(ins, "sum"), "all_reduce")
    out = comm.reduce_scatter(ins[r], group, dim=0, algorithm="shm")
    checks.equal(out, torch.tensor_split(np_reduce(ins, "sum"), n, dim=0)[r].contiguous(), "reduce_scatter")
    uneven = [rank_tensor((k + 1, 3), torch.float32, k, seed=6) for k in range(n)]
    out = comm.all_gather(uneven[r], group, dim=0, algorithm="shm")
    checks.equal(out, torch.cat(uneven), "all_gather of unequal sizes")
    checks.true(n == 1 or calls(group, "all_gather") == 1, "shm path not taken")


def test_auto_ignores_plain_tensors_and_small_sizes(group, checks, monkeypatch):
    n = group.size
    comm.symmetric_empty((4,), torch.float32, group)  # the group now has a pool
    plain = torch.ones(10)
    comm.all_reduce(plain, group)
    checks.equal(plain, torch.full((10,), float(n)), "plain tensor")
    checks.true(calls(group, "all_reduce") == 0, "auto used shm for a non-symmetric tensor")
    monkeypatch.delenv("MPIPAR_SHM_CROSSOVER_ALL_REDUCE")  # the default crossover (just above 4 KiB)
    small = sym(group, torch.ones(10))
    comm.all_reduce(small, group)
    checks.equal(small, torch.full((10,), float(n)), "below crossover")
    checks.true(calls(group, "all_reduce") == 0, "auto used shm below the crossover")
    from mpipar.comm.agreement import inline

    # where the group's table has payload slots (crowded ranks), smaller tensors ride in them
    crossover = (tuning.SLOT_SHM_CROSSOVER_BYTES if inline.buffers(group).slot_bytes
                 else tuning.SHM_CROSSOVER_BYTES)["all_reduce"]
    big = sym(group, torch.ones(-(-crossover // 4)))  # the first size at or above it
    comm.all_reduce(big, group)
    checks.equal(big, torch.full_like(big, float(n)), "at the crossover")
    checks.true(calls(group, "all_reduce") == (n > 1), "auto did not use shm at the crossover")


def test_results_bit_identical_on_every_rank(group, checks):
    gen = torch.Generator().manual_seed(100 + group.rank)
    for dtype in (torch.float32, torch.bfloat16):
        t = sym(group, torch.randn(4099, generator=gen).to(dtype))
        comm.all_reduce(t, group)
        checks.true(same_on_all_ranks(group.comm, t.view(-1).view(torch.uint8).numpy().tobytes()),
                    f"{dtype} results differ between ranks")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_fused_and_numpy_kernels_agree_bit_for_bit(group, checks, monkeypatch, dtype):
    """Random floats (rounding in every add): the compiled kernel sums in numpy's order."""
    gen = torch.Generator().manual_seed(7 + group.rank)
    src = (torch.randn(70001, generator=gen, dtype=torch.float64) * 1e3).to(dtype)
    results = {}
    for setting in ("1", "0"):
        monkeypatch.setenv("MPIPAR_SHM_COMPILED", setting)
        t = sym(group, src)
        comm.all_reduce(t, group)
        results[setting] = t.numpy().tobytes()
    checks.true(results["1"] == results["0"], f"{dtype}: the fused kernel and numpy differ")
    checks.true(same_on_all_ranks(group.comm, results["1"]), f"{dtype}: results differ between ranks")


@pytest.mark.parametrize("validate", ["0", "1"])
def test_many_small_calls_race_free_and_no_window_leak(fresh_group, checks, monkeypatch, validate, shm_counts):
    """10,000 back-to-back calls (2,500 when ranks outnumber cores; MPIPAR_TEST_SHM_CALLS
    overrides) on 2 reused buffers: all-reduce, broadcast, reduce-scatter and all-gather
    in turn, the last two with pooled outputs (pushed into by peers). Writers and
    readers alternate: each broadcast has one writer (the root rotates) and n-1 readers;
    a rank that left a collective early (no exit barrier) or read too early (no entry
    barrier) would see another iteration's values. MPIPAR_VALIDATE=0 drops the
    argument-agreement collective, which would otherwise act as an extra entry barrier
    and hide a missing one; with it on (a quarter of the calls), all_reduce's entry
    exchange rides on the agreement Allgather (mpipar.comm.agreement.inline), which must then be
    a sufficient entry barrier. Pool windows are counted: reused, never piling up."""
    monkeypatch.setenv("MPIPAR_VALIDATE", validate)
    monkeypatch.setenv("MPIPAR_SHM_POOLED_OUTPUT_BYTES", "1")
    group = fresh_group
    n, r = group.size, group.rank
    total = int(os.environ.get("MPIPAR_TEST_SHM_CALLS", 2_500 if node_is_oversubscribed() else 10_000))
    total = total if validate == "0" else total // 4
    a = comm.symmetric_empty((13,), torch.float64, group)
    b = comm.symmetric_empty((2 * n + 1,), torch.int32, group)
    base = torch.arange(13, dtype=torch.float64)
    bad = 0
    for i in range(total):
        kind = i % 4
        if kind == 0:
            a.copy_(base + (i + r))
            comm.all_reduce(a, group)
            bad += not torch.equal(a, n * base + (n * i + n * (n - 1) // 2))
        elif kind == 1:
            root = (i // 3) % n
            b.fill_(i if r == root else -1)
            comm.broadcast(b, group, root=root)
            bad += not bool((b == i).all())
        elif kind == 2:
            b.fill_(i + r)
            out = comm.reduce_scatter(b, group)
            bad += not bool((out == n * i + n * (n - 1) // 2).all())
        else:
            b.fill_(i + r)
            out = comm.all_gather(b, group)
            bad += not torch.equal(out, (i + torch.arange(n, dtype=torch.int32)).repeat_interleave(2 * n + 1))
    checks.true(bad == 0, f"{bad} of {total} calls saw wrong values")
    checks.true(n == 1 or calls(group, "all_reduce") == total // 4 + (total % 4 > 0), "all-reduces not in shm")
    pool = symmetric.pool_of(group)
    checks.true(n == 1 or pool.num_windows <= 5, f"{pool.num_windows} windows for 2 buffers and 2 outputs")
    for i in range(300):  # allocate and drop: windows are reused or freed, never piling up
        x = comm.symmetric_empty((1 + 97 * (i % 7),), torch.float32, group)
        x.fill_(1)
        comm.all_reduce(x, group)
        checks.true(bool((x == n).all()), f"allocation {i}")
    del x
    checks.true(pool.num_windows <= 2 + symmetric.MAX_IDLE + 1, f"window leak: {pool.num_windows}")


def test_pool_frees_windows():
    g = _new_group("free-test")
    t = comm.symmetric_empty((8,), torch.float32, g)
    pool = symmetric.pool_of(g)
    assert comm.is_symmetric(t, g) and not comm.is_symmetric(torch.ones(8), g)
    assert comm.is_symmetric(t[2:5], g)
    del t
    for k in range(1, 20):
        comm.symmetric_empty((k * 1000,), torch.float32, g)
    assert pool.num_windows <= symmetric.MAX_IDLE + 1
    symmetric.free_symmetric(g)
    assert pool.num_windows == 0 and symmetric.pool_of(g) is None
    g.comm.Free()


def test_bad_input_raises_on_every_rank(group):
    if group.size > 1:
        with pytest.raises(MpiparError, match="differ across ranks"):
            comm.symmetric_empty((3 + (group.rank == group.size - 1),), torch.float32, group)
        t = comm.symmetric_empty((4,), torch.complex64, group)
        with pytest.raises(MpiparError, match="complex"):
            comm.all_reduce(t, group, algorithm="shm")
    with pytest.raises(MpiparError, match="unknown algorithm"):
        comm.all_reduce(torch.ones(3), group, algorithm="shm" if group.rank else "bogus")
    out = comm.all_reduce(torch.ones(3), group)  # the group still works afterwards
    assert torch.equal(out, torch.full((3,), float(group.size)))
