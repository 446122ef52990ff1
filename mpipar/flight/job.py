"""Installing abort-on-error, the watchdog and the SIGUSR2 record for this process (once).

`install(comm)` runs inside the first `Mesh(...)` (collective over the mesh's
communicator: one small allgather of host, pid and process start time, so that
a rank whose watchdog fires can ask the other ranks on its node for their
records). It removes this rank's flight record left by an earlier job, so the
files in MPIPAR_FLIGHT_DIR always come from this one.
"""
from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time

from .dump import dump, identity, path_of
from .settings import settings
from .watchdog import Watchdog

_installed = False
_peers: list = []      # (host, pid, process start ticks) of the ranks of the first mesh
_watchdog: Watchdog | None = None
FATAL_GRACE_S = 1.0  # for the node's other ranks to write their records


def _start_ticks(pid: int) -> str | None:
    """The process's start time in clock ticks (/proc/PID/stat field 22): pid and this tell
    a live process from a later one that reuses its pid."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _launcher_job() -> str | None:
    """The scheduler's id of this job step, when it gives one (the same on every rank)."""
    if os.environ.get("SLURM_JOB_ID"):
        return f"slurm:{os.environ['SLURM_JOB_ID']}.{os.environ.get('SLURM_STEP_ID', '')}"
    for var in ("PBS_JOBID", "PMIX_NAMESPACE", "OMPI_MCA_orte_ess_jobid"):
        if os.environ.get(var):
            return f"{var}:{os.environ[var]}"
    return None


def install(comm) -> None:
    """Collective over `comm` the first time (every rank of it builds the Mesh); later a no-op."""
    global _installed, _peers, _watchdog
    if _installed:
        return
    from mpi4py import MPI

    s = settings()
    world = MPI.COMM_WORLD
    identity.rank, identity.size = world.Get_rank(), world.Get_size()
    me = (socket.gethostname(), os.getpid(), _start_ticks(os.getpid()))
    _peers = comm.allgather(me)
    identity.job = _launcher_job() or "%s:%d" % _peers[0][:2]
    _installed = True
    try:
        os.remove(path_of(identity.rank))  # a record of an earlier job
    except OSError:
        pass
    if s.abort_on_error:
        from ..errors import install_abort_on_exception

        install_abort_on_exception()
    wake_fd = _install_sigusr2()
    if s.timeout > 0 or wake_fd is not None:
        _watchdog = Watchdog(s.timeout, wake_fd)
        _watchdog.start()


def _install_sigusr2() -> int | None:
    """SIGUSR2 writes this rank's record. Returns the read end of the signal wakeup pipe when
    the watchdog thread serves it (then the record is written even while the main thread
    is blocked in MPI), else None (the handler writes it, from the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    try:
        previous = signal.getsignal(signal.SIGUSR2)
    except (ValueError, AttributeError):  # pragma: no cover - no SIGUSR2 here
        return None
    wake = [None]

    def on_sigusr2(signum, frame):
        if wake[0] is None:
            dump("signal")
        if callable(previous):
            previous(signum, frame)

    read_fd = write_fd = None
    try:
        read_fd, write_fd = os.pipe()
        os.set_blocking(write_fd, False)
        os.set_blocking(read_fd, False)
        signal.signal(signal.SIGUSR2, on_sigusr2)
        old = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        if old != -1:  # someone's (asyncio's) wakeup descriptor: leave it theirs
            signal.set_wakeup_fd(old)
            os.close(read_fd)
            os.close(write_fd)
            return None
        wake[0] = read_fd
        return read_fd
    except (OSError, ValueError):
        for fd in (read_fd, write_fd):
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass
        return None


def signal_peers() -> int:
    """Send SIGUSR2 to the other ranks of this node (still the same processes), so that they
    write their records too. Returns how many were asked."""
    host, mine = socket.gethostname(), os.getpid()
    asked = 0
    for h, pid, ticks in _peers:
        if h != host or pid == mine or ticks is None or _start_ticks(pid) != ticks:
            continue
        try:
            os.kill(pid, signal.SIGUSR2)
            asked += 1
        except OSError:
            pass
    return asked


def on_fatal(message: str) -> None:
    """An unhandled exception is ending the job: write this rank's record, and have the
    other ranks of this node write theirs (what they were waiting in) before the abort."""
    if _installed:
        dump("exception", message)
        if signal_peers():
            time.sleep(FATAL_GRACE_S)
    sys.stderr.flush()
