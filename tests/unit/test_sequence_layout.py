"""Pure tests of the sequence layouts and the ring's block plan (no MPI)."""
import itertools

import pytest
import torch

from mpipar.errors import MpiparError
from mpipar.sequence.tiles import attended_pairs, col_span, hull, plan_tiles, step_plan, travel_span
from mpipar.sequence.layout import (local_positions, natural_from_storage, num_chunks, rank_chunks,
                                    shard_sequence, storage_from_natural, storage_order)


class FakeComm:
    """Enough of an mpi4py communicator for the local (no-communication) helpers."""

    def __init__(self, rank, size):
        self.rank, self.size = rank, size

    def Get_rank(self):
        return self.rank

    def Get_size(self):
        return self.size


@pytest.mark.parametrize("size", [1, 2, 3, 4, 5])
def test_rank_chunks_partition_the_sequence(size):
    for layout in ("contiguous", "zigzag"):
        order = storage_order(size, layout)
        assert sorted(order) == list(range(num_chunks(size, layout)))
    assert [rank_chunks(r, size, "zigzag") for r in range(size)] == [[r, 2 * size - 1 - r] for r in range(size)]
    assert [rank_chunks(r, size, "contiguous") for r in range(size)] == [[r] for r in range(size)]


@pytest.mark.parametrize("size,layout", list(itertools.product([1, 2, 3, 4], ["contiguous", "zigzag"])))
def test_shard_then_concatenate_is_identity(size, layout):
    x = torch.randn(2, 3, 8 * size, 5)
    parts = [shard_sequence(x, FakeComm(r, size), dim=2, layout=layout) for r in range(size)]
    assert all(p.shape == (2, 3, 8, 5) for p in parts)
    cat = torch.cat(parts, dim=2)
    assert torch.equal(natural_from_storage(cat, size, layout, dim=2), x)
    assert torch.equal(storage_from_natural(x, size, layout, dim=2), cat)
    for r in range(size):
        pos = local_positions(8 * size, r, size, layout)
        assert torch.equal(parts[r], x[:, :, pos])


def test_zigzag_shard_holds_chunks_r_and_mirror():
    x = torch.arange(16).view(1, 1, 16, 1)
    part = shard_sequence(x, FakeComm(1, 4), layout="zigzag").flatten().tolist()
    assert part == [2, 3, 12, 13]  # chunks 1 and 6 of 8 chunks of 2
    assert shard_sequence(x, FakeComm(1, 4), layout="contiguous").flatten().tolist() == [4, 5, 6, 7]


def test_shard_rejects_bad_input():
    x = torch.randn(1, 1, 6, 2)
    with pytest.raises(MpiparError):
        shard_sequence(x, FakeComm(0, 2), layout="zigzag")  # 6 % 4 != 0
    with pytest.raises(MpiparError):
        shard_sequence(x, FakeComm(0, 2), layout="striped")
    with pytest.raises(MpiparError):
        shard_sequence(x, FakeComm(0, 4), layout="contiguous")


def _covered(size, layout, causal, chunk):
    """How many times each (query position, key position) pair is computed by all ranks."""
    seq = chunk * num_chunks(size, layout)
    count = torch.zeros(seq, seq, dtype=torch.int64)
    for rank, step in itertools.product(range(size), range(size)):
        qpos = local_positions(seq, rank, size, layout)
        kpos = local_positions(seq, (rank - step) % size, size, layout)
        for b in step_plan(rank, step, size, layout, causal):
            qs, ks = qpos[b.q0 * chunk:b.q1 * chunk], kpos[b.k0 * chunk:b.k1 * chunk]
            assert not b.causal or len(qs) == len(ks)
            visible = torch.ones(len(qs), len(ks), dtype=torch.int64)
            if b.causal:
                visible = visible.tril()
            count[qs.unsqueeze(1), ks.unsqueeze(0)] += visible
    return count


@pytest.mark.parametrize("size,layout,causal",
                         list(itertools.product([1, 2, 3, 4, 5], ["contiguous", "zigzag"], [True, False])))
def test_ring_plan_covers_the_mask_exactly_once(size, layout, causal):
    count = _covered(size, layout, causal, chunk=3)
    seq = count.shape[0]
    want = torch.ones(seq, seq, dtype=torch.int64)
    if causal:
        want = want.tril()
    assert torch.equal(count, want)


def test_plan_tiles_merges_and_skips():
    assert [tuple(vars(b).values()) for b in plan_tiles([1, 6], [1, 6], True)] == [(0, 2, 0, 2, True)]
    assert [tuple(vars(b).values()) for b in plan_tiles([2, 5], [0, 7], True)] == [(0, 2, 0, 1, False)]
    assert [tuple(vars(b).values()) for b in plan_tiles([0, 7], [2, 5], True)] == [(1, 2, 0, 2, False)]
    assert plan_tiles([0], [3], True) == []
    assert [tuple(vars(b).values()) for b in plan_tiles([0, 7], [2, 5], False)] == [(0, 2, 0, 2, False)]


@pytest.mark.parametrize("size", [2, 3, 4, 8])
def test_zigzag_balances_causal_work_and_contiguous_does_not(size):
    seq = 16 * size
    zig = attended_pairs(seq, size, "zigzag", causal=True)
    con = attended_pairs(seq, size, "contiguous", causal=True)
    assert sum(zig) == sum(con) == seq * (seq + 1) // 2
    assert len(set(zig)) == 1
    assert len(set(con)) == size and con == sorted(con)  # later ranks do strictly more
    assert len(set(attended_pairs(seq, size, "contiguous", causal=False))) == 1


def test_attended_pairs_single_rank():
    assert attended_pairs(10, 1, "contiguous", True) == [55]
    assert attended_pairs(10, 1, "zigzag", False) == [100]


@pytest.mark.parametrize("size,layout,causal",
                         list(itertools.product([1, 2, 3, 4, 5], ["contiguous", "zigzag"], [True, False])))
def test_travel_span_is_the_hull_of_the_key_chunks_touched_on_the_way(size, layout, causal):
    """The backward sends only the key chunks of a block that ranks owner+1 .. owner+hops touched."""
    for owner, hops in itertools.product(range(size), range(size)):
        cols = [k for j in range(1, hops + 1) for t in step_plan((owner + j) % size, j, size, layout, causal)
                for k in range(t.k0, t.k1)]
        want = (min(cols), max(cols) + 1) if cols else None
        assert travel_span(owner, hops, size, layout, causal) == want


def test_travel_span_halves_one_gradient_at_two_zigzag_ranks():
    # rank 1's queries (chunks 1, 2) see only chunk 0 of rank 0's block (chunks 0, 3)
    assert travel_span(0, 1, 2, "zigzag", True) == (0, 1)
    # rank 0's chunk 3 sees all of rank 1's block
    assert travel_span(1, 1, 2, "zigzag", True) == (0, 2)
    assert col_span([]) is None and hull(None, (1, 2)) == (1, 2) and hull((0, 1), (2, 3)) == (0, 3)
