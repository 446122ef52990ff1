"""mpipar.models.preempt: a signal on one rank stops every rank after the same step."""
from __future__ import annotations

import os
import signal

import pytest
from mpi4py import MPI

from mpipar.models import preempt

WORLD = MPI.COMM_WORLD


@pytest.mark.mpi
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_signal_on_last_rank_is_agreed_by_all(sig):
    before = signal.getsignal(sig)
    with preempt.Preemption(WORLD) as trap:
        assert trap.agreed() == 0
        stopped_at = None
        for step in range(5):
            if step == 2 and WORLD.rank == WORLD.Get_size() - 1:
                os.kill(os.getpid(), sig)  # the handler only sets the flag: this rank goes on
            signum = trap.agreed()
            if signum:
                stopped_at = step
                break
        assert signum == sig and stopped_at == 2
        assert WORLD.allgather(stopped_at) == [2] * WORLD.Get_size()
        assert preempt.exit_code(signum) == 128 + sig
    assert signal.getsignal(sig) == before  # the previous handler is back


@pytest.mark.mpi
def test_check_ends_every_rank_at_the_same_point_with_128_plus_signal():
    """A sweep driver's `check` between points: a signal on the last rank ends every rank at
    the same point (SystemExit 128 + signal) after what finished, and nothing before it."""
    sig = signal.SIGUSR1
    trap = preempt.trap(WORLD)
    try:
        finished = []
        with pytest.raises(SystemExit) as stop:
            for point in range(5):
                finished.append(point)  # the point in hand finishes, then the agreement
                if point == 1 and WORLD.rank == WORLD.Get_size() - 1:
                    os.kill(os.getpid(), sig)
                trap.check("test sweep")
        assert stop.value.code == 128 + sig and trap.stopped == sig
        assert WORLD.allgather(finished) == [[0, 1]] * WORLD.Get_size()
    finally:
        trap.__exit__(None, None, None)
