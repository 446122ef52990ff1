"""experiments/collectives.py --phases: where one single call of mpipar's "auto" spends its time.

Each call is started together after a polite barrier (the single mode), and the phases
are timed by wrapping the functions that do them (wall time inside each, per rank):
- agreement: the argument exchange (mpipar.comm.agreement.inline; MPI's Allgather or the
  shared-memory table), which waits for the last rank to arrive;
- prestage / stage: copying a plain tensor into the shared scratch window before the
  agreement (symmetric.collectives.prestage) or after it, with its barrier (entry.stage_in);
- shm kernel: the shared-memory reduction or copies; shm barrier: its exit barrier;
- mpi: MPI's own collective (mpipar.comm.wait.complete), waiting included;
- output: taking the result tensor (mpipar.comm.outputs: recycled, or fresh pages).
"rest" is the call's time outside them (Python, checks, local copies). Mean over the
--iters calls and over ranks; rank 0 prints one line per op and size.
"""
from __future__ import annotations

import collections
import contextlib
import importlib
import time

import numpy as np
import torch

from mpipar import comm as C

PHASES = (("mpipar.comm.agreement.inline", "_gather_checked", "agreement"),
          ("mpipar.comm.symmetric.collectives", "prestage", "prestage"),
          ("mpipar.comm.symmetric.collectives", "stage_in", "stage"),
          ("mpipar.comm.symmetric.collectives", "_all_reduce", "shm kernel"),
          ("mpipar.comm.symmetric.collectives", "barrier", "shm barrier"),
          ("mpipar.comm.collectives", "complete", "mpi"),
          ("mpipar.comm.backends.mpi", "complete", "mpi"),
          ("mpipar.comm.outputs", "empty", "output"))


@contextlib.contextmanager
def timed_phases(acc: dict):
    """Wrap each phase's function for the duration (restored after), adding its wall time to acc."""
    saved = []
    for module, name, label in PHASES:
        mod = importlib.import_module(module)
        fn = getattr(mod, name, None)
        if fn is None:
            continue

        def wrapper(*args, _fn=fn, _label=label, **kwargs):
            start = time.perf_counter()
            try:
                return _fn(*args, **kwargs)
            finally:
                acc[_label] += time.perf_counter() - start
        saved.append((mod, name, fn))
        setattr(mod, name, wrapper)
    try:
        yield
    finally:
        for mod, name, fn in saved:
            setattr(mod, name, fn)


def _call(op: str, g, nbytes: int):
    count = nbytes // 4
    if op == "all_gather":
        x = torch.ones(count // g.size)
        return lambda: C.all_gather(x, g)
    x = torch.ones(count - count % g.size)
    return {"all_reduce": lambda: C.all_reduce(x, g), "reduce_scatter": lambda: C.reduce_scatter(x, g),
            "broadcast": lambda: C.broadcast(x, g), "all_to_all": lambda: C.all_to_all(x, g, 0, 0)}[op]


def phase_report(ops, sizes, g, iters: int) -> None:
    """Collective over g: time `iters` single calls of auto per op and size, print the phases."""
    for op in ops:
        for nbytes in sizes:
            run = _call(op, g, nbytes)
            for _ in range(3):  # warm: pools, scratch windows, recycled outputs
                run()
            acc: dict = collections.defaultdict(float)
            total = 0.0
            with timed_phases(acc):
                for _ in range(iters):
                    C.wait_all([g.comm.Ibarrier()])
                    start = time.perf_counter()
                    run()
                    total += time.perf_counter() - start
            every = g.comm.gather((total, dict(acc)), root=0)
            if g.rank == 0:
                labels = sorted({k for _, d in every for k in d})
                mean = {k: np.mean([d.get(k, 0.0) for _, d in every]) / iters * 1e6 for k in labels}
                whole = np.mean([t for t, _ in every]) / iters * 1e6
                text = " ".join(f"{k} {v:.0f}" for k, v in mean.items())
                print(f"phases {op:>14} {nbytes:>10} B: total {whole:.0f} us | {text} | "
                      f"rest {whole - sum(mean.values()):.0f}")
