"""The other ranks of this node, so that a rank that times out or fails can ask them
(SIGUSR2) to write their flight records before the job is aborted."""
from __future__ import annotations

import os
import signal
import socket

known: list = []   # (host, pid, process start ticks) of the ranks of the first mesh (flight.job.install)
recording = False  # set once flight.job.install ran: records are worth writing


def start_ticks(pid: int) -> str | None:
    """The process's start time in clock ticks (/proc/PID/stat field 22): pid and this tell
    a live process from a later one that reuses its pid."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def signal_peers() -> int:
    """Send SIGUSR2 to the other ranks of this node (still the same processes), so that they
    write their records too. Returns how many were asked."""
    host, mine = socket.gethostname(), os.getpid()
    asked = 0
    for h, pid, ticks in known:
        if h != host or pid == mine or ticks is None or start_ticks(pid) != ticks:
            continue
        try:
            os.kill(pid, signal.SIGUSR2)
            asked += 1
        except OSError:
            pass
    return asked
