#!/usr/bin/env python3
"""What the flight recorder and the watchdog cost a small and a shared-memory all-reduce.

    mpiexec -n 2 python experiments/flight_overhead.py [--quick] [--rounds 15] [--iters 2000] [--out F.h5]

Two tight loops, each timed in --rounds interleaved rounds of --iters calls with the
recorder on (as always: every call writes its slot in the ring, the watchdog thread
runs) and off (the recorder's begin/done replaced by functions that return at once,
in every module that calls them), so a slow phase of a shared machine hits both alike:
- all_reduce of 4 KiB of float32 (the argument agreement carries the data: one
  Allgather per call), next to raw mpi4py's Allreduce of the same 4 KiB;
- all_reduce of a 1 MiB symmetric tensor (zero-copy shared memory, mpipar.comm.shm).
Also the recorder alone: one begin/done pair, against the same pair of functions
that return at once (a single process, no MPI).
Per case and mode: the median and best round's time per call (the slowest rank's
mean). Writes /results/flight_overhead to results/flight_overhead/<UTC stamp>.h5
(or --out); prints a table on rank 0.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import timeit

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import mpipar  # noqa: E402
from mpipar import comm, trace  # noqa: E402
from mpipar.flight import recorder  # noqa: E402

TABLE = "flight_overhead"
UNITS = {"median_us": "us", "best_us": "us"}
_USERS = ("mpipar.comm.collectives", "mpipar.comm.wait", "mpipar.comm.symmetric.barrier")


def _off_begin(*args) -> int:
    return -1


def _off_done(slot) -> None:
    pass


def recording(on: bool) -> None:
    """Swap the recorder in (on) or out (off) of every module that records calls."""
    for name in _USERS:
        module = sys.modules[name]
        module.begin, module.done = (recorder.begin, recorder.done) if on else (_off_begin, _off_done)


def timed(fn, iters: int, g) -> float:
    """Seconds per call of the slowest rank over `iters` calls, started together."""
    from mpi4py import MPI

    g.comm.Barrier()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    per_call = np.array([(time.perf_counter() - t0) / iters])
    g.comm.Allreduce(MPI.IN_PLACE, per_call, op=MPI.MAX)
    return float(per_call[0])


def pair_alone(rounds: int) -> dict:
    """The recorder alone: a begin/done pair against a pair of functions that return at once."""
    ch = recorder.Channel(None, "bench")
    t = torch.ones(1024)

    def make(begin, done):
        def f():
            slot = begin(ch, "all_reduce", t.dtype, t.shape, "auto")
            try:
                pass
            finally:
                done(slot)
        return f

    on, off = make(recorder.begin, recorder.done), make(_off_begin, _off_done)
    res = {"on": [], "off": []}
    for _ in range(rounds):
        for mode, fn in (("on", on), ("off", off)):
            res[mode].append(timeit.timeit(fn, number=20000) / 20000)
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--iters", type=int, default=2000)
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
    cases = {
        "all_reduce 4 KiB": lambda: comm.all_reduce(small, g),
        "all_reduce 1 MiB symmetric (shm)": lambda: comm.all_reduce(shared, g),
    }
    results = {(c, m): [] for c in cases for m in ("on", "off")}
    results[("mpi4py Allreduce 4 KiB", "-")] = []
    for case, fn in cases.items():  # warm up (and size the outputs) once
        timed(fn, 50, g)
    for _ in range(cfg.rounds):
        for case, fn in cases.items():
            for mode in ("on", "off"):
                recording(mode == "on")
                results[(case, mode)].append(timed(fn, cfg.iters, g))
        recording(True)
        results[("mpi4py Allreduce 4 KiB", "-")].append(
            timed(lambda: g.comm.Allreduce(MPI.IN_PLACE, raw, op=MPI.SUM), cfg.iters, g))
    prov = trace.provenance(mesh)  # collective
    alone = pair_alone(cfg.rounds)
    for mode in ("on", "off"):
        results[("recorder alone: begin/done pair", mode)] = alone[mode]
    rows = []
    for (case, mode), times in results.items():
        rows.append({"case": case, "mode": mode, "ranks": g.size,
                     "median_us": statistics.median(times) * 1e6, "best_us": min(times) * 1e6})
    if g.rank == 0:
        out = cfg.out or os.path.join("results", TABLE, f"{trace.h5.utc_now().replace(':', '')}.h5")
        os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
        writer = trace.ResultsWriter(out, TABLE, UNITS, prov, {"description": "flight recorder + watchdog on vs off"})
        print(f"{'case':36s} {'mode':4s} {'median us':>10s} {'best us':>9s}")
        for r in rows:
            print(f"{r['case']:36s} {r['mode']:4s} {r['median_us']:10.3f} {r['best_us']:9.3f}")
            writer.append({"case": r["case"], "mode": r["mode"], "ranks": r["ranks"]},
                          {"median_us": r["median_us"], "best_us": r["best_us"]})
        for case in list(cases) + ["recorder alone: begin/done pair"]:
            on = {r["mode"]: r for r in rows if r["case"] == case}
            d_med = on["on"]["median_us"] - on["off"]["median_us"]
            d_best = on["on"]["best_us"] - on["off"]["best_us"]
            print(f"{case}: on - off = {d_med:+.3f} us median ({100 * d_med / on['off']['median_us']:+.1f}%), "
                  f"{d_best:+.3f} us best")
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
