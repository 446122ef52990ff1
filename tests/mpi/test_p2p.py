"""Point-to-point on tensors: send/recv/isend/irecv, tags, size checks, wait_all.

Every test uses a ring pattern (send to rank+1, receive from rank-1), which at
one rank is a message to oneself, so every test runs at every world size.
Sends are non-blocking where a blocking one could deadlock.
"""
from __future__ import annotations

import pytest
import torch
from conftest import rank_tensor

from mpipar import MpiparError, comm

pytestmark = pytest.mark.mpi

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16,
          torch.int32, torch.int64, torch.uint8, torch.bool]


def peers(world):
    return (world.rank + 1) % world.size, (world.rank - 1) % world.size


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_isend_irecv_ring(world, checks, dtype):
    right, left = peers(world)
    for seed, shape in enumerate([(5,), (2, 3, 4), (0, 2)]):
        out = rank_tensor(shape, dtype, world.rank, seed)
        buf = torch.empty(shape, dtype=dtype)
        rreq = comm.irecv(buf, left, world, tag=3)
        sreq = comm.isend(out, right, world, tag=3)
        got = rreq.wait()
        sreq.wait()
        checks.true(got is buf, "irecv().wait() must return the buffer")
        checks.equal(buf, rank_tensor(shape, dtype, left, seed), f"shape {shape}")
    checks.finish()


def test_blocking_send_recv_pairs(world, checks):
    """send/recv between pairs (0,1), (2,3): even ranks send first, odd ranks receive first."""
    n, r = world.size, world.rank
    if n == 1:
        pytest.skip("needs a partner rank")
    partner = r ^ 1
    if partner >= n:  # the odd one out at n=3
        checks.finish()
        return
    mine = rank_tensor((4, 3), torch.float64, r, 0)
    buf = torch.empty(4, 3, dtype=torch.float64)
    if r % 2 == 0:
        comm.send(mine, partner, world)
        got = comm.recv(buf, partner, world)
    else:
        got = comm.recv(buf, partner, world)
        comm.send(mine, partner, world)
    checks.true(got is buf, "recv must return the buffer")
    checks.equal(buf, rank_tensor((4, 3), torch.float64, partner, 0), "pair exchange")
    checks.finish()


def test_tags_keep_messages_apart(world, checks):
    """Two messages to the same peer with different tags, received in the opposite order."""
    right, left = peers(world)
    first = torch.full((6,), 100.0 + world.rank)
    second = torch.full((6,), 200.0 + world.rank)
    sends = [comm.isend(first, right, world, tag=1), comm.isend(second, right, world, tag=2)]
    b2, b1 = torch.empty(6), torch.empty(6)
    comm.irecv(b2, left, world, tag=2).wait()
    comm.irecv(b1, left, world, tag=1).wait()
    comm.wait_all(sends)
    checks.equal(b1, torch.full((6,), 100.0 + left), "tag 1")
    checks.equal(b2, torch.full((6,), 200.0 + left), "tag 2")
    checks.finish()


def test_user_tags_do_not_match_ring_collectives(world, checks):
    """A pending user irecv with tag 0 is not filled by a ring all-reduce's internal traffic."""
    right, left = peers(world)
    buf = torch.full((8,), -1.0)
    rreq = comm.irecv(buf, left, world, tag=0)
    x = torch.ones(8)
    comm.all_reduce(x, world, algorithm="ring")
    sreq = comm.isend(torch.full((8,), float(world.rank)), right, world, tag=0)
    comm.wait_all([rreq, sreq])
    checks.equal(x, torch.full((8,), float(world.size)), "all_reduce")
    checks.equal(buf, torch.full((8,), float(left)), "user message")
    checks.finish()


def test_noncontiguous_send_and_recv(world, checks):
    right, left = peers(world)
    src = rank_tensor((4, 3), torch.float32, world.rank, 1).t()  # (3, 4) view, not contiguous
    base = torch.zeros(4, 3)
    buf = base.t()
    rreq = comm.irecv(buf, left, world, tag=9)
    sreq = comm.isend(src, right, world, tag=9)
    got = rreq.wait()
    sreq.wait()
    checks.true(got is buf, "irecv().wait() must return the buffer")
    checks.equal(buf, rank_tensor((4, 3), torch.float32, left, 1).t(), "transposed view")
    checks.equal(base, rank_tensor((4, 3), torch.float32, left, 1), "underlying storage")
    checks.finish()


def test_wait_all_and_test(world, checks):
    """comm.wait_all takes mpipar requests (receives finished: buffers filled); test() polls."""
    right, left = peers(world)
    bufs = [torch.empty(3, dtype=torch.int64) for _ in range(3)]
    reqs = [comm.irecv(b, left, world, tag=20 + i) for i, b in enumerate(bufs)]
    reqs += [comm.isend(torch.full((3,), 10 * world.rank + i), right, world, tag=20 + i) for i in range(3)]
    comm.wait_all(reqs)
    for i, b in enumerate(bufs):
        checks.equal(b, torch.full((3,), 10 * left + i), f"message {i}")
    buf = torch.empty(2)
    rreq = comm.irecv(buf, left, world, tag=30)
    sreq = comm.isend(torch.full((2,), 7.0), right, world, tag=30)
    while not rreq.test():
        pass
    checks.true(sreq.wait() is not None, "isend().wait()")
    checks.equal(buf, torch.full((2,), 7.0), "after test()")
    checks.true(rreq.wait() is buf, "wait after test returns the buffer")
    checks.finish()


@pytest.mark.parametrize("sent,posted", [(3, 5), (5, 3)], ids=["shorter", "longer"])
def test_recv_size_mismatch_raises(world, checks, sent, posted):
    """A message shorter or longer than the receive buffer raises MpiparError on the receiver."""
    right, left = peers(world)
    sreq = comm.isend(torch.ones(sent), right, world, tag=4)
    with pytest.raises(MpiparError):
        comm.irecv(torch.empty(posted), left, world, tag=4).wait()
    sreq.wait()
    world.Barrier()
    # the pair still works afterwards
    buf = torch.empty(2)
    rreq = comm.irecv(buf, left, world, tag=5)
    comm.isend(torch.full((2,), float(world.rank)), right, world, tag=5).wait()
    checks.equal(rreq.wait(), torch.full((2,), float(left)), "after a mismatch")
    checks.finish()


def test_bad_peer_and_tag_raise(world):
    with pytest.raises(MpiparError):
        comm.isend(torch.ones(1), world.size, world)
    with pytest.raises(MpiparError):
        comm.irecv(torch.ones(1), -1, world)
    with pytest.raises(MpiparError):
        comm.isend(torch.ones(1), 0, world, tag=-1)
    with pytest.raises(MpiparError):
        comm.irecv(torch.ones(1), 0, world, tag=1 << 20)
