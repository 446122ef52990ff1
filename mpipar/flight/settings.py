"""The environment settings of abort-on-error, the watchdog and the flight recorder, read once.

- MPIPAR_TIMEOUT: seconds a rank may wait inside one mpipar communication call
  before the watchdog writes the flight record and aborts the job (default 600;
  0 turns the watchdog off).
- MPIPAR_FLIGHT_DIR: where flight records go, as rank<R>.json (default
  mpipar-flight, relative to the working directory).
- MPIPAR_ABORT_ON_ERROR: 0 keeps building a Mesh from installing the hooks that
  abort the job on an unhandled exception (default 1).
"""
from __future__ import annotations

import dataclasses
import functools
import os

from ..errors import MpiparError


@dataclasses.dataclass(frozen=True)
class FlightSettings:
    timeout: float = 600.0
    flight_dir: str = "mpipar-flight"
    abort_on_error: bool = True


@functools.lru_cache(maxsize=None)
def settings() -> FlightSettings:
    """The settings from the environment (read at the first call; `settings.cache_clear()` rereads)."""
    raw = os.environ.get("MPIPAR_TIMEOUT", "").strip()
    try:
        timeout = float(raw) if raw else FlightSettings.timeout
    except ValueError:
        raise MpiparError(f"MPIPAR_TIMEOUT must be a number of seconds (0: off), got {raw!r}") from None
    if timeout < 0 or timeout != timeout:
        raise MpiparError(f"MPIPAR_TIMEOUT must be >= 0 (0: off), got {raw!r}")
    abort = os.environ.get("MPIPAR_ABORT_ON_ERROR", "1").strip().lower() not in ("0", "false", "no", "off")
    return FlightSettings(timeout=timeout, flight_dir=os.environ.get("MPIPAR_FLIGHT_DIR") or FlightSettings.flight_dir,
                          abort_on_error=abort)
