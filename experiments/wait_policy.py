#!/usr/bin/env python3
"""Both sides of the polite-waiting trade, for candidate back-off policies (mpipar.comm.wait).

    mpiexec -n 4 python experiments/wait_policy.py [--rounds 5] [--calls 30] [--work 40]
        [--candidates legacy,spin_yield,...] [--out F.h5]

Side by side in interleaved rounds (round k measures every candidate in turn, starting
with the k-th), with the candidate installed as mpipar.comm.wait.POLITE or BUSY (the
policy the run's ranks use: POLITE when they outnumber cores):
- latency: a 4 KiB all-reduce called alone, every call started together after an MPI
  barrier (the single mode of experiments/collectives.py): mpipar "auto" on a plain tensor
  (non-blocking MPI, polled) and "auto_sym" on a symmetric one (the shared-memory barrier),
  beside raw mpi4py's Allreduce; per rank the median of --calls calls, mean over ranks;
  and the same calls back to back (5 x --calls, the loop mode): mean per call;
- compute: rank 0 runs --work 256x256 float32 matmuls (one thread) while the other ranks
  wait for it in that all-reduce; time of the matmuls beside waiters, and alone (the others
  wait in 5 ms sleeps), and beside raw mpi4py waiters (MPICH's own progress loop); and the
  waiters' CPU share (CPU seconds per second of waiting, mean over them): the politeness
  itself, which a loaded machine blurs less than the compute time.
Writes /results/wait_policy (one row per candidate and measure: median over rounds) to
--out (default results/wait_policy/<UTC stamp>.h5); prints a table on rank 0.
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import os
import sys
import time

import numpy as np
import torch
from mpi4py import MPI

import mpipar
from mpipar import comm as C
from mpipar import trace

W = importlib.import_module("mpipar.comm.wait")  # the module (mpipar.comm.wait is also a function)

CANDIDATES = {  # name -> Backoff(spin_s, yield_s, first_sleep, max_sleep[, share, longest_sleep, timer_slack_ns])
    "spin30us": (3e-5, 0.0, 1e-6, 2e-4),                # about the MPI-request wait before one policy
    "spin30us_cap100us": (3e-5, 0.0, 1e-6, 1e-4),
    "yield30us": (1e-5, 4e-5, 1e-6, 2e-4),
    "spin30us_cap1ms": (3e-5, 0.0, 1e-5, 1e-3),
    "yield_only": (0.0, 1e9, 1e-6, 1e-6),              # MPICH-like: never sleeps
    "spin30us_yield70us": (3e-5, 7e-5, 1e-6, 2e-4),     # about the shm barrier's wait before, own cores
    "spin200us_yield1ms": (2e-4, 1e-3, 1e-5, 1e-4),     # busier: for ranks with their own cores
    # POLITE's sleeps (1 us -> 20 us, then 1/16 of the wait up to 1 ms, 1 us timer slack) after
    # a phase of yields: a waiter runs again as soon as a peer on its core gives the core up
    "yield20us_polite": (0.0, 2e-5, 1e-6, 2e-5, 1 / 16, 1e-3, 1000),
    "yield50us_polite": (0.0, 5e-5, 1e-6, 2e-5, 1 / 16, 1e-3, 1000),
    "yield100us_polite": (0.0, 1e-4, 1e-6, 2e-5, 1 / 16, 1e-3, 1000),
    "yield200us_polite": (0.0, 2e-4, 1e-6, 2e-5, 1 / 16, 1e-3, 1000),
    "yield500us_polite": (0.0, 5e-4, 1e-6, 2e-5, 1 / 16, 1e-3, 1000),
    "yield1ms_polite": (0.0, 1e-3, 1e-6, 2e-5, 1 / 16, 1e-3, 1000),
} if hasattr(W, "Backoff") else {}
UNITS = {k: "s" for k in ("time_s", "time_min_s", "time_max_s", "spin_s", "yield_s", "first_sleep_s", "max_sleep_s")}


def median_single(run, calls: int, comm) -> float:
    times = []
    for _ in range(calls):
        C.wait_all([comm.Ibarrier()])  # polite where ranks outnumber cores: busy ones get the cores
        t = time.perf_counter()
        run()
        times.append(time.perf_counter() - t)
    return float(np.mean(comm.allgather(float(np.median(times)))))


def mean_loop(run, calls: int, comm) -> float:
    """Mean seconds per call of `calls` back-to-back calls (the loop mode), mean over ranks."""
    C.wait_all([comm.Ibarrier()])
    t = time.perf_counter()
    for _ in range(calls):
        run()
    return float(np.mean(comm.allgather((time.perf_counter() - t) / calls)))


def compute_beside(waiter, comm, work: int, a: torch.Tensor) -> tuple[float, float]:
    """(seconds of rank 0's matmuls while the other ranks run waiter(), which returns once
    rank 0 joins; the CPU time the waiting ranks used per second of waiting, mean over them)."""
    comm.Barrier()
    t = 0.0
    if comm.rank == 0:
        start = time.perf_counter()
        for _ in range(work):
            torch.mm(a, a)
        t = time.perf_counter() - start
    wall, cpu = time.perf_counter(), time.process_time()
    waiter()
    share = (time.process_time() - cpu) / max(time.perf_counter() - wall, 1e-9)
    shares = comm.allgather(share)[1:]
    return comm.bcast(t, root=0), float(np.mean(shares)) if shares else 0.0


def stats(v, share: bool) -> dict:
    """Median and extremes over rounds: as times (s), or as the waiters' CPU share."""
    nan = float("nan")
    med, lo, hi = float(np.median(v)), float(np.min(v)), float(np.max(v))
    if share:
        return {"time_s": nan, "time_min_s": nan, "time_max_s": nan, "cpu_share": med}
    return {"time_s": med, "time_min_s": lo, "time_max_s": hi, "cpu_share": nan}


