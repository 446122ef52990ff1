"""all_gather(t, group, dim, algorithm, out=...): into a given tensor, and in place.

Every rank rebuilds every rank's piece (`rank_tensor`), sizes along `dim` differ
per rank (rank r has r + 2 rows), and the result must equal torch.cat of the pieces
bit for bit, be `out` itself, and (in place) leave the rank's own slice as it was.
Outputs are plain tensors or symmetric ones (mpipar.comm.symmetric_empty); the
shared-memory path must really run for symmetric outputs (counted by the shm_counts fixture).
"""
from __future__ import annotations

import os

import pytest
import torch
from conftest import SHM_COUNTS, rank_tensor, requires_cuda

from mpipar import MpiparError, comm, settings
from mpipar.comm.agreement import into
from mpipar.comm.symmetric import compiled as shm_compiled, pool as symmetric
from mpipar.device import node_is_oversubscribed
from mpipar.mesh import Group

pytestmark = pytest.mark.mpi

ALGORITHMS = ["auto", "mpi", "ring", "shm"]
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.int64, torch.bool]


@pytest.fixture(scope="module")
def group():
    from mpi4py import MPI

    with settings.override(fake_ranks_per_node=None):
        g = Group(MPI.COMM_WORLD.Dup(), "all-gather-into")
        comm.symmetric_empty((1,), torch.float32, g)  # creates the pool now
    yield g
    symmetric.free_symmetric(g)
    g.comm.Free()


@pytest.fixture(autouse=True)
def shm_at_every_size(monkeypatch):
    monkeypatch.setenv("MPIPAR_SHM_CROSSOVER_ALL_GATHER", "0")


def pieces(n, dim, dtype, seed=0):
    """Rank r's piece: r + 2 along `dim` of a (r + 2, 3, 5)-like shape."""
    shapes = [[3, 5] for _ in range(n)]
    for r in range(n):
        shapes[r].insert(dim % 3, r + 2)
    return [rank_tensor(s, dtype, r, seed=seed) for r, s in enumerate(shapes)]


def shm_calls(g) -> int:
    """All-gathers of g in shared memory (a test that asks takes the shm_counts fixture)."""
    return SHM_COUNTS.calls(g, "all_gather")


def make_out(g, like: torch.Tensor, kind: str) -> torch.Tensor:
    out = comm.symmetric_empty(like.shape, like.dtype, g) if kind == "symmetric" else torch.empty_like(like)
    return out.fill_(0) if like.dtype is not torch.bool else out.fill_(False)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("dim", [0, 1, -1])
@pytest.mark.parametrize("kind", ["plain", "symmetric"])
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_into_out_and_in_place(group, checks, algorithm, kind, dim, dtype, shm_counts):
    n, r = group.size, group.rank
    ins = pieces(n, dim, dtype)
    want = torch.cat(ins, dim=dim)
    before = shm_calls(group)
    out = make_out(group, want, kind)
    got = comm.all_gather(ins[r], group, dim=dim, algorithm=algorithm, out=out)
    checks.true(got is out, "returns out")
    checks.equal(out, want, f"{algorithm} {kind} dim {dim} {dtype}: into out")
    out = make_out(group, want, kind)
    mine = into.own_slice(out, dim % 3, [x.shape[dim] for x in ins], r)
    mine.copy_(ins[r])
    got = comm.all_gather(mine, group, dim=dim, algorithm=algorithm, out=out)
    checks.true(got is out, "returns out (in place)")
    checks.equal(out, want, f"{algorithm} {kind} dim {dim} {dtype}: in place")
    uses_shm = n > 1 and (algorithm == "shm" or (algorithm == "auto" and kind == "symmetric"))
    checks.true(shm_calls(group) - before == (2 if uses_shm else 0), f"shm calls {shm_calls(group) - before}")


@pytest.mark.parametrize("algorithm", ["mpi", "ring"])
def test_forced_staging(group, checks, monkeypatch, algorithm):
    """MPIPAR_FORCE_STAGING=1: `out` goes through a host copy (as a GPU tensor without
    CUDA-aware MPI would), into out and in place."""
    monkeypatch.setenv("MPIPAR_FORCE_STAGING", "1")
    n, r = group.size, group.rank
    ins = pieces(n, 0, torch.float64, seed=4)
    want = torch.cat(ins)
    out = torch.zeros_like(want)
    checks.equal(comm.all_gather(ins[r], group, algorithm=algorithm, out=out), want, "into out")
    out = torch.zeros_like(want)
    mine = into.own_slice(out, 0, [x.shape[0] for x in ins], r)
    mine.copy_(ins[r])
    checks.equal(comm.all_gather(mine, group, algorithm=algorithm, out=out), want, "in place")


