"""Shared-memory reduce-scatter and all-gather of flat block buffers (mpipar.comm.symmetric.blocks).

Every rank rebuilds every other rank's input (seeded by rank) and checks its
result against the sum in rank order (float64: bit for bit) and against MPI's
Reduce_scatter_block (bit for bit at 2 ranks on random doubles; at any size on
multiples of 1/4, where every order of summation is exact). Segments are not
multiples of the (1 KiB) chunk, and two segments share one buffer.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from mpi4py import MPI

from mpipar import MpiparError, comm, settings
from mpipar.comm.symmetric import blocks, compiled as shm_compiled, pool as symmetric
from mpipar.mesh import Group

pytestmark = pytest.mark.mpi
SIZES = (37, 300)   # block elements of the two segments


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    monkeypatch.setenv("MPIPAR_SHM_CHUNK_BYTES", "1024")


@pytest.fixture(scope="module")
def group():
    with settings.override(fake_ranks_per_node=None):
        g = Group(MPI.COMM_WORLD.Dup(), "shm-blocks")
        comm.symmetric_empty((1,), torch.float32, g)  # the pool, on the real node
    yield g
    symmetric.free_symmetric(g)
    g.comm.Free()


def layout(n: int):
    """(start, block size) of the two segments, a gap between them, and the buffer's length."""
    starts, pos = [], 3
    for s in SIZES:
        starts.append(pos)
        pos += n * s + 5
    return list(zip(starts, SIZES)), pos


def data(rank: int, numel: int, dtype, quarters: bool) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(numel, generator=g, dtype=torch.float64)
    if quarters:
        x = (x * 16).round() / 4
    return x.to(dtype)


def rank_order_sum(n: int, numel: int, dtype, quarters: bool) -> torch.Tensor:
    wide = torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype
    acc = data(0, numel, dtype, quarters).to(wide)
    for p in range(1, n):
        acc = acc + data(p, numel, dtype, quarters).to(wide)
    return acc


@pytest.mark.parametrize("accumulate", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_reduce_scatter_blocks_sums_in_rank_order(group, dtype, accumulate, shm_counts):
    n, r = group.size, group.rank
    segs, numel = layout(n)
    src = comm.symmetric_empty((numel,), dtype, group)
    src.copy_(data(r, numel, dtype, False))
    wide = torch.float32 if dtype is torch.bfloat16 else dtype
    outs = [torch.full((s,), 0.5, dtype=wide) for _, s in segs]
    blocks.reduce_scatter_blocks(src, group, [(start, o) for (start, _), o in zip(segs, outs)], accumulate)
    want = rank_order_sum(n, numel, dtype, False)
    for (start, s), out in zip(segs, outs):
        expect = want[start + r * s:start + (r + 1) * s]
        if accumulate:
            expect = torch.full((s,), 0.5, dtype=wide) + expect
        assert torch.equal(out, expect)
    assert torch.equal(src, data(r, numel, dtype, False))  # the source is left alone
    assert shm_counts.calls(group, "reduce_scatter_blocks") >= 1


def test_reduce_scatter_blocks_equals_mpi_float64(group):
    """The MPI path's numbers: random doubles at 2 ranks, exact multiples of 1/4 at any size."""
    n, r = group.size, group.rank
    quarters = n > 2
    segs, numel = layout(n)
    x = data(r, numel, torch.float64, quarters)
    src = comm.symmetric_empty((numel,), torch.float64, group)
    src.copy_(x)
    for start, s in segs:
        mine = torch.empty(s, dtype=torch.float64)
        blocks.reduce_scatter_blocks(src, group, [(start, mine)])
        ref = torch.empty(s, dtype=torch.float64)
        group.comm.Reduce_scatter_block(x[start:start + n * s].numpy(), ref.numpy(), op=MPI.SUM)
        assert torch.equal(mine, ref)


@pytest.fixture(params=["plain", "streamed"])
def copies(request, monkeypatch):
    """The gathers' copies as numpy's, or as the compiled streaming copy (from 64 bytes on)."""
    if request.param == "streamed":
        monkeypatch.setenv("MPIPAR_SHM_STREAM_BYTES", "64")
    return request.param


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=str)
def test_all_gather_blocks_in_place(group, dtype, copies):
    n, r = group.size, group.rank
    segs, numel = layout(n)
    buf = comm.symmetric_empty((numel,), dtype, group)
    buf.fill_(-1)
    full = [data(7, n * s, dtype, False) for _, s in segs]
    for (start, s), f in zip(segs, full):
        buf[start + r * s:start + (r + 1) * s] = f[r * s:(r + 1) * s]
    blocks.all_gather_blocks(buf, group, segs)
    expect = torch.full((numel,), -1, dtype=dtype)
    for (start, s), f in zip(segs, full):
        expect[start:start + n * s] = f
    assert torch.equal(buf, expect)  # the gaps between segments untouched


def test_gather_pieces(group, copies, shm_counts):
    n, r = group.size, group.rank
    src = comm.symmetric_empty((400,), torch.float64, group)
    src.copy_(data(r, 400, torch.float64, False))
    outs = [torch.empty(n * 37, dtype=torch.float64), torch.empty(n * 300, dtype=torch.float64)]
    streamed = shm_counts.streamed
    blocks.gather_pieces(src, group, [(10, outs[0]), (50, outs[1])])
    if copies == "streamed" and shm_compiled.streaming():
        assert shm_counts.streamed == streamed + 2 * n
    for start, out in ((10, outs[0]), (50, outs[1])):
        s = out.numel() // n
        assert torch.equal(out, torch.cat([data(p, 400, torch.float64, False)[start:start + s] for p in range(n)]))


def test_bad_input_raises_on_every_rank(group):
    n, r = group.size, group.rank
    sym = comm.symmetric_empty((64 * n,), torch.float64, group)
    plain = torch.zeros(64 * n, dtype=torch.float64)
    with pytest.raises(MpiparError, match="symmetric"):  # rank 0 passes a plain tensor
        blocks.reduce_scatter_blocks(plain if r == 0 else sym, group, [(0, torch.empty(64, dtype=torch.float64))])
    with pytest.raises(MpiparError):  # rank 0's output has the wrong dtype
        out = torch.empty(64, dtype=torch.float32 if r == 0 else torch.float64)
        blocks.reduce_scatter_blocks(sym, group, [(0, out)])
    with pytest.raises(MpiparError):  # the last rank's segment runs past the buffer
        blocks.all_gather_blocks(sym, group, [(1 if r == n - 1 else 0, 64)])
    with pytest.raises(MpiparError):
        blocks.gather_pieces(sym, group, [(0, torch.empty(n * 64 + (r == 0), dtype=torch.float64))])
    # the group still works after the errors (every rank went through the same barriers)
    sym.fill_(r + 1)
    out = torch.empty(64, dtype=torch.float64)
    blocks.reduce_scatter_blocks(sym, group, [(0, out)])
    assert np.all(out.numpy() == n * (n + 1) / 2)
