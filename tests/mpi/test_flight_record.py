"""The flight record of real collectives at 1-4 ranks: every rank numbers the same calls
alike, and an all_reduce whose dtype and shape its argument agreement describes (small,
large, symmetric; validated or not) is recorded with them."""
from __future__ import annotations

import pytest
import torch

import mpipar
from mpipar import comm
from mpipar.flight import recorder

pytestmark = pytest.mark.mpi


def test_all_reduce_records_dtype_shape_and_the_same_numbers_on_every_rank(world):
    g = mpipar.Mesh(comm=world).world
    big = comm.symmetric_empty((3, 5000), torch.float64, g)
    big.fill_(1.0)
    calls = [(torch.ones(4, 2), {}), (torch.ones(5000, dtype=torch.float64), {}), (big, {}),
             (torch.ones(6, dtype=torch.int32), {"validate": False})]
    for t, kw in calls:
        comm.all_reduce(t, g, **kw)
    mine = [c for c in recorder.calls() if c["op"] == "all_reduce" and c["group"] == g.name][-len(calls):]
    assert [(c["dtype"], c["shape"]) for c in mine] == \
        [("float32", [4, 2]), ("float64", [5000]), ("float64", [3, 5000]), ("int32", [6])]
    assert all(c["done"] and c["ranks"] == list(range(g.size)) for c in mine)
    assert mine[-1]["bytes"] == 24
    seqs = g.comm.allgather([c["seq"] for c in mine])
    assert all(s == seqs[0] for s in seqs) and seqs[0] == sorted(seqs[0])
    del big
    comm.free_symmetric(g)
