"""Writing this rank's flight record to `$MPIPAR_FLIGHT_DIR/rank<R>.json`.

Written on a watchdog timeout, an abort, an unhandled exception, and on SIGUSR2
(a live look at a running job: `kill -USR2 <pid>`, or `pkill -USR2 -f script`
for every rank). Each write replaces the file atomically (temporary name, then
rename), so a reader never sees half a record; the watchdog thread and the main
thread may both write.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time

from . import recorder
from ..settings import current as settings

FORMAT = 3  # 3: a call has `done` and `end` (None while in flight)


class _Identity:
    """Who this process is in the job (filled by mpipar.flight.job.install)."""

    rank = 0
    size = 1
    job = ""


identity = _Identity()


def record(reason: str, message: str | None = None) -> dict:
    """This rank's record as a JSON-able dict: who, why, and the calls (oldest first).

    Times are wall-clock seconds (time.time()); a call still in flight has done False, end
    None and `waited` the seconds it has waited so far."""
    now_clock, now_wall = time.perf_counter(), time.time()
    shift = now_wall - now_clock
    calls = recorder.calls()
    for c in calls:
        if not c["done"]:
            c["waited"] = round(now_clock - c["start"], 3)
        c["start"] = round(c["start"] + shift, 6)
        if c["end"] is not None:
            c["end"] = round(c["end"] + shift, 6)
    return {"format": FORMAT, "rank": identity.rank, "world_size": identity.size, "job": identity.job,
            "host": socket.gethostname(), "pid": os.getpid(), "reason": reason, "message": message,
            "time": now_wall, "recorded": recorder.count(), "capacity": recorder.CAPACITY, "calls": calls}


def path_of(rank: int, directory: str | None = None) -> str:
    return os.path.join(directory or settings().flight_dir, f"rank{rank}.json")


def dump(reason: str, message: str | None = None, directory: str | None = None) -> str | None:
    """Write the record; returns its path, or None when it could not be written (reported on stderr)."""
    path = path_of(identity.rank, directory)
    try:
        data = json.dumps(record(reason, message), indent=1)
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
        with open(tmp, "w") as f:
            f.write(data)
        os.replace(tmp, path)
        return path
    except Exception as exc:  # never let the record hide the failure it documents
        try:
            import sys

            print(f"mpipar flight: rank {identity.rank} could not write {path}: {exc}", file=sys.stderr, flush=True)
        except Exception:  # pragma: no cover
            pass
        return None
