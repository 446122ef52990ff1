"""The pipeline transport after a peer's failure: no receive of ours stays posted.

A receive left posted after its request and buffer were dropped lets MPI write
a later message into freed memory (a heap corruption that aborts some later,
unrelated test). Each test here makes one stage fail while another waits in
`recv`, then sends the message the waiting stage had been expecting and checks
it is still unreceived (a cancelled receive), not swallowed (a stale one).
"""
import time

import numpy as np
import pytest
import torch
from mpi4py import MPI

from mpipar.comm.buffers import DTYPE_CODES
from mpipar.pipeline.transport import PeerFailed, Transport, message_tag

COMM = MPI.COMM_WORLD
P, RANK = COMM.Get_size(), COMM.Get_rank()
KEY = (0, 0, 1)  # activation of microbatch 0 for virtual stage 1


def _probe(comm, source, tag, seconds=2.0) -> bool:
    """True once a message (source, tag) is waiting unreceived; False after `seconds`."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if comm.Iprobe(source=source, tag=tag):
            return True
        time.sleep(1e-3)
    return False


def _drain(comm, source, tag) -> None:
    if comm.Iprobe(source=source, tag=tag):
        status = MPI.Status()
        comm.Probe(source=source, tag=tag, status=status)
        comm.Recv(bytearray(max(status.Get_count(MPI.BYTE), 1)), source=source, tag=tag)


def _drain_all(comm) -> None:
    """Receive every message still queued on `comm` (after a barrier: all were sent)."""
    COMM.Barrier()
    status = MPI.Status()
    while comm.Iprobe(source=MPI.ANY_SOURCE, tag=MPI.ANY_TAG, status=status):
        comm.Recv(bytearray(max(status.Get_count(MPI.BYTE), 1)), source=status.Get_source(),
                  tag=status.Get_tag())
    COMM.Barrier()


def _send_header(comm, dst, key, num_virtual, n) -> None:
    header = np.zeros(10, dtype=np.int64)
    header[:3] = (DTYPE_CODES[torch.float64], 1, n)
    comm.Send(header, dest=dst, tag=message_tag(key, num_virtual))


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("waiting_for", ["header", "data"])
@pytest.mark.parametrize("failing", ["first", "last"])
def test_waiting_stages_cancel_their_receives_when_a_peer_fails(waiting_for, failing):
    """Every other rank waits in recv for KEY from the failing rank, which fails instead:
    each raises PeerFailed, and its receive is cancelled, so the late message stays unreceived."""
    bad = 0 if failing == "first" else P - 1
    comm = COMM.Dup()
    try:
        transport = Transport(comm, num_virtual=2, device=torch.device("cpu"))
        tag = message_tag(KEY, 2) + (0 if waiting_for == "header" else 1)
        transport.begin([] if RANK == bad else [(KEY, bad)])
        if waiting_for == "data":  # the header arrives and the data receive is posted
            if RANK == bad:
                for dst in range(P):
                    if dst != bad:
                        _send_header(comm, dst, KEY, 2, 4)
            else:
                while KEY not in transport._data:
                    transport.progress()
        COMM.Barrier()
        if RANK == bad:
            transport.fail(f"stage {bad} failed on purpose")
            transport.finish()
        else:
            with pytest.raises(PeerFailed, match=f"stage {bad} failed on purpose"):
                transport.recv(KEY)
        COMM.Barrier()  # every waiter has raised (and cancelled) before the late message leaves
        if RANK == bad:
            for dst in range(P):
                if dst != bad:
                    comm.Send(np.zeros(10 if waiting_for == "header" else 4), dest=dst, tag=tag)
        else:
            assert _probe(comm, bad, tag), f"the {waiting_for} receive stayed posted after PeerFailed"
    finally:
        _drain_all(comm)  # a message left on a freed communicator would reach the next Dup
        comm.Free()


@pytest.mark.mpi(min_size=2)
def test_runner_leaves_no_receive_posted_after_a_stage_fails():
    """Through PipelineRunner: the last stage fails at its first forward; afterwards a
    message on every tag a stage could have been waiting for is still unreceived, and
    close() has kept the broken runner's communicator (still usable here)."""
    from torch import nn

    from mpipar.errors import MpiparError
    from mpipar.pipeline import PipelineRunner

    chunk = nn.Linear(3 if RANK < P - 1 else 7, 3, dtype=torch.float64)
    runner = PipelineRunner(chunk, COMM, schedule="1f1b", num_microbatches=P,
                            loss_fn=lambda out, y: ((out - y) ** 2).mean())
    x, y = torch.zeros(P, 3, dtype=torch.float64), torch.zeros(P, 3, dtype=torch.float64)
    with pytest.raises(MpiparError, match=f"stage {P - 1} failed"):
        runner.step(x, y)
    comm = runner._comm
    runner.close()  # a broken runner keeps its communicator: stale messages must not reach a new one
    assert comm != MPI.COMM_NULL, "close() freed the communicator of a broken runner"
    mine = sorted({(peer, message_tag(key, P) + part)
                   for kind, _, peer, _, key in runner.plan if kind == "recv" and peer != RANK
                   for part in (0, 1)})
    wanted = COMM.allgather(mine)  # every rank sends each peer one message on each tag it expects
    for dst in range(P):
        for src, tag in wanted[dst]:
            if src == RANK:
                comm.Send(np.zeros(1, dtype=np.int64), dest=dst, tag=tag)
    COMM.Barrier()
    swallowed = [(src, tag) for src, tag in mine if not _probe(comm, src, tag, seconds=0.5)]
    for src, tag in mine:
        _drain(comm, src, tag)
    assert not swallowed, f"receives still posted after the failure (source, tag): {swallowed}"
