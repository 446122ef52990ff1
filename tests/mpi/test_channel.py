"""The p2p Channel (mpipar.comm.channel): staging, self-describing messages, failure notices,
flight records.

Ring pattern (send to rank+1, receive from rank-1): at one rank a message to
oneself, so the tests without a failing peer run at every world size. Each test
runs on its own duplicate communicator, freed at the end.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import rank_tensor

from mpipar import MpiparError
from mpipar.comm.buffers import MAX_NDIM
from mpipar.comm.channel import Channel, PeerFailed
from mpipar.flight import recorder

pytestmark = pytest.mark.mpi

# (dtype, shape) of the described messages: 0-d, empty, 2-d, MAX_NDIM dims
MESSAGES = [(torch.float64, (3, 4)), (torch.bfloat16, ()), (torch.int64, (2, 0, 3)),
            (torch.bool, (1,) * (MAX_NDIM - 1) + (5,)), (torch.float16, (7,))]


@pytest.fixture
def dup(world):
    comm = world.Dup()
    yield comm
    world.Barrier()
    comm.Free()


def peers(comm):
    r, n = comm.Get_rank(), comm.Get_size()
    return (r + 1) % n, (r - 1) % n


def test_described_messages_carry_dtype_and_shape(dup, checks):
    """A receiver that knows neither dtype nor shape gets the sender's tensor exactly,
    also when the sent tensor is not contiguous."""
    ch, (right, left) = Channel(dup), peers(dup)
    sends = []
    for i, (dt, shape) in enumerate(MESSAGES):
        t = rank_tensor(shape[::-1], dt, dup.Get_rank(), i)
        t = t.permute(*reversed(range(t.dim()))) if t.dim() > 1 else t  # non-contiguous
        sends += ch.send_described(t, right, 10 + 2 * i)
    for i, (dt, shape) in enumerate(MESSAGES):
        header = ch.recv_header(left, 10 + 2 * i)
        ch.wait([header])
        data = ch.recv_described(header.buffer, left, 10 + 2 * i, torch.device("cpu"))
        ch.wait([data])
        got = data.buffer if data.target is None else data.target
        want = rank_tensor(shape[::-1], dt, left, i)
        want = want.permute(*reversed(range(want.dim()))) if want.dim() > 1 else want
        checks.equal(got, want.contiguous(), f"message {i} ({dt}, {shape})")
    ch.wait(sends)
    checks.finish()


def test_described_messages_of_the_same_shapes_again(dup, checks):
    """Headers are kept per (dtype, shape) and parsed once per header: the same shape in
    another dtype, the same dtype in another shape, and each of them again, all arrive as
    sent, each in a tensor of its own."""
    ch, (right, left) = Channel(dup), peers(dup)
    kinds = [(torch.float32, (3, 4)), (torch.float64, (3, 4)), (torch.float32, (4, 3))] * 2
    sends = []
    for i, (dt, shape) in enumerate(kinds):
        pending = ch.send_described(rank_tensor(shape, dt, dup.Get_rank(), i), right, 40 + 2 * i)
        checks.true(not pending[0].buffer.flags.writeable, "a shared header must be read-only")
        sends += pending
    got = []
    for i, (dt, shape) in enumerate(kinds):
        header = ch.recv_header(left, 40 + 2 * i)
        ch.wait([header])
        data = ch.recv_described(header.buffer, left, 40 + 2 * i, torch.device("cpu"))
        ch.wait([data])
        got.append(data.buffer)
        checks.equal(data.buffer, rank_tensor(shape, dt, left, i), f"message {i} ({dt}, {shape})")
    checks.true(len({t.data_ptr() for t in got}) == len(got), "two receives share a tensor")
    ch.wait(sends)
    checks.finish()


def test_receive_into_a_non_contiguous_tensor_is_staged_and_copied_back(dup, checks):
    ch, (right, left) = Channel(dup), peers(dup)
    out = torch.zeros(4, 6, dtype=torch.float64)
    view = out.t()  # [6, 4], not contiguous: received through a host buffer
    recv = ch.recv(view, left, 3)
    checks.true(recv.target is view and recv.buffer is not view, "the receive was not staged")
    send = ch.send(rank_tensor((6, 4), torch.float64, dup.Get_rank()), right, 3)
    ch.wait([recv, None, send])
    checks.equal(out, rank_tensor((6, 4), torch.float64, left).t(), "received values")
    checks.finish()


def test_short_message_raises_when_the_size_is_checked(dup):
    ch, (right, left) = Channel(dup), peers(dup)
    recv = ch.recv(torch.empty(5), left, 4, check_size=True)
    send = ch.send(torch.ones(3), right, 4)
    with pytest.raises(MpiparError, match="has 12 bytes, the buffer holds 20"):
        ch.wait([recv, send])


def test_too_many_dims_or_an_unknown_dtype_raise_before_any_message(dup):
    ch, (right, _) = Channel(dup), peers(dup)
    with pytest.raises(MpiparError, match=f"at most {MAX_NDIM} dims"):
        ch.send_described(torch.zeros((1,) * (MAX_NDIM + 1)), right, 2, "test send")
    with pytest.raises(MpiparError, match="test send: cannot send"):
        ch.send_described(torch.zeros(2, dtype=torch.uint32), right, 2, "test send")
    with pytest.raises(MpiparError, match="bad header"):
        ch.recv_described(np.array([99, 1] + [0] * MAX_NDIM), right, 2, torch.device("cpu"))


def test_a_named_wait_is_a_p2p_record_of_the_flight_channel(dup):
    flight = recorder.Channel(dup, "test")
    ch, (right, left) = Channel(dup, flight), peers(dup)
    before = flight.flight_counts[1]
    recv = ch.recv(torch.empty(2), left, 5)
    ch.wait([recv, ch.send(torch.ones(2), right, 5)], "test wait", left)
    assert flight.flight_counts[1] == before + 1
    last = recorder.calls()[-1]
    assert (last["op"], last["group"], last["seq"], last["kind"]) == ("test wait", "test", before + 1, "p2p")
    assert last["peer"] == flight.world_ranks[left]
    ch.wait([])  # unnamed: not recorded
    assert flight.flight_counts[1] == before + 1


@pytest.mark.mpi(min_size=2)
def test_a_failure_notice_ends_every_watching_wait(dup):
    """Rank 0 fails; every other rank, waiting for a message rank 0 never sends, raises
    PeerFailed with rank 0's text and stops watching; its receive stays posted until cancelled."""
    ch, rank = Channel(dup), dup.Get_rank()
    ch.watch_failures(1)
    if rank == 0:
        dup.Barrier()  # every waiter has posted its receive
        ch.wait(ch.notify_failure("rank 0 failed on purpose", 1))
        assert not ch._watch
    else:
        recv = ch.recv(torch.empty(3), 0, 7)
        dup.Barrier()
        with pytest.raises(PeerFailed, match="rank 0 failed on purpose"):
            ch.wait([recv])
        assert not ch._watch and recv.request  # still posted: the caller decides
        Channel.cancel([recv])
        assert not recv.request


def test_a_polite_channel_never_waits_in_mpi_wait(dup, monkeypatch):
    """The pipeline's channel polls with back-off even with no failure watch (MPI's Wait
    would busy-poll the core a computing stage needs)."""
    import importlib

    wait = importlib.import_module("mpipar.comm.wait")  # the module (mpipar.comm.wait is also a function)

    def refuse(*args, **kwargs):
        raise AssertionError("a polite channel called MPI's Wait")

    monkeypatch.setattr(wait, "wait_all", refuse)
    monkeypatch.setattr(wait, "wait_status", refuse)
    ch, (right, left) = Channel(dup, polite=True), peers(dup)
    out = torch.zeros(3)
    ch.wait([ch.recv(out, left, 6), ch.send(torch.full((3,), float(dup.Get_rank())), right, 6)])
    assert torch.equal(out, torch.full((3,), float(left)))
