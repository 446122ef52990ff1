"""The host staging path (taken by CUDA tensors when MPI is not CUDA-aware), tested on CPU.

MPIPAR_FORCE_STAGING=1 sends every tensor through host staging buffers; results
must be bit-identical to the direct path. The CUDA tests run only where a GPU
exists: CUDA inputs must give the CPU results, on the input's device.
"""
from __future__ import annotations

import pytest
import torch
from conftest import rank_tensor, requires_cuda

from mpipar import comm
from mpipar.comm import buffers
from mpipar.comm.agreement.inline import INLINE_BYTES

pytestmark = pytest.mark.mpi

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.bool]


class CountingPool(buffers.StagingPool):
    """A StagingPool that counts requests (proves the staging path ran)."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def get(self, numel, dtype, slot=0):
        self.calls += 1
        return super().get(numel, dtype, slot)


def run_all(world, dtype, device="cpu"):
    """Every collective and a p2p exchange on this rank's data; results as CPU tensors."""
    n, r = world.size, world.rank
    mk = lambda shape, seed: rank_tensor(shape, dtype, r, seed).to(device)  # noqa: E731
    out = {}
    # (sizes above INLINE_BYTES for every dtype: smaller data rides along with the argument
    # agreement, mpipar.comm.agreement.inline, and never reaches the staging path)
    for algorithm in ("mpi", "ring"):
        x = mk((64, 70), 0).t()  # non-contiguous
        out[f"all_reduce_{algorithm}"] = comm.all_reduce(x, world, algorithm=algorithm)
        out[f"reduce_scatter_{algorithm}"] = comm.reduce_scatter(mk((701, 7), 1), world, dim=0, algorithm=algorithm)
        out[f"all_gather_{algorithm}"] = comm.all_gather(mk((4100, r + 1), 2), world, dim=1, algorithm=algorithm)
    out["broadcast"] = comm.broadcast(mk((4100,), 3), world, root=n - 1)
    out["all_to_all"] = comm.all_to_all(mk((2 * n, 3), 4), world, scatter_dim=0, gather_dim=1)
    buf = torch.empty(3, 2, dtype=dtype, device=device).t()  # non-contiguous receive buffer
    rreq = comm.irecv(buf, (r - 1) % n, world, tag=7)
    sreq = comm.isend(mk((2, 3), 5), (r + 1) % n, world, tag=7)
    out["p2p"] = rreq.wait()
    sreq.wait()
    return out


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forced_staging_is_bit_identical(world, checks, monkeypatch, dtype):
    monkeypatch.delenv("MPIPAR_FORCE_STAGING", raising=False)
    direct = run_all(world, dtype)
    pool = CountingPool()
    monkeypatch.setattr(buffers, "STAGING", pool)
    monkeypatch.setenv("MPIPAR_FORCE_STAGING", "1")
    checks.true(buffers.needs_staging(torch.zeros(1)), "MPIPAR_FORCE_STAGING=1 must force staging")
    staged = run_all(world, dtype)
    for key, want in direct.items():
        checks.equal(staged[key], want, key)
    if world.size > 1:
        checks.true(pool.calls > 0, "the staging pool was never used")
    checks.finish()


def test_staging_buffers_are_reused(world, checks, monkeypatch):
    """Repeated staged all-reduces of one size reuse one host buffer (no allocation per call)."""
    if world.size == 1:
        pytest.skip("a single rank moves no data")
    pool = CountingPool()
    monkeypatch.setattr(buffers, "STAGING", pool)
    monkeypatch.setenv("MPIPAR_FORCE_STAGING", "1")
    numel = 2 * INLINE_BYTES  # above the size that rides along with the agreement message
    for i in range(3):
        x = torch.full((numel,), float(i))
        comm.all_reduce(x, world, algorithm="mpi")
        checks.equal(x, torch.full((numel,), float(i * world.size)), f"call {i}")
    checks.true(pool.calls >= 3, f"pool used {pool.calls} times")
    checks.true(len(pool._buffers) == 1, f"{len(pool._buffers)} buffers for one size and dtype")
    checks.finish()


@requires_cuda
@pytest.mark.parametrize("force", ["0", "1"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64], ids=str)
def test_cuda_tensors_match_cpu(world, checks, monkeypatch, dtype, force):
    device = torch.device("cuda", world.rank % torch.cuda.device_count())
    monkeypatch.delenv("MPIPAR_FORCE_STAGING", raising=False)
    want = run_all(world, dtype)
    if force == "1":
        monkeypatch.setenv("MPIPAR_FORCE_STAGING", "1")
    got = run_all(world, dtype, device)
    for key, w in want.items():
        checks.true(got[key].device == device, f"{key}: result on {got[key].device}, input on {device}")
        checks.equal(got[key].cpu(), w, key)
    checks.finish()
