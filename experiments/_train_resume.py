"""train_gpt.py's preemption, checkpoints and per-step table (kept here so the driver stays short).

`Run` owns, for one layout: the checkpoint folder (`--save`; with several
layouts one subfolder per layout), where to resume from (`--resume`), the
signal trap (`mpipar.models.preempt`) and rank 0's durable per-step table
/results/train_gpt (a `ResultsWriter`: each row is on disk when the step
ends, so a killed run keeps its rows; a resumed run skips the steps already
stored). A fresh run (no --resume) replaces an old /results/train_gpt, and
refuses a --save folder that holds another run's checkpoints (keep-N would
delete the new ones, and --resume would pick the old).
"""
from __future__ import annotations

import os
import statistics
import sys

from mpipar.agree import agree
from mpipar.models import checkpoint, preempt
from mpipar.trace import ResultsWriter, atomic_h5, read_results

CONFIG_COLUMNS = ("layout", "dp", "pp", "sp", "tp", "schedule", "step", "tokens")
TABLE = "train_gpt"


def _drop_table(out: str) -> None:
    """Rank 0: remove /results/train_gpt from an existing `out`."""
    if os.path.exists(out):
        with atomic_h5(out) as f:
            if f"results/{TABLE}" in f:
                del f[f"results/{TABLE}"]


_TRAP: list = []


def _trap(comm) -> preempt.Preemption:
    """One trap for the whole process, installed with the first layout and kept between layouts
    (a signal that lands between two layouts stops the next one after its first step)."""
    if not _TRAP:
        _TRAP.append(preempt.Preemption(comm).__enter__())
    _TRAP[0].comm = comm
    return _TRAP[0]


class Run:
    """Checkpointing, preemption and the step table of one layout's training run (collective)."""

    def __init__(self, cfg, name: str, multi: bool, comm, units: dict, attrs: dict):
        self.cfg, self.name, self.comm = cfg, name, comm
        self.save_dir = os.path.join(cfg.save, name) if cfg.save and multi else cfg.save
        self.resume_dir = os.path.join(cfg.resume, name) if cfg.resume and multi else cfg.resume
        if multi and self.resume_dir:  # a layout that had not started yet starts afresh
            has = comm.bcast(checkpoint.latest(self.resume_dir) is not None if comm.rank == 0 else None)
            self.resume_dir = self.resume_dir if has else ""
        err, self.rows = None, None
        if comm.rank == 0 and self.save_dir and checkpoint.latest(self.save_dir) and (
                not self.resume_dir or os.path.realpath(self.resume_dir) != os.path.realpath(self.save_dir)):
            err = (f"train_gpt: --save {self.save_dir} already holds checkpoints of another run (newest "
                   f"{checkpoint.latest(self.save_dir)}); continue it with --resume {cfg.save} or save elsewhere")
        if comm.rank == 0 and err is None:
            try:
                if not cfg.resume and not _TRAP:  # a fresh run, first layout: a new table
                    _drop_table(cfg.out)
                self.rows = ResultsWriter(cfg.out, TABLE, units, attrs=attrs)
            except Exception as exc:  # noqa: BLE001 - reported on every rank
                err = f"train_gpt: cannot open {cfg.out}: {type(exc).__name__}: {exc}"
        agree(comm, err)
        self.trap = _trap(comm)

    def start(self, model, optimizer) -> int:
        """The first step: 0, or the step of the newest complete checkpoint of --resume (restored)."""
        return preempt.resume(model, optimizer, self.resume_dir) if self.resume_dir else 0

    def record(self, row: dict) -> None:
        """Rank 0: store the step's row durably (a step already stored by a killed run is kept)."""
        if self.rows is not None:
            config = {k: row[k] for k in CONFIG_COLUMNS}
            if not self.rows.done(config):
                self.rows.append(config, {k: v for k, v in row.items() if k not in config})

    def after_step(self, model, optimizer, next_step: int) -> int:
        """Collective: checkpoint when due (every --save-every steps, at the end, or on a signal);
        returns the agreed signal number (0: go on)."""
        signum = self.trap.agreed()
        every = self.cfg.save_every
        due = signum or next_step == self.cfg.steps or (every > 0 and next_step % every == 0)
        if self.save_dir and due:
            path = preempt.save(model, optimizer, self.save_dir, next_step, self.cfg.keep)
            if self.comm.rank == 0 and signum:
                print(f"[{self.name}] signal {signum}: saved {path}; exiting "
                      f"{preempt.exit_code(signum)} (--resume {self.cfg.save} continues)", flush=True)
        return signum

    def stop(self, signum: int) -> None:
        if signum:
            sys.stdout.flush()
            raise SystemExit(preempt.exit_code(signum))

    def summary(self, warmup: int) -> dict | None:
        """Rank 0: first/last loss and median step time of this layout from the stored rows."""
        if self.rows is None:
            return None
        cols = read_results(self.cfg.out, TABLE)
        mine = sorted((int(s), float(l), float(t), int(r), int(a)) for n, s, l, t, r, a in zip(
            cols["layout"].astype(str), cols["step"], cols["loss"], cols["step_s"], cols["max_rss_bytes"],
            cols["max_activation_peak_bytes"]) if n == self.name)
        if not mine:
            return None
        timed = [m[2] for m in mine][warmup:] or [m[2] for m in mine]
        return {"first_loss": mine[0][1], "last_loss": mine[-1][1], "step_s": statistics.median(timed),
                "max_rss_bytes": max(m[3] for m in mine), "max_activation_peak_bytes": max(m[4] for m in mine)}