@requires_cuda
@pytest.mark.parametrize("algorithm", ["mpi", "ring"])
def test_cuda_out(group, checks, algorithm):
    """A CUDA `out` (CUDA-aware MPI reads it directly; otherwise it is staged through host)."""
    n, r = group.size, group.rank
    ins = [x.cuda() for x in pieces(n, 0, torch.float32, seed=5)]
    want = torch.cat(ins)
    out = torch.zeros_like(want)
    checks.equal(comm.all_gather(ins[r], group, algorithm=algorithm, out=out).cpu(), want.cpu(), "into out")
    out = torch.zeros_like(want)
    mine = into.own_slice(out, 0, [x.shape[0] for x in ins], r)
    mine.copy_(ins[r])
    checks.equal(comm.all_gather(mine, group, algorithm=algorithm, out=out).cpu(), want.cpu(), "in place")


def test_in_place_detection(group):
    out = torch.zeros(7, 3)
    sizes = [3, 4]
    assert into.is_own_slice(out[3:], out, 0, sizes, 1)
    assert not into.is_own_slice(out[3:].clone(), out, 0, sizes, 1)
    assert not into.is_own_slice(out[:3], out, 0, sizes, 1)
    assert into.is_own_slice(out[:3], out, 0, sizes, 0)
    assert into.is_own_slice(out.t()[:, 3:], out.t(), 1, sizes, 1)


def test_scalar_into_vector(group, checks):
    n, r = group.size, group.rank
    out = torch.zeros(n, dtype=torch.int64)
    comm.all_gather(torch.tensor(10 * r + 1), group, out=out)
    checks.equal(out, 10 * torch.arange(n) + 1, "0-d pieces")


@pytest.mark.parametrize("case", ["wrong size", "wrong dtype", "non-contiguous", "missing on rank 0",
                                  "size differs by rank", "unusable on rank 0, missing elsewhere"])
def test_bad_out_raises_on_every_rank(group, case):
    n, r = group.size, group.rank
    t = torch.ones(r + 2, 3)
    total = sum(k + 2 for k in range(n))
    out = {"wrong size": torch.empty(total + 1, 3),
           "wrong dtype": torch.empty(total, 3, dtype=torch.float64),
           "non-contiguous": torch.empty(3, total).t(),
           "missing on rank 0": None if r == 0 else torch.empty(total, 3),
           "size differs by rank": torch.empty(total + r, 3),
           # (the codes of "unusable" and "missing" must not hash alike: CPython's hash(-1) == hash(-2))
           "unusable on rank 0, missing elsewhere": torch.empty(total, 3, dtype=torch.int8) if r == 0 else None}[case]
    if case != "wrong size" and "rank" in case and n == 1:
        pytest.skip("needs two ranks to differ")
    with pytest.raises(MpiparError, match="all_gather: (out must be|arguments differ)"):
        comm.all_gather(t, group, out=out)
    comm.all_gather(t, group, out=torch.empty(total, 3))  # the group still works afterwards


@pytest.mark.parametrize("copy", ["numpy", "streaming"])
def test_many_in_place_calls_race_free(group, checks, monkeypatch, copy, shm_counts):
    """Back-to-back in-place gathers into one symmetric output (every rank pushes its piece
    into its peers' outputs): each call writes new values; a rank that returned before every
    peer had pushed (no exit barrier) would read the previous call's values; a rank that
    pushed before a peer had finished reading (no entry barrier) would overwrite them.
    "streaming": every push uses non-temporal stores (weakly ordered: fenced before the barrier)."""
    monkeypatch.setenv("MPIPAR_VALIDATE", "0")
    monkeypatch.setenv("MPIPAR_SHM_STREAM_BYTES", "1" if copy == "streaming" else str(1 << 62))
    streamed = shm_counts.streamed
    n, r = group.size, group.rank
    rows = 2 * n + 1
    total = int(os.environ.get("MPIPAR_TEST_SHM_CALLS", 1_000 if node_is_oversubscribed() else 4_000))
    out = comm.symmetric_empty((n * rows,), torch.int64, group)
    mine = out[r * rows:(r + 1) * rows]
    owner = torch.arange(n).repeat_interleave(rows)
    bad = 0
    for i in range(total):
        mine.fill_(i * n + r)
        comm.all_gather(mine, group, out=out)
        bad += not torch.equal(out, i * n + owner)
    checks.true(bad == 0, f"{bad} of {total} calls saw wrong values")
    streams = copy == "streaming" and n > 1 and shm_compiled.streaming()
    checks.true((shm_counts.streamed - streamed == total * (n - 1)) if streams
                else shm_counts.streamed == streamed, "streaming copies: wrong count")
