"""all_to_all read straight out of the peers' inputs (fast.c's KIND_CMA_COPY, planned in
mpipar.comm.agreement.fast_plan._by_cma; mpipar.comm.agreement.cma decides whether a group can).

Where a group's ranks outnumber cores on one node and every rank can read its peers' memory
with process_vm_readv, an all_to_all from tuning.CMA_BYTES has each rank publish its pid and
input address in its payload slot, read its blocks out of every peer's input after the
agreement's exchange, and wait in a second exchange until every peer has read its own. Checked
byte for byte against the Python path and the serial reference (every dtype and layout of
test_fast_mpi's cases, the threshold lowered to take them all); a rank whose tensor is not
contiguous; walks of many runs (several reads per peer); an unaligned input of 2 MiB and more;
calls back to back, each input overwritten as soon as its call returns (the second exchange);
a peer whose input cannot be read (MpiparError on every rank, and the group goes on); and the
verdict of cma.works, the same on every rank. Skipped where there are no payload slots (ranks
with their own cores) or the kernel refuses the reads.
"""
from __future__ import annotations

import ctypes
import mmap

import numpy as np
import pytest
import torch

from mpipar import MpiparError, comm
from mpipar.comm import tuning
from mpipar.comm.agreement import cma, inline
from mpipar.comm.agreement.fast_plan import _CMA_COPY
from test_fast_mpi import cases, checked_paths
from test_inline import fast_group, same_bytes, serial  # noqa: F401 (fast_group: a fixture)

pytestmark = pytest.mark.mpi
_KIND = 3  # the kind's word in a key (after the head's MINE_WORDS)


@pytest.fixture
def crossed(fast_group, monkeypatch):
    """fast_group where its ranks read each other's memory (else skip), with every all_to_all past
    the agreement's row read that way (tuning.CMA_BYTES lowered; plans made afresh)."""
    g, calls = fast_group
    buf = inline.buffers(g)
    if not buf.cma:
        pytest.skip("no cross-memory attach: the ranks have their own cores, or the kernel refuses the reads")
    monkeypatch.setattr(tuning, "CMA_BYTES", {"all_to_all": 1})
    buf.plans.clear()
    yield g, calls, buf
    buf.plans.clear()


def cma_plans(buf) -> int:
    return sum(p.key is not None and np.frombuffer(p.key, np.int64)[_KIND] == _CMA_COPY for p in buf.plans.values())


def expected(xs, r, n, sd, gd):
    return serial("all_to_all", xs, r, n, {"scatter_dim": sd, "gather_dim": gd})


def test_the_verdict_is_the_same_on_every_rank(crossed, world):
    g, _, buf = crossed
    again = cma.works(g)
    assert world.allgather((buf.cma, again)) == [(True, True)] * world.size


def test_cma_all_to_all_is_the_python_path_bit_for_bit(crossed, checks):
    """Every all_to_all case of test_fast_mpi (every dtype, dims before the scattered one or not,
    Ulysses' layout) read out of the peers' inputs: the Python path's bytes and the serial
    reference's on every rank, one CMA plan per case."""
    from conftest import rank_tensor

    g, calls, buf = crossed
    n, r = g.size, g.rank
    for k, (name, dtype, shape, kw, _) in enumerate(cases(n)):
        if name != "all_to_all":
            continue
        xs = [rank_tensor(shape, dtype, q, seed=k) for q in range(n)]
        what = f"{dtype} {shape} {kw}"
        plans = cma_plans(buf)
        _, took_c = checked_paths(checks, g, calls, name, xs, kw, what)
        checks.true(took_c and cma_plans(buf) == plans + 1, f"{what}: a CMA plan, taken")
    checks.finish()


def test_a_noncontiguous_rank_and_many_runs(crossed, checks):
    """Rank 0's tensor is not contiguous (it reads and is read from a contiguous copy); blocks of
    3 elements per row make 70 n runs per peer, past the 64 one read takes."""
    g, calls, buf = crossed
    n, r = g.size, g.rank
    rows = 70 * n
    xs = [torch.arange(rows * 3 * n, dtype=torch.float32).reshape(rows, 3 * n) + 10_000 * q for q in range(n)]
    for sd, gd in ((1, 1), (1, 0), (0, 1)):
        x = xs[r].clone()
        if r == 0:
            x = x.t().contiguous().t()
        before = calls["run"]
        got = comm.all_to_all(x, g, sd, gd)
        checks.true(calls["run"] == before + 1, f"({sd}, {gd}): the C call on rank {r}")
        same_bytes(checks, got.contiguous(), expected(xs, r, n, sd, gd), f"({sd}, {gd})")
    checks.true(cma_plans(buf) >= 3, f"{cma_plans(buf)} CMA plans")
    checks.finish()


