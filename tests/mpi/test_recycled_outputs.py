"""Collectives that return a new tensor take it from the recycled-output pool
(mpipar.comm.outputs): a result the caller still holds is never overwritten by a
later call, and a dropped one is reused (no fresh pages per call)."""
from __future__ import annotations

import pytest
import torch
from conftest import rank_tensor

from mpipar import comm
from mpipar.comm import outputs

pytestmark = pytest.mark.mpi

ROWS = 4 * outputs.MIN_BYTES // 8 // 16  # float64 rows of 16: every output is pooled


def gather(x, g, algorithm):
    return comm.all_gather(x, g, algorithm=algorithm)


def scatter(x, g, algorithm):
    return comm.reduce_scatter(x, g, algorithm=algorithm)


def alltoall(x, g, algorithm):
    return comm.all_to_all(x, g, 0, 0)


def case(name, n, r, seed):
    """(this rank's input, its expected result)."""
    rows = ROWS if name == "all_gather" else ROWS * n
    xs = [rank_tensor((rows, 16), torch.float64, i, seed) for i in range(n)]
    if name == "all_gather":
        return xs[r], torch.cat(xs)
    if name == "reduce_scatter":
        return xs[r], torch.stack(xs).sum(0).tensor_split(n)[r]
    return xs[r], torch.cat([x.chunk(n)[r] for x in xs])


CALLS = {"all_gather": gather, "reduce_scatter": scatter, "all_to_all": alltoall}


@pytest.mark.parametrize("algorithm", ["mpi", "ring", "shm"])
@pytest.mark.parametrize("name", list(CALLS))
def test_held_results_survive_and_dropped_ones_are_reused(world, checks, name, algorithm):
    n, r = world.size, world.rank
    if n == 1 or (name == "all_to_all" and algorithm != "mpi"):
        pytest.skip("nothing to recycle with one rank" if n == 1 else "all_to_all has one algorithm")
    call = CALLS[name]
    held = []
    for seed in range(3):  # three results alive at once: three distinct buffers
        x, want = case(name, n, r, seed)
        held.append((call(x, world, algorithm), want))
    for k, (out, want) in enumerate(held):
        checks.equal(out, want, f"result {k} after later calls")
    checks.true(len({o.data_ptr() for o, _ in held}) == 3, "held results share memory")
    del held, out
    hits = outputs.POOL.hits
    x, want = case(name, n, r, 0)
    checks.equal(call(x, world, algorithm), want, "result in recycled memory")
    checks.true(outputs.POOL.hits > hits, "a dropped result was not reused")
    checks.finish()
