"""Abort on error: an unhandled exception on any rank, in any thread, ends the whole MPI job.

`Mesh()` installs the hooks (MPIPAR_ABORT_ON_ERROR=0 opts out); the experiment
drivers call `install_abort_on_exception` directly. Before aborting, the rank
writes its flight record (mpipar.flight.job) and unlinks the MPI library's
shared-memory files it maps (MPICH removes them only at MPI_Finalize).
"""
from __future__ import annotations

import os
import sys
import time

from . import peers
from .dump import dump

FATAL_GRACE_S = 1.0  # for the node's other ranks to write their records

_HOOK_MARK = "_mpipar_abort_hook"


def install_abort_on_exception() -> None:
    """Make an unhandled exception on any rank, in any thread, abort the whole MPI job.

    Sets sys.excepthook and threading.excepthook to hooks that first call the hooks
    they replace (the traceback is printed as usual), then write the flight record
    (mpipar.flight) and abort every rank (abort_job). Idempotent: installing twice
    keeps one hook. Every `Mesh` installs it (MPIPAR_ABORT_ON_ERROR=0 opts out); the
    experiment drivers also call it directly. A one-rank job is left to exit as usual.
    """
    import threading

    if not getattr(sys.excepthook, _HOOK_MARK, False):
        previous = sys.excepthook

        def hook(exc_type, exc, tb):
            previous(exc_type, exc, tb)
            _abort_on(f"unhandled {exc_type.__name__} in the main thread: {exc}")

        setattr(hook, _HOOK_MARK, True)
        hook.previous = previous
        sys.excepthook = hook
    if not getattr(threading.excepthook, _HOOK_MARK, False):
        previous_thread = threading.excepthook

        def thread_hook(args):
            previous_thread(args)
            if args.exc_type is SystemExit:  # a thread's normal way out
                return
            name = args.thread.name if args.thread is not None else "?"
            _abort_on(f"unhandled {args.exc_type.__name__} in thread {name}: {args.exc_value}")

        setattr(thread_hook, _HOOK_MARK, True)
        thread_hook.previous = previous_thread
        threading.excepthook = thread_hook


def _job_size() -> int:
    """World size of a running MPI job, 0 when MPI is not running (never initialises MPI)."""
    mpi = sys.modules.get("mpi4py.MPI")
    try:
        if mpi is None or not mpi.Is_initialized() or mpi.Is_finalized():
            return 0
        return mpi.COMM_WORLD.Get_size()
    except Exception:  # pragma: no cover - best effort
        return 0


def _abort_on(message: str) -> None:
    sys.stderr.flush()
    if _job_size() > 1:
        try:
            on_fatal(message)
        except Exception:  # pragma: no cover - the abort matters more than the record
            pass
        abort_job(1)


def abort_job(code: int = 1) -> None:
    """End every rank of the MPI job now: MPI_Abort (after unlinking the MPI library's shared
    memory files this process maps). Callable from any thread; if MPI has not ended the
    process within 10 s, os._exit(code) ends this one (the launcher then ends the rest)."""
    import threading

    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # pragma: no cover
            pass
    fallback = threading.Timer(10.0, os._exit, (code,))
    fallback.daemon = True
    fallback.start()
    try:
        if _job_size() > 1:
            unlink_mapped_shm()
            sys.modules["mpi4py.MPI"].COMM_WORLD.Abort(code)
    finally:
        os._exit(code)


def unlink_mapped_shm(prefix: str = "/dev/shm/mpich_") -> list[str]:
    """Unlink the MPI library's shared-memory files that this process maps (best effort).

    MPICH removes them at MPI_Finalize; after MPI_Abort they stay in /dev/shm (2-4 MiB for
    each job, plus any shared windows still allocated: measured, every aborted 2-rank job
    left them behind). Called just before aborting: the job is going down, its ranks have
    attached long ago, and an unlinked file lives on while some process maps it. Only the
    files this process maps are touched, so other jobs' files never are. Returns the paths."""
    try:
        with open("/proc/self/maps") as f:  # address perms offset dev inode [path]
            paths = {fields[5].strip() for fields in (line.split(maxsplit=5) for line in f) if len(fields) == 6}
    except OSError:
        return []
    removed = []
    for path in sorted(p for p in paths if p.startswith(prefix) and not p.endswith("(deleted)")):
        try:
            os.unlink(path)
            removed.append(path)
        except OSError:
            pass
    return removed


def on_fatal(message: str) -> None:
    """An unhandled exception is ending the job: write this rank's record, and have the
    other ranks of this node write theirs (what they were waiting in) before the abort."""
    if peers.recording:
        dump("exception", message)
        if peers.signal_peers():
            time.sleep(FATAL_GRACE_S)
    sys.stderr.flush()
