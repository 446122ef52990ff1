"""mpipar.comm collectives against a numpy reference: every collective x algorithm x dtype x op.

Every rank rebuilds every other rank's input (`rank_tensor`), so the reference
needs no communication. Float inputs are multiples of 1/4, so sums are exact in
float32 and the only rounding allowed is the final one to the tensor's dtype:
results must be bit-equal to the float64 reference rounded once. With naive
bf16/fp16 accumulation they would not be (see test_half_precision_sums_are_accurate).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import rank_tensor, same_on_all_ranks

import mpipar
from mpipar import MpiparError, comm

pytestmark = pytest.mark.mpi

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16,
          torch.int32, torch.int64, torch.uint8, torch.bool]
ALGORITHMS = ["mpi", "ring", "auto"]
OPS = ["sum", "max", "min"]


@pytest.fixture(autouse=True)
def small_crossover(monkeypatch):
    """Make "auto" switch to the ring at 64 bytes, so the small cases below take both branches."""
    for op in ("ALL_REDUCE", "ALL_GATHER", "REDUCE_SCATTER"):
        monkeypatch.setenv(f"MPIPAR_CROSSOVER_{op}", "64")


def make(shape, dtype, rank, seed, transpose=False):
    """Rank `rank`'s input; transpose=True gives a non-contiguous view of the same values' layout."""
    if transpose:
        return rank_tensor(tuple(reversed(shape)), dtype, rank, seed).t()
    return rank_tensor(shape, dtype, rank, seed)


def np_reduce(tensors, op):
    """Reference: elementwise op over ranks in float64/int64 numpy, rounded once to the dtype."""
    dtype = tensors[0].dtype
    wide = [t.double() if dtype.is_floating_point else t.long() for t in tensors]
    stack = torch.stack(wide).numpy()
    if dtype is torch.bool:
        out = {"sum": np.any, "max": np.any, "min": np.all}[op](stack, axis=0)
    else:
        out = {"sum": np.sum, "max": np.max, "min": np.min}[op](stack, axis=0)
    return torch.from_numpy(np.asarray(out)).to(dtype)


# (shape, transpose): 1-d, non-contiguous 2-d, 3-d, empty, 0-d (all small enough to ride along
# with the agreement message: mpipar.comm.agreement.inline), then a non-contiguous one above that size in
# every dtype (5155 elements > INLINE_BYTES), which takes the algorithm's own path
REDUCE_CASES = [((7,), False), ((3, 5), True), ((2, 3, 4), False), ((0,), False), ((), False),
                ((1031, 5), True)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_all_reduce(world, checks, algorithm, op, dtype):
    n, r = world.size, world.rank
    for seed, (shape, transpose) in enumerate(REDUCE_CASES):
        want = np_reduce([make(shape, dtype, i, seed, transpose) for i in range(n)], op)
        x = make(shape, dtype, r, seed, transpose)
        out = comm.all_reduce(x, world, op=op, algorithm=algorithm)
        checks.true(out is x, f"{shape}: not in place")
        checks.equal(x, want, f"shape {shape} transpose {transpose}")
    checks.finish()


# (shape, dim, transpose): non-divisible sizes, dims other than 0, a non-contiguous input,
# fewer rows than ranks (some ranks get an empty slice)
# (the small ones ride along with the agreement message, mpipar.comm.agreement.inline; the last is above
# INLINE_BYTES in every dtype and takes the algorithm's own path)
SCATTER_CASES = [((7,), 0, False), ((5, 3), 0, False), ((3, 6), 1, True), ((2, 5, 3), -2, False), ((1, 4), 0, False),
                 ((1031, 5), 0, True)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_reduce_scatter(world, checks, algorithm, op, dtype):
    n, r = world.size, world.rank
    for seed, (shape, dim, transpose) in enumerate(SCATTER_CASES):
        full = np_reduce([make(shape, dtype, i, seed, transpose) for i in range(n)], op)
        want = torch.tensor_split(full, n, dim=dim)[r]
        x = make(shape, dtype, r, seed, transpose)
        before = x.clone()
        out = comm.reduce_scatter(x, world, dim=dim, op=op, algorithm=algorithm)
        checks.equal(out, want.contiguous(), f"shape {shape} dim {dim}")
        checks.equal(x, before, f"shape {shape} dim {dim}: input modified")
    checks.finish()


def gather_input(case, dtype, rank, seed):
    """all_gather cases: equal sizes, per-rank sizes along dim (0 on some ranks), transposed."""
    if case == "equal":
        return make((4, 3), dtype, rank, seed), 0
    if case == "ragged_dim1":
        return make((2, rank + 1), dtype, rank, seed), 1
    if case == "empty_on_even_ranks":
        return make((rank % 2, 3), dtype, rank, seed), 0
    if case == "transposed_last":
        return make((3, 2 + rank % 3), dtype, rank, seed, transpose=True), -1
    if case == "large_ragged":  # above INLINE_BYTES in every dtype: the algorithm's own path
        return make((1030 + rank, 5), dtype, rank, seed, transpose=True), 0
    if case == "large_on_rank_0":  # one piece too large to ride along: no rank takes the inline path
        return make((1031 if rank == 0 else 2, 5), dtype, rank, seed), 0
    raise AssertionError(case)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_all_gather(world, checks, algorithm, dtype):
    n, r = world.size, world.rank
    for seed, case in enumerate(["equal", "ragged_dim1", "empty_on_even_ranks", "transposed_last", "large_ragged",
                                 "large_on_rank_0"]):
        parts = [gather_input(case, dtype, i, seed) for i in range(n)]
        dim = parts[0][1]
        want = torch.cat([p for p, _ in parts], dim=dim)
        x, _ = gather_input(case, dtype, r, seed)
        before = x.clone()
        out = comm.all_gather(x, world, dim=dim, algorithm=algorithm)
        checks.equal(out, want, case)
        checks.equal(x, before, f"{case}: input modified")
    checks.finish()


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_all_gather_of_scalars(world, checks, algorithm):
    """One 0-d tensor per rank gathers to a vector of the group size (as torch.distributed)."""
    out = comm.all_gather(torch.tensor(float(world.rank) + 0.5), world, algorithm=algorithm)
    checks.equal(out, torch.arange(world.size, dtype=torch.float32) + 0.5, "scalars")
    checks.finish()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_broadcast_from_every_root(world, checks, dtype):
    n, r = world.size, world.rank
    for root in range(n):
        for seed, (shape, transpose) in enumerate([((5,), False), ((3, 4), True), ((1031, 5), True),
                                                   ((1031, 5), False)]):  # (large: the MPI path)
            want = make(shape, dtype, root, seed, transpose)
            x = make(shape, dtype, r, seed, transpose)
            out = comm.broadcast(x, world, root=root)
            checks.true(out is x, "not in place")
            checks.equal(x, want, f"root {root} shape {shape}")
    checks.finish()


def a2a_reference(inputs, n, r, sd, gd):
    return torch.cat([torch.chunk(t, n, dim=sd)[r] for t in inputs], dim=gd)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64, torch.bool], ids=str)
@pytest.mark.parametrize("sd,gd", [(0, 0), (0, 1), (1, 0), (1, 1), (-1, -2), (2, 0)])
def test_all_to_all(world, checks, sd, gd, dtype):
    n, r = world.size, world.rank
    shape = [3, 2, 2]
    shape[sd] = 2 * n
    for seed, transpose in enumerate([False, True]):
        if transpose:  # non-contiguous: a permuted view with the same shape
            inputs = [rank_tensor(tuple(reversed(shape)), dtype, i, seed).permute(2, 1, 0) for i in range(n)]
            x = rank_tensor(tuple(reversed(shape)), dtype, r, seed).permute(2, 1, 0)
        else:
            inputs = [rank_tensor(tuple(shape), dtype, i, seed) for i in range(n)]
            x = rank_tensor(tuple(shape), dtype, r, seed)
        out = comm.all_to_all(x, world, scatter_dim=sd, gather_dim=gd)
        checks.equal(out, a2a_reference(inputs, n, r, sd, gd), f"transpose {transpose}")
    checks.finish()


def test_all_to_all_indivisible_raises_on_every_rank(world):
    n = world.size
    if n == 1:
        pytest.skip("every size is divisible by 1")
    x = torch.zeros(n + 1, 2)
    with pytest.raises(MpiparError) as info:
        comm.all_to_all(x, world, scatter_dim=0, gather_dim=1)
    same = same_on_all_ranks(world, str(info.value))
    y = torch.ones(3)  # the group is still usable afterwards
    assert torch.equal(comm.all_reduce(y, world), torch.full((3,), float(n)))
    assert same and "divisible" in str(info.value)


@pytest.mark.parametrize("size", [10, 1000, 1001, 5001])
def test_ring_is_bit_identical_on_every_rank(world, checks, size):
    n, r = world.size, world.rank
    inputs = [torch.randn(size, generator=torch.Generator().manual_seed(100 + i)) for i in range(n)]
    x = inputs[r].clone()
    comm.all_reduce(x, world, algorithm="ring")
    blobs = world.allgather(x.numpy().tobytes())
    checks.true(all(b == blobs[0] for b in blobs), "ring results differ between ranks")
    want = torch.stack(inputs).double().sum(0)
    checks.close(x.double(), want, rtol=1e-5, atol=1e-5, msg="ring sum")
    checks.finish()


@pytest.mark.parametrize("piece_bytes", ["8", "12", "4096"])
@pytest.mark.parametrize("op", OPS)
def test_ring_pieces_match_reference(world, checks, monkeypatch, op, piece_bytes):
    """The ring's reduce steps pipeline pieces of MPIPAR_RING_PIECE_BYTES through two scratch
    buffers: tiny pieces (1-3 elements, many in flight, uneven chunk counts) give the reference."""
    monkeypatch.setenv("MPIPAR_RING_PIECE_BYTES", piece_bytes)
    n, r = world.size, world.rank
    for size in (1, 2 * n + 1, 1500, 2001):  # the last two above INLINE_BYTES: the ring runs
        inputs = [make((size,), torch.float32, i, 31) for i in range(n)]
        want = np_reduce(inputs, op)
        x = inputs[r].clone()
        comm.all_reduce(x, world, op=op, algorithm="ring")
        checks.equal(x, want, msg=f"all_reduce {op} size {size}")
        rs = comm.reduce_scatter(inputs[r].clone(), world, op=op, algorithm="ring")
        checks.equal(rs, torch.tensor_split(want, n)[r], msg=f"reduce_scatter {op} size {size}")
        checks.equal(inputs[r], make((size,), torch.float32, r, 31), msg="reduce_scatter left its input alone")
    checks.finish()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_random_floats_all_algorithms_agree(world, checks, algorithm, dtype):
    """Random (non-exact) data: every algorithm matches the float64 reference to rounding."""
    n, r = world.size, world.rank
    inputs = [torch.randn(37, 5, generator=torch.Generator().manual_seed(7 + i), dtype=dtype) for i in range(n)]
    want = torch.stack(inputs).double().sum(0)
    tol = 1e-5 if dtype is torch.float32 else 1e-12
    x = inputs[r].clone()
    comm.all_reduce(x, world, algorithm=algorithm)
    rs = comm.reduce_scatter(inputs[r].clone(), world, dim=0, algorithm=algorithm)
    checks.close(x.double(), want, rtol=tol, atol=tol, msg="all_reduce")
    checks.close(rs.double(), torch.tensor_split(want, n, 0)[r], rtol=tol, atol=tol, msg="reduce_scatter")
    checks.finish()


@pytest.mark.parametrize("dtype,big", [(torch.bfloat16, 256.0), (torch.float16, 2048.0)], ids=["bf16", "fp16"])
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_half_precision_sums_are_accurate(world, checks, algorithm, dtype, big):
    """big + 1 + 1 + ...: accumulating in bf16/fp16 loses every +1 (ulp at big is 2); fp32 does not."""
    n, r = world.size, world.rank
    size = 40  # above the 64-byte crossover in fp32, so "auto" rides the ring here
    x = torch.full((size,), big if r == 0 else 1.0, dtype=dtype)
    want = torch.full((size,), big + n - 1, dtype=torch.float64).to(dtype)
    comm.all_reduce(x, world, algorithm=algorithm)
    y = torch.full((size,), big if r == 0 else 1.0, dtype=dtype)
    rs = comm.reduce_scatter(y, world, algorithm=algorithm)
    checks.equal(x, want, "all_reduce")
    checks.equal(rs, torch.tensor_split(want, n)[r], "reduce_scatter")
    checks.finish()


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_collectives_on_mesh_subgroups(world, checks, algorithm):
    """all_reduce / all_gather over mesh.tp and mesh.dp involve exactly the group's members."""
    n, r = world.size, world.rank
    tp = 2 if n % 2 == 0 else 1
    mesh = mpipar.Mesh(tp=tp, comm=world)
    for group, members in ((mesh.tp, [mesh.rank_of(tp=i) for i in range(tp)]),
                           (mesh.dp, [mesh.rank_of(dp=i) for i in range(n // tp)])):
        x = torch.full((20,), float(r + 1))
        comm.all_reduce(x, group, algorithm=algorithm)
        checks.equal(x, torch.full((20,), float(sum(m + 1 for m in members))), group.name)
        g = comm.all_gather(torch.tensor([float(r)]), group, algorithm=algorithm)
        checks.true(g.tolist() == [float(m) for m in members], f"{group.name}: gathered {g.tolist()}")
    checks.finish()
