"""Preemptible training: trap the scheduler's signal, stop all ranks on the same step, checkpoint, resume.

    with Preemption(mesh.world.comm) as stop:
        for step in range(start, steps):
            train one step
            signum = stop.agreed()          # collective: 0, or the signal every rank now acts on
            if signum or due(step):
                preempt.save(model, opt, run_dir, step + 1, keep)
            if signum:
                raise SystemExit(exit_code(signum))     # 128 + signal: non-zero, the scheduler requeues
    start = preempt.resume(model, opt, run_dir)         # newest complete step, optimizer, data, RNG

SIGTERM (a scheduler's kill, `scancel`, `mpiexec` forwarding its own) and
SIGUSR1 (SLURM's `--signal=B:USR1@120`, forwarded by the job script) only set
a flag in the handler: the step in hand finishes. `agreed()` all-reduces the
flag (one 8-byte MAX) after each step, so a signal seen by any rank stops every
rank after the same step, and nobody waits in a collective the others skipped.

A sweep driver (experiments/collectives.py and the like), whose rows are stored
one by one, stops between points the same way:

    stop = preempt.trap(comm)               # for the rest of the process
    for point in points:
        measure the point, store its row
        stop.check("collectives")           # collective: every rank exits 128 + signal here

`save`/`resume` wrap `checkpoint.save_step`/`load_full` with each rank's RNG
state (`rng_state`), and the step: the data position of a corpus indexed by
step. On the same layout the resumed run repeats the uninterrupted one exactly.
"""
from __future__ import annotations

import signal
import sys

import numpy as np

from . import checkpoint, rng_state

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def exit_code(signum: int) -> int:
    """The shell's code for a death by `signum` (128 + signum): non-zero, and tells which signal."""
    return 128 + int(signum)


class Preemption:
    """Trap `signals` while in the `with` block (previous handlers come back on exit)."""

    def __init__(self, comm=None, signals=SIGNALS):
        self.comm, self.signals = comm, tuple(signals)
        self.signum = 0
        self.stopped = 0  # the signal `agreed` last returned
        self._previous: dict = {}

    def _handler(self, signum, _frame) -> None:
        if not self.signum:  # the first signal wins; later ones change nothing (the save is under way)
            self.signum = signum

    def __enter__(self) -> "Preemption":
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def agreed(self) -> int:
        """Collective over `comm`: the highest signal number any rank has received, 0 if none."""
        if self.comm is None:
            self.stopped = self.signum
            return self.stopped
        from mpi4py import MPI

        from ..flight.recorder import channel_of, recorded

        flag = np.array([self.signum], dtype=np.int64)
        recorded(channel_of(self.comm), "preemption agree", self.comm.Allreduce, MPI.IN_PLACE, flag, op=MPI.MAX)
        self.stopped = int(flag[0])
        return self.stopped

    def finish(self, who: str) -> None:
        """When `agreed` returned a signal: say so (rank 0) and exit 128 + signal. Call it once
        what finished is stored."""
        if not self.stopped:
            return
        if self.comm is None or self.comm.Get_rank() == 0:
            print(f"{who}: signal {self.stopped}: stopped after the point in hand; what finished is stored",
                  file=sys.stderr, flush=True)
        raise SystemExit(exit_code(self.stopped))

    def check(self, who: str) -> None:
        """Collective over `comm` between two points of a sweep: `agreed`, then `finish`, so every
        rank ends at this same point once any rank has been signalled."""
        self.agreed()
        self.finish(who)


def trap(comm) -> Preemption:
    """A Preemption over `comm` for the rest of this process (a sweep driver: SIGTERM and SIGUSR1
    stop it after the point in hand)."""
    return Preemption(comm).__enter__()


def save(model, optimizer, run_dir: str, step: int, keep: int = 2, extra: dict | None = None) -> str:
    """Collective: checkpoint into run_dir/step-NNNNNN with `step` (the next step to run) and every
    rank's RNG state; keeps the newest `keep`. Returns the folder."""
    return checkpoint.save_step(model, optimizer, run_dir, step, extra, keep,
                                rank_state={"rng": rng_state.capture()})


def resume(model, optimizer, path: str) -> int:
    """Collective: load the newest complete checkpoint of `path` (a run folder or one checkpoint)
    into model and optimizer, restore this rank's RNG state when the layout is the same, and
    return the step to continue from."""
    loaded = checkpoint.load_full(model, optimizer, path)
    if isinstance(loaded.rank_state, dict) and "rng" in loaded.rank_state:
        rng_state.restore(loaded.rank_state["rng"])
    extra = loaded.extra if isinstance(loaded.extra, dict) else {}
    return int(extra.get("step", 0))