def test_an_unaligned_input_of_2_mib(crossed, checks):
    """An odd-sized input 4 bytes past a 16-byte boundary, its own block 2 MiB and more (copied
    with fast.c's streaming stores, the peers' blocks read)."""
    g, _, buf = crossed
    n, r = g.size, g.rank
    rows = (2 << 20) // 4 + 3
    xs = [torch.randn(n * rows, generator=torch.Generator().manual_seed(9 + q)) for q in range(n)]
    x = torch.empty(n * rows + 1)[1:].copy_(xs[r])
    checks.true(x.data_ptr() % 16 != 0, "unaligned")
    same_bytes(checks, comm.all_to_all(x, g, 0, 0), expected(xs, r, n, 0, 0), "2 MiB blocks")
    checks.finish()


def test_back_to_back_with_the_inputs_overwritten(crossed, checks):
    """Calls of every kind of exchange in turn (a CMA all_to_all, a small all-reduce, an
    all_gather in the slots), each all_to_all's input overwritten the moment its call returns:
    no peer may still be reading it (the second exchange), and the descriptor and verdict words
    of one call are never a later call's."""
    g, _, buf = crossed
    n, r = g.size, g.rank
    rows = 3000
    for it in range(16):
        x = torch.arange(n * rows, dtype=torch.float32) + 1000 * it + 100_000 * r
        got = comm.all_to_all(x, g, 0, 0)
        x.fill_(-1.0)
        want = torch.cat([(torch.arange(n * rows, dtype=torch.float32) + 1000 * it + 100_000 * q).chunk(n)[r]
                          for q in range(n)])
        checks.equal(got, want, f"all_to_all {it}")
        if it % 3 == 0:
            checks.equal(comm.all_reduce(torch.full((4,), float(r)), g), torch.full((4,), float(n * (n - 1) // 2)),
                         f"all_reduce {it}")
        if it % 4 == 1:
            got = comm.all_gather(torch.full((rows,), float(it + r)), g)
            checks.equal(got, torch.cat([torch.full((rows,), float(it + q)) for q in range(n)]), f"all_gather {it}")
    checks.finish()


def _guarded(nbytes: int, keep: tuple[int, int]) -> tuple[torch.Tensor, mmap.mmap]:
    """A float32 tensor over fresh pages of which only bytes [keep) can be read: a peer's read of
    the rest fails (EFAULT), this rank's own block (there) reads."""
    m = mmap.mmap(-1, nbytes)
    t = torch.frombuffer(m, dtype=torch.float32)
    t[keep[0] // 4:keep[1] // 4] = 1.0
    libc = ctypes.CDLL(None, use_errno=True)
    addr = t.data_ptr()
    for lo, hi in ((0, keep[0]), (keep[1], nbytes)):
        if hi > lo:
            assert libc.mprotect(ctypes.c_void_p(addr + lo), ctypes.c_size_t(hi - lo), 0) == 0  # PROT_NONE
    return t, m


def test_a_peer_that_cannot_be_read_raises_on_every_rank(crossed, checks):
    """The last rank's input is unreadable but for its own block: every other rank's read of it
    fails, and every rank raises MpiparError naming a rank that could not read; the group goes on."""
    g, _, buf = crossed
    n, r = g.size, g.rank
    block = 16 << 10  # page-aligned blocks
    last = r == n - 1
    x, m = _guarded(n * block, (r * block, (r + 1) * block)) if last else (torch.ones(n * block // 4), None)
    with pytest.raises(MpiparError, match="could not read a peer's input"):
        comm.all_to_all(x, g, 0, 0)
    del x
    if m is not None:
        m.close()
    y = torch.full((n * 2000,), float(r))
    checks.equal(comm.all_to_all(y, g, 0, 0), torch.arange(n, dtype=torch.float32).repeat_interleave(2000), "after")
    checks.finish()
