"""Jobs that never hang: the flight recorder, the watchdog, abort on error, the verdict.

- recorder: the last 256 communication calls of this rank (always on).
- watchdog: a thread that aborts the job when a call waits past MPIPAR_TIMEOUT.
- dump: writes the record to $MPIPAR_FLIGHT_DIR/rank<R>.json (timeout, unhandled
  exception, SIGUSR2).
- job: what `Mesh()` installs once per process (hooks, watchdog, SIGUSR2).
- verdict: lines the ranks' records up (`python -m mpipar.flight DIR`).
Settings (MPIPAR_TIMEOUT, MPIPAR_FLIGHT_DIR, MPIPAR_ABORT_ON_ERROR): mpipar.settings.
"""
from __future__ import annotations

from .dump import dump

__all__ = ["dump"]
