#!/usr/bin/env python3
"""What the flight recorder and the watchdog cost a small and a shared-memory all-reduce, on vs off.

    mpiexec -n 2 python experiments/flight_overhead.py [--quick] [--rounds 40] [--iters 300] [--out F.h5]

Tight loops, timed in --rounds rounds of --iters calls per mode, the modes
alternating (and which goes first alternating too), so a slow phase of a shared
machine hits both alike:
- all_reduce of 4 KiB of float32 (the argument agreement carries the data: one
  Allgather per call), next to raw mpi4py's Allreduce of the same 4 KiB;
- all_reduce of a 1 MiB symmetric tensor (zero-copy shared memory);
- the watchdog alone: the recorded 4 KiB all_reduce with the watchdog thread
  ticking (on) or parked on its wake-up pipe, checking nothing (off: what
  MPIPAR_TIMEOUT=0 runs). It reads the recorder from its own thread, so it costs
  the calls nothing but its wake-ups.
For the all_reduce cases:
on: all_reduce and its agreement's agree_all_reduce as they are (every call takes its
slot in the ring); off: the same source without the lines that record. Both are
compiled again here, alike (twin_all_reduce): nothing is swapped while they run, so
neither pays for the other's set-up. In off rounds a call is held open in the
recorder, so the nested waits' begin/done return at once, as they do inside a
recorded call, and the C all-reduce's record is switched off. The watchdog thread
runs in both (it wakes once a second).
Also the recorder alone (one process, no MPI, so robust on a busy machine): what a
validated all_reduce adds (begin, the agreement's description of dtype and shape,
done) against a function that does nothing, for the recorder in use (C where
mpipar.flight.ring builds) and for the pure-Python one.
Each call is timed alone; per case and mode the table gives the 10th percentile and
the median over all calls (the slowest rank's): on a shared machine the low
percentile is the call's cost without the calls that a lost core slowed down.
Writes /results/flight_overhead to results/flight_overhead/<UTC stamp>.h5 (or --out);
prints a table on rank 0.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import time
import timeit

import numpy as np
import torch

import mpipar
from mpipar import comm, trace
from mpipar.flight import recorder

TABLE = "flight_overhead"
UNITS = {"p10_us": "us", "median_us": "us"}
def _compiled(func, lines, **names):
    """A function named like `func`, compiled from `lines` in a copy of func's module
    namespace (with `names` bound in it)."""
    import inspect

    module = inspect.getmodule(func)
    namespace = dict(vars(module))
    namespace.update(names)
    exec(compile("\n".join(lines) + "\n", module.__file__, "exec"), namespace)
    return namespace[func.__name__]


def twin_all_reduce(record: bool):
    """mpipar.comm.all_reduce and its agreement's agree_all_reduce compiled again from their
    source, with (record) or without the lines that record: all_reduce's `begin` choice,
    `try:`, `finally:`, `done(slot)` (the try body dedented), the `note(...)` and
    `described.info = ...` lines. A small all-reduce runs in C (mpipar.comm.agreement.fast)
    in both; its record is switched off with the group's C context (`record`, in
    held_open). Both twins are built alike (a copy of each module's namespace, the
    agreement in a module object of its own), so neither is slowed by the other's set-up:
    nothing is swapped while they run."""
    import inspect
    import types

    from mpipar.comm import collectives
    from mpipar.comm.agreement import inline

    lines = inspect.getsource(collectives.all_reduce).splitlines()
    agree_lines = inspect.getsource(inline.agree_all_reduce).splitlines()
    if not record:
        head = [i for i, ln in enumerate(lines)
                if ln.strip().startswith("if validate and g.size > 1:  # the agreement")]
        tries = [k for k, ln in enumerate(lines) if ln == "    try:"]
        if len(head) != 1 or not tries or tries[0] < head[0] or \
                [ln.strip() for ln in lines[-2:]] != ["finally:", "done(slot)"]:
            raise RuntimeError("all_reduce's record is not where this benchmark expects it; update twin_all_reduce")
        i, k = head[0], tries[0]
        # the `begin` choice goes (its `else:` too); the fast path's lines in the `if` stay
        choice = [ln for ln in lines[i + 1:k] if not ln.strip().startswith(("slot = begin(", "else:"))]
        body = [ln[4:] if ln.startswith("        ") else ln for ln in lines[k + 1:-2]
                if not ln.strip().startswith("note(")]
        lines = lines[:i] + ([lines[i]] + choice if choice else []) + body
        kept = [ln for ln in agree_lines if not ln.strip().startswith(("note(", "described.info"))]
        if len(kept) == len(agree_lines):
            raise RuntimeError("agree_all_reduce's record is not where this benchmark expects it; "
                               "update twin_all_reduce")
        agree_lines = kept
    agreement = types.ModuleType(inline.__name__)
    agreement.__dict__.update(vars(inline))
    agreement.agree_all_reduce = _compiled(inline.agree_all_reduce, agree_lines)
    return _compiled(collectives.all_reduce, lines, inline=agreement)


class held_open:
    """Inside: a call is in flight in the recorder, so the nested waits of an unrecorded
    all_reduce (the shared-memory barrier's) record nothing, as inside a recorded one; their
    `begin` returns -1 at once, as a function that does nothing would. The groups' C
    all-reduce (mpipar.comm.agreement.fast) records nothing either."""

    contexts: list = []  # the C all-reduce contexts of the benchmark's groups (main)

    def __enter__(self):
        self.slot = recorder.begin(recorder.UNKNOWN, "flight_overhead off")
        for ctx in self.contexts:
            ctx.record = False
        return self

    def __exit__(self, *exc):
        for ctx in self.contexts:
            ctx.record = True
        recorder.done(self.slot)


class parked_watchdog:
    """Inside: the watchdog thread checks nothing (it waits on its wake-up pipe alone, as with
    MPIPAR_TIMEOUT=0); on leaving, a byte on that pipe sets it ticking again."""

    def __enter__(self):
        from mpipar.flight import job

        self.dog = job._watchdog
        if self.dog is not None and self.dog.wake_fd is not None:
            self.tick, self.dog.tick = self.dog.tick, None
        else:
            self.dog = None
        return self

    def __exit__(self, *exc):
        if self.dog is not None:
            self.dog.tick = self.tick
            fd = signal.set_wakeup_fd(-1)
            signal.set_wakeup_fd(fd)
            if fd != -1:
                os.write(fd, b"\0")


def timed(fn, iters: int, g, into: list) -> None:
    """Time `iters` calls one by one (all ranks start together); appends seconds per call."""
    clock = time.perf_counter
    times = [0.0] * iters
    g.comm.Barrier()
    for k in range(iters):
        t0 = clock()
        fn()
        times[k] = clock() - t0
    into.extend(times)


def percentiles(times: list, g) -> tuple:
    """(10th percentile, median) of the calls, in us: the slowest rank's. The low percentile is
    the call's cost on a quiet machine: a call slowed by a rank losing its core lands above it."""
    from mpi4py import MPI

    mine = np.percentile(np.array(times), [10, 50]) * 1e6
    g.comm.Allreduce(MPI.IN_PLACE, mine, op=MPI.MAX)
    return float(mine[0]), float(mine[1])


def pair_alone(rounds: int, begin, done) -> dict:
    """The recorder alone, as a validated all_reduce records: begin, the agreement's description
    of dtype and shape, done (try/finally around), against a function that does nothing.
    Seconds per call, one entry per block of 2000; on and off blocks alternate."""
    import types

    ch = recorder.Channel(None, "bench")
    info = types.SimpleNamespace(dtype=torch.float32, shape=torch.Size([1024]))  # the cached description
    described = recorder.described

    def on():
        slot = begin(ch, "all_reduce", None, None, "auto")
        try:
            described.info = info
        finally:
            done(slot)

    def off():
        pass

    res = {"on": [], "off": []}
    for r in range(rounds * 10):
        for mode, fn in ((("on", on), ("off", off)) if r % 2 == 0 else (("off", off), ("on", on))):
            res[mode].append(timeit.timeit(fn, number=2000) / 2000)
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=40)
    p.add_argument("--iters", type=int, default=300)
    p.add_argument("--quick", action="store_true", help="2 rounds of 100 calls (a smoke test)")
    p.add_argument("--out", default=None, help="HDF5 file (default results/flight_overhead/<UTC stamp>.h5)")
    cfg = p.parse_args(argv)
    if cfg.quick:
        cfg.rounds, cfg.iters = 2, 100
    from mpi4py import MPI

    mesh = mpipar.Mesh()
    g = mesh.world
    small = torch.ones(1024)
    raw = np.ones(1024, dtype=np.float32)
    shared = comm.symmetric_empty((1 << 18,), torch.float32, g)
    shared.fill_(1.0)
    on_ar, off_ar = twin_all_reduce(True), twin_all_reduce(False)
    comm.all_reduce(small, g)  # makes the group's agreement buffers (and its C all-reduce, where it applies)
    fast = g._inline_buffers.fast
    held_open.contexts = [fast] if fast is not None else []
    none = contextlib.nullcontext
    cases = {  # case -> {mode: (call, the context it runs in)}
        "all_reduce 4 KiB": {"on": (lambda: on_ar(small, g), none), "off": (lambda: off_ar(small, g), held_open)},
        "all_reduce 1 MiB symmetric (shm)": {"on": (lambda: on_ar(shared, g), none),
                                             "off": (lambda: off_ar(shared, g), held_open)},
        "watchdog, all_reduce 4 KiB": {"on": (lambda: on_ar(small, g), none),
                                       "off": (lambda: on_ar(small, g), parked_watchdog)},
    }
    results = {(c, m): [] for c in cases for m in ("on", "off")}
    results[("mpi4py Allreduce 4 KiB", "-")] = []
    for case, modes in cases.items():  # warm up (and size the outputs) once
        for fn, context in modes.values():
            with context():
                timed(fn, 50, g, [])
    for r in range(cfg.rounds):
        for case, modes in cases.items():
            for mode in ("on", "off") if r % 2 == 0 else ("off", "on"):
                fn, context = modes[mode]
                with context():
                    timed(fn, cfg.iters, g, results[(case, mode)])
        timed(lambda: g.comm.Allreduce(MPI.IN_PLACE, raw, op=MPI.SUM), cfg.iters, g,
              results[("mpi4py Allreduce 4 KiB", "-")])
    prov = trace.provenance(mesh)  # collective
    rows = []
    for (case, mode), times in results.items():
        p10, p50 = percentiles(times, g)
        rows.append({"case": case, "mode": mode, "ranks": g.size, "p10_us": p10, "median_us": p50})
    alone_cases = []
    impls = {recorder.IMPLEMENTATION: (recorder.begin, recorder.done)}
    impls.setdefault("Python", (recorder.PYTHON["begin"], recorder.PYTHON["done"]))
    for impl, (begin, done) in impls.items():
        alone = pair_alone(cfg.rounds, begin, done)
        recorder.reset()
        case = f"recorder alone ({impl}): begin, describe, done"
        alone_cases.append(case)
        for mode in ("on", "off"):
            per = np.array(alone[mode]) * 1e6
            rows.append({"case": case, "mode": mode, "ranks": 1,
                         "p10_us": float(np.percentile(per, 10)), "median_us": float(np.median(per))})
    if g.rank == 0:
        out = cfg.out or os.path.join("results", TABLE, f"{trace.h5.utc_now().replace(':', '')}.h5")
        os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
        writer = trace.ResultsWriter(out, TABLE, UNITS, prov, {"description": "flight recorder + watchdog on vs off"})
        print(f"{'case':46s} {'mode':4s} {'p10 us':>9s} {'median us':>10s}")
        for r in rows:
            print(f"{r['case']:46s} {r['mode']:4s} {r['p10_us']:9.3f} {r['median_us']:10.3f}")
            writer.append({"case": r["case"], "mode": r["mode"], "ranks": r["ranks"]},
                          {"p10_us": r["p10_us"], "median_us": r["median_us"]})
        print(f"the recorder in use: {recorder.IMPLEMENTATION} (mpipar.flight.ring); the 4 KiB all-reduce: "
              f"{'C (mpipar.comm.agreement.fast)' if held_open.contexts else 'Python (mpipar.comm.agreement.inline)'}")
        for case in list(cases) + alone_cases:
            on = {r["mode"]: r for r in rows if r["case"] == case}
            d10 = on["on"]["p10_us"] - on["off"]["p10_us"]
            d50 = on["on"]["median_us"] - on["off"]["median_us"]
            print(f"{case}: on - off = {d10:+.3f} us at p10 ({100 * d10 / on['off']['p10_us']:+.1f}%), "
                  f"{d50:+.3f} us at the median")
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
