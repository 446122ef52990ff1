""""auto" on plain tensors where ranks outnumber cores on one node (mpipar.comm.tuning.stages_in_shm).

Such a group gathers its argument agreement through shared memory
(mpipar.comm.agreement.shm_table); "auto" then stages plain tensors in the staging
window (tuning.STAGED_SHM_BYTES: from 16-32 MiB, by op) through the pool's scratch window. Elsewhere (ranks with their
own cores: this machine's 2-rank runs, unless MPIPAR_POLITE=1) the same calls take
MPI or the ring and no pool appears. Either way the results equal the serial reference.
"""
from __future__ import annotations

import pytest
import torch
from conftest import rank_tensor

from mpipar import comm
from mpipar.comm import tuning
from mpipar.comm.agreement.inline import gathers_in_shared_memory
from mpipar.mesh import Group

pytestmark = pytest.mark.mpi

ROWS = (40 << 20) // 8 // 16  # float64 rows of 16: 40 MiB tensors, inside every op's staging window


@pytest.fixture
def fresh(world):
    c = world.Dup()
    yield Group(c, "staged")
    c.Free()


def test_auto_stages_large_plain_tensors_when_ranks_outnumber_cores(fresh, checks, shm_counts):
    g = fresh
    n, r = g.size, g.rank
    if n == 1:
        pytest.skip("a single rank communicates nothing")
    rows = ROWS - ROWS % n
    assert tuning.stages_in_shm("all_reduce", rows * 16 * 8)
    xs = [rank_tensor((rows, 16), torch.float64, i, 3) for i in range(n)]
    total = torch.stack(xs).sum(0)

    y = xs[r].clone()
    comm.all_reduce(y, g)
    checks.equal(y, total, "all_reduce")
    bf = torch.cat([xs[r]] * 4).to(torch.bfloat16)  # 40 MiB too
    comm.all_reduce(bf, g)
    want = torch.stack([x.to(torch.bfloat16).float() for x in xs]).sum(0).to(torch.bfloat16)
    checks.equal(bf, torch.cat([want] * 4), "all_reduce bf16 (reduced in float32, rounded once)")
    checks.equal(comm.reduce_scatter(xs[r], g), total.tensor_split(n)[r], "reduce_scatter")
    piece = xs[r][: rows // n]
    checks.equal(comm.all_gather(piece, g), torch.cat([x[: rows // n] for x in xs]), "all_gather")
    out = torch.empty(rows // n * n, 16, dtype=torch.float64)
    comm.all_gather(piece, g, out=out)
    checks.equal(out, torch.cat([x[: rows // n] for x in xs]), "all_gather out=")

    shared = gathers_in_shared_memory(g)
    staged = shm_counts.total(g, "shm")
    checks.true(shared == g.oversubscribed, "the agreement gathers through shared memory iff ranks outnumber cores")
    checks.true(staged == (5 if shared else 0), f"staged calls {staged}, shared agreement {shared}")
    # the bf16 call found the scratch window large enough: copied before its agreement
    prestaged = shm_counts.calls(g, "all_reduce", "prestaged")
    checks.true(prestaged == (1 if shared else 0), f"prestaged calls {prestaged}")
    checks.finish()


def test_prestaging_is_used_only_when_every_rank_prestaged(fresh, checks, shm_counts):
    """Rank 0 passes a symmetric tensor (it does not prestage), the others plain ones (they
    do): the agreement tells every rank, and all stage after it instead (no hang, exact)."""
    g = fresh
    n, r = g.size, g.rank
    if n == 1:
        pytest.skip("a single rank communicates nothing")
    rows = ROWS - ROWS % n
    xs = [rank_tensor((rows, 16), torch.float64, i, 5) for i in range(n)]
    total = torch.stack(xs).sum(0)
    y = xs[r].clone()
    comm.all_reduce(y, g)  # makes the pool's scratch (when staging applies)
    checks.equal(y, total, "first")
    sym = comm.symmetric_empty((rows, 16), torch.float64, g)  # collective; only rank 0 uses it
    for seed in range(2):
        z = sym if r == 0 else torch.empty(rows, 16, dtype=torch.float64)
        z.copy_(xs[r] * (seed + 1))
        comm.all_reduce(z, g)
        checks.equal(z, total * (seed + 1), f"mixed, call {seed}")
    y = xs[r].clone()
    comm.all_reduce(y, g)  # all plain again: prestaged where staging applies
    checks.equal(y, total, "plain again")
    prestaged = shm_counts.calls(g, "all_reduce", "prestaged")
    checks.true(prestaged == (1 if gathers_in_shared_memory(g) else 0), f"prestaged calls {prestaged}")
    checks.finish()
