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
import threading

from . import peers
from .dump import dump, identity, path_of
from ..settings import current as settings
from .watchdog import Watchdog

_installed = False
_watchdog: Watchdog | None = None


def install(comm) -> None:
    """Collective over `comm` the first time (every rank of it builds the Mesh); later a no-op."""
    global _installed, _watchdog
    if _installed:
        return
    from mpi4py import MPI

    s = settings()
    world = MPI.COMM_WORLD
    identity.rank, identity.size = world.Get_rank(), world.Get_size()
    me = (socket.gethostname(), os.getpid(), peers.start_ticks(os.getpid()))
    peers.known[:] = comm.allgather(me)
    identity.job = "%s:%d" % peers.known[0][:2]  # host and pid of the mesh's first rank
    _installed = True
    peers.recording = True
    try:
        os.remove(path_of(identity.rank))  # a record of an earlier job
    except OSError:
        pass
    if s.abort_on_error != "0":
        from .abort import install_abort_on_exception

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