def sleepy_barrier(comm):
    req = comm.Ibarrier()
    while not req.Test():
        time.sleep(5e-3)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--calls", type=int, default=30)
    p.add_argument("--work", type=int, default=150)
    p.add_argument("--candidates", default=",".join(CANDIDATES))
    p.add_argument("--label", default="current", help="name of the row of the installed policy (e.g. main)")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    mesh = mpipar.Mesh(comm=MPI.COMM_WORLD)
    g, comm = mesh.world, MPI.COMM_WORLD
    polite = g.oversubscribed
    names = [a.label, *[c for c in a.candidates.split(",") if c in CANDIDATES]]
    policies = {c: W.Backoff(*CANDIDATES[c]) for c in names[1:]}
    plain = torch.ones(1024)
    sym = C.symmetric_empty((1024,), torch.float32, g)
    sym.fill_(1)
    raw = np.ones(1024, dtype=np.float32)
    mat = torch.randn(256, 256)
    runs = {"auto": lambda: C.all_reduce(plain, g), "auto_sym": lambda: C.all_reduce(sym, g)}
    for r in runs.values():  # warm up: pools, agreements, pages
        for _ in range(5):
            r()
    samples: dict = {}

    def add(key, v):
        samples.setdefault(key, []).append(v)

    for k in range(a.rounds):
        add(("-", "latency", "mpi4py"), median_single(lambda: comm.Allreduce(MPI.IN_PLACE, raw), a.calls, comm))
        add(("-", "loop", "mpi4py"), mean_loop(lambda: comm.Allreduce(MPI.IN_PLACE, raw), 5 * a.calls, comm))
        for what, waiter in (("alone", lambda: sleepy_barrier(comm)),
                             ("mpi4py waiters", lambda: comm.Allreduce(MPI.IN_PLACE, raw))):
            t, share = compute_beside(waiter, comm, a.work, mat)
            add(("-", "compute", what), t)
            add(("-", "waiter_cpu_share", what), share)
        for j in range(len(names)):
            name = names[(j + k) % len(names)]
            saved = (getattr(W, "POLITE", None), getattr(W, "BUSY", None))
            if name in policies:
                W.POLITE = W.BUSY = policies[name]
            try:
                for impl, run in runs.items():
                    add((name, "latency", impl), median_single(run, a.calls, comm))
                    add((name, "loop", impl), mean_loop(run, 5 * a.calls, comm))
                    t, share = compute_beside(run, comm, a.work, mat)
                    add((name, "compute", impl + " waiters"), t)
                    add((name, "waiter_cpu_share", impl + " waiters"), share)
            finally:
                if name in policies:
                    W.POLITE, W.BUSY = saved
    prov = trace.provenance(mesh)  # collective
    if g.rank == 0:
        rows = []
        for (name, measure, what), v in samples.items():
                    rows.append({"policy": name, "measure": measure, "what": what, "world_size": g.size,
                         "oversubscribed": bool(polite), "rounds": a.rounds,
                         **{k: (CANDIDATES[name][i] if name in CANDIDATES else float("nan"))
                            for i, k in enumerate(("spin_s", "yield_s", "first_sleep_s", "max_sleep_s"))},
                         **stats(v, measure == "waiter_cpu_share")})
        alone = float(np.median(samples[("-", "compute", "alone")]))
        lat = float(np.median(samples[("-", "latency", "mpi4py")]))
        loop = float(np.median(samples[("-", "loop", "mpi4py")]))
        print(f"{g.size} ranks, oversubscribed={polite}; rounds={a.rounds}, interleaved; "
              f"compute alone {alone * 1e3:.1f} ms, beside mpi4py waiters "
              f"{np.median(samples[('-', 'compute', 'mpi4py waiters')]) / alone:.2f}x "
              f"(waiters' CPU share {np.median(samples[('-', 'waiter_cpu_share', 'mpi4py waiters')]):.2f}); "
              f"mpi4py 4 KiB single call {lat * 1e6:.1f} us, loop {loop * 1e6:.1f} us per call")
        print(f"{'policy':>18} | {'auto us':>8} {'/mpi4py':>7} | {'sym us':>8} {'/mpi4py':>7} | "
              f"{'compute/alone: auto':>19} {'sym':>5} | {'waiter CPU: auto':>16} {'sym':>5} | "
              f"{'loop/mpi4py: auto':>17} {'sym':>5}")
        for name in names:
            la = np.median(samples[(name, "latency", "auto")])
            ls = np.median(samples[(name, "latency", "auto_sym")])
            ca = np.median(samples[(name, "compute", "auto waiters")]) / alone
            cs = np.median(samples[(name, "compute", "auto_sym waiters")]) / alone
            wa = np.median(samples[(name, "waiter_cpu_share", "auto waiters")])
            ws = np.median(samples[(name, "waiter_cpu_share", "auto_sym waiters")])
            print(f"{name:>18} | {la * 1e6:8.1f} {la / lat:7.2f} | {ls * 1e6:8.1f} {ls / lat:7.2f} | "
                  f"{ca:19.2f} {cs:5.2f} | {wa:16.3f} {ws:5.3f} | "
                  f"{np.median(samples[(name, 'loop', 'auto')]) / loop:17.2f} "
                  f"{np.median(samples[(name, 'loop', 'auto_sym')]) / loop:5.2f}")
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        out = a.out or f"results/wait_policy/{stamp}.h5"
        os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
        trace.write_table(out, "wait_policy", rows, UNITS, root_attrs=prov)
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
