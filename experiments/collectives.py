#!/usr/bin/env python3
"""nccl-tests-style sweep of mpipar's collectives, side by side with raw mpi4py, gloo and memcpy.

    mpiexec -n 2 python experiments/collectives.py [--quick] [--sizes 4K:256M[:factor] | 4K,1M,..]
        [--ops all_reduce,all_gather,reduce_scatter,broadcast,all_to_all] [--dtype float32]
        [--impls mpi,ring,auto,auto_sym,sym_inplace,mpi4py,mpi4py_inplace,gloo,memcpy,...] [--iters 20] [--warmup 5] [--rounds 15]
        [--mode loop|single|loop,single] [--out F.h5] [--dry-run] [--phases]

Per op and size, every implementation is timed side by side in --rounds interleaved
rounds (round k times each implementation in turn for --iters calls, or more, up to
50x, so that a block lasts at least 20 ms, or fewer, down to one, so that it lasts at
most about 100 ms; sized from the timed warmup calls), so a
slow phase of a shared machine hits all of them alike. Per implementation: time per call of the best round
(avg over ranks, and min/max over ranks of each rank's mean), the median over rounds,
algbw = bytes / avg time, busbw = algbw x
nccl-tests' bus factor (mpipar.comm.bus_factor), and #wrong (elements that
differ from the exact expected result, summed over ranks; inputs are small
integers so every dtype is exact). "size" is nccl-tests' size: the full
tensor (all_gather: the output; reduce_scatter, all_to_all: the input).
Implementations: mpipar "mpi", "ring" (all_reduce, all_gather, reduce_scatter),
"auto" (every op), "shm" (forced shared memory on a plain tensor: staged through a
window), "auto_sym" (auto on a symmetric tensor: zero-copy shared memory), "auto_pooled"
(auto on a plain tensor in the group that has a symmetric pool, as a training job's group
once a staged call or a symmetric bucket made one; opt-in), "hier"
(all_reduce: the hierarchical path on a symmetric tensor, the ranks split into two
fake nodes unless MPIPAR_FAKE_RANKS_PER_NODE says otherwise; opt-in);
"sym_inplace" (all_gather(t, g, out=out) with `out` symmetric and `t` this rank's slice
of it: only the peers' pieces move);
"mpi4py" (raw comm.Allreduce & co on numpy, no mpipar); "mpi4py_inplace" (all_gather:
raw comm.Allgather(MPI.IN_PLACE, out), the MPI library's own in-place all-gather); "gloo"
(torch.distributed); "memcpy" (a local torch copy_ of the same size; its busbw
is the copy rate; past the cache mpipar's streaming copies beat it, see
mpipar/comm/shm_compiled.c); "inplace" (np.add(buf, 0, out=buf) on
every rank at once: the in-place memory pass over plain torch memory, which sits on
2 MiB transparent huge pages), "inplace_sym" (the same pass over a symmetric tensor:
the shared-memory window's own 4 KiB pages, the ceiling of shared-memory all-reduce); both
passes also run among each all_reduce size's implementations, so its ratios to them are
side by side. The implementations on symmetric tensors (auto_sym, inplace_sym, sym_inplace,
shm) and auto_pooled run on their own group, a Dup of the benchmark's that has a pool: a
symmetric pool changes how "auto" moves plain tensors (mpipar.comm.agreement.fast_plan._in_slots),
and "auto" is timed as a group of plain tensors runs it.

--mode: "loop" (the default) times back-to-back calls, as above; "single" times each
call alone, the way training calls a collective once after compute: every call is
started together after a barrier (MPI's Ibarrier, waited politely where ranks outnumber
cores: a busy-polling barrier would leave the ranks staggered by scheduler slices), and
a round's value per rank is the median of its --iters single calls (fewer, down to one,
so that a round lasts about 100 ms). "loop,single"
times both in the same rounds (one input per implementation, both modes side by
side) and prints each mode's table plus their times over raw mpi4py's, side by side.
The memory passes (memcpy, inplace, inplace_sym) run in loop mode only.

--phases: instead of the sweep, where single calls of "auto" spend their time (argument
agreement, staging, shared-memory kernel and barrier, MPI's collective, output), per op
and size, printed (experiments/_collectives_phases.py); nothing is written.

At the end: the measured size from which "ring" beats "mpi" (feeds
mpipar/comm/tuning.py) and alpha-beta fits of the ring points (mpipar.comm.fit_alpha_beta).

Writes /results/collectives (one row per point, resumable: rerun with the same
--out to finish a killed sweep), /results/collectives_fit, and the spans to
results/collectives/<UTC timestamp>.h5 (or --out); prints a table on rank 0.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import sys

import numpy as np
from mpi4py import MPI

import mpipar
from mpipar import comm as C
from mpipar import trace
from mpipar.errors import MpiparError, require
from mpipar.flight.abort import install_abort_on_exception
from mpipar.models import preempt
from _collectives_impl import ALGO_OPS, DTYPES, IMPLS, MODES, OPS, PASSES, element_count, measure_size
from _collectives_report import human, loop_mode, print_report, verdicts
from _common import init_gloo

TABLE = "collectives"
DEFAULT_IMPLS = ("mpi", "ring", "auto", "auto_sym", "sym_inplace", "mpi4py", "mpi4py_inplace", "gloo",
                 "memcpy", "inplace", "inplace_sym")
SIDE_BY_SIDE_LIMITS = ("inplace", "inplace_sym")  # ... the in-place passes also run in each all_reduce size's rounds
NUMPY_REDUCIBLE = ("float32", "float64", "int32", "int64")
UNITS = {"nbytes": "B", "bytes": "B", "count": "elements", "time_s": "s", "time_min_s": "s",
         "time_max_s": "s", "time_median_s": "s", "algbw_GBps": "GB/s", "busbw_GBps": "GB/s", "memcpy_GBps": "GB/s", "wrong": "elements"}
FIT_UNITS = {"alpha_s": "s", "beta_s_per_byte": "s/B", "bandwidth_GBps": "GB/s", "crossover_bytes": "B"}


@dataclasses.dataclass
class Config:
    sizes: list
    ops: list
    impls: list
    dtype: str = "float32"
    iters: int = 20
    warmup: int = 5
    rounds: int = 15
    out: str = ""
    dry_run: bool = False
    phases: bool = False
    modes: list = dataclasses.field(default_factory=lambda: ["loop"])


def parse_size(text: str) -> int:
    """'4K', '1MiB', '256M', '4096' -> bytes (binary units)."""
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(t[-1:], 1)
    try:
        return int(float(t[:-1] if mult > 1 else t) * mult)
    except ValueError:
        raise MpiparError(f"collectives: bad size {text!r} (e.g. 4K, 1M, 256MiB)") from None


def parse_sizes(text: str) -> list[int]:
    """'4K:256M[:factor]' (geometric, factor 2 by default) or a comma list."""
    if ":" in text:
        lo, hi, *f = text.split(":")
        size, hi, factor = parse_size(lo), parse_size(hi), int(f[0]) if f else 2
        require(size > 0 and factor > 1, f"collectives: bad size range {text!r}")
        out = []
        while size <= hi:
            out.append(size)
            size *= factor
        return out
    return [parse_size(s) for s in text.split(",") if s.strip()]


def parse_args(argv=None) -> Config:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default=None, help="4K:256M[:factor] or a comma list (default 4K:256M)")
    p.add_argument("--ops", default=",".join(OPS))
    p.add_argument("--impls", default=",".join(DEFAULT_IMPLS), help=f"any of {','.join(IMPLS)}")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--iters", type=int, default=None, help="timed calls per block, before sizing blocks to 20-100 ms (default 20; quick 5)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls first (default 5; quick 1)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved timing rounds (default 15; quick 2)")
    p.add_argument("--quick", action="store_true", help="4K:1M:4, 5 iters, 1 warmup, 2 rounds (a smoke test)")
    p.add_argument("--mode", default="loop",
                   help="loop (back-to-back calls), single (each call alone, started together after a barrier), "
                        "or loop,single (both, side by side)")
    p.add_argument("--out", default=None, help="HDF5 file (default results/collectives/<UTC stamp>.h5)")
    p.add_argument("--dry-run", action="store_true", help="list the points (done or to do) and exit")
    p.add_argument("--phases", action="store_true",
                   help="time the phases of single auto calls per op and size instead of the sweep (printed only)")
    a = p.parse_args(argv)
    cfg = Config(sizes=parse_sizes(a.sizes or ("4K:1M:4" if a.quick else "4K:256M")),
                 ops=[o for o in a.ops.split(",") if o], impls=[i for i in a.impls.split(",") if i],
                 dtype=a.dtype, iters=a.iters or (5 if a.quick else 20),
                 warmup=a.warmup if a.warmup is not None else (1 if a.quick else 5),
                 rounds=a.rounds or (2 if a.quick else 15), out=a.out or "", dry_run=a.dry_run, phases=a.phases,
                 modes=[m for m in a.mode.split(",") if m])
    require(not set(cfg.ops) - set(OPS), f"collectives: unknown ops {sorted(set(cfg.ops) - set(OPS))}")
    require(not set(cfg.impls) - set(IMPLS), f"collectives: unknown impls {sorted(set(cfg.impls) - set(IMPLS))}")
    require(cfg.modes and not set(cfg.modes) - set(MODES) and len(set(cfg.modes)) == len(cfg.modes),
            f"collectives: --mode is loop, single or loop,single (got {a.mode!r})")
    require(cfg.sizes and min(cfg.sizes) > 0 and cfg.iters > 0 and cfg.warmup >= 0 and cfg.rounds > 0,
            "collectives: need sizes > 0, iters > 0, warmup >= 0, rounds > 0")
    return cfg


# ---- what to run ---------------------------------------------------------------------------

def applicable(op: str, impl: str, dtype: str) -> bool:
    if impl in SIDE_BY_SIDE_LIMITS:  # also timed among the all-reduces: ratios side by side
        return op in (impl, "all_reduce")
    if impl in PASSES or op in PASSES:
        return impl == op
    if impl == "hier":
        return op == "all_reduce" and hasattr(C, "symmetric_empty")
    if impl in ("mpi", "ring"):
        return op in ALGO_OPS
    if impl == "shm":
        return op in ALGO_OPS
    if impl == "auto_sym":
        return hasattr(C, "symmetric_empty") and op in (*ALGO_OPS, "broadcast")
    if impl in ("sym_inplace", "mpi4py_inplace"):
        return op == "all_gather"
    if impl == "mpi4py" and op in ("all_reduce", "reduce_scatter"):
        return dtype in NUMPY_REDUCIBLE
    return True


def plan(cfg: Config, n: int) -> list[dict]:
    """Every point of the sweep, in run order (identical on every rank)."""
    itemsize = DTYPES[cfg.dtype].itemsize
    ops = [*(o for o in PASSES if o in cfg.impls), *cfg.ops]  # memcpy, inplace first: the limits of each row
    return [{"op": op, "impl": impl, "nbytes": size, "dtype": cfg.dtype, "world_size": n, "mode": mode,
             "iters": cfg.iters, "warmup": cfg.warmup, "rounds": cfg.rounds}
            for op in ops for size in cfg.sizes for impl in cfg.impls for mode in cfg.modes
            if applicable(op, impl, cfg.dtype) and element_count(op, size, itemsize, n) > 0
            and (mode == "loop" or impl not in PASSES)]


# ---- reporting -------------------------------------------------------------------------------

def crossover(rows: list[dict], op: str):
    """Smallest measured size from which "ring" is faster than "mpi" at every larger size (None: never)."""
    t = {(r["impl"], r["nbytes"]): r["time_s"] for r in rows if r["op"] == op and loop_mode(r)}
    sizes = sorted(s for (impl, s) in t if impl == "ring" and ("mpi", s) in t)
    best = None
    for s in reversed(sizes):
        if t[("ring", s)] >= t[("mpi", s)]:
            break
        best = s
    return best


def fits(rows: list[dict], n: int, dtype: str) -> list[dict]:
    out = []
    for op in ALGO_OPS:
        ring = sorted((r["bytes"], r["time_s"]) for r in rows if r["op"] == op and r["impl"] == "ring" and loop_mode(r))
        if n < 2 or len(ring) < 2:
            continue
        alpha, beta = C.fit_alpha_beta(op, [b for b, _ in ring], n, [t for _, t in ring])
        cross = crossover(rows, op)
        out.append({"op": op, "impl": "ring", "world_size": n, "dtype": dtype, "points": len(ring),
                    "alpha_s": alpha, "beta_s_per_byte": beta,
                    "bandwidth_GBps": 1 / beta / 1e9 if beta > 0 else float("nan"),
                    "crossover_bytes": -1 if cross is None else int(cross)})
    return out


def by_size(points: list[dict]) -> list[list[dict]]:
    """The points grouped by (op, size), in plan order: each group is timed side by side."""
    groups: dict = {}
    for p in points:
        groups.setdefault((p["op"], p["nbytes"]), []).append(p)
    return list(groups.values())


def stored(path) -> tuple[set, dict]:
    """(keys of the points already in the file, memcpy rate per size of those points)."""
    if not os.path.exists(path):
        return set(), {}
    t = trace.read_results(path, TABLE)
    rows = zip(t.get("op", []), t.get("nbytes", []), t.get("busbw_GBps", []))
    return trace.completed_points(path, TABLE), {int(n): float(b) for op, n, b in rows if op == "memcpy"}


def default_out(comm) -> str:
    stamp = comm.bcast(datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ"), root=0)
    return f"results/collectives/{stamp}.h5"


def main(argv=None) -> int:
    install_abort_on_exception()
    cfg = parse_args(argv)
    stop = preempt.trap(MPI.COMM_WORLD)  # SIGTERM/SIGUSR1: stop after the size in hand (its rows are stored)
    mesh = mpipar.Mesh(comm=MPI.COMM_WORLD)
    g = mesh.world
    if cfg.phases:
        from _collectives_phases import phase_report

        phase_report(cfg.ops, cfg.sizes, g, cfg.iters)
        return 0
    cfg.out = cfg.out or default_out(g.comm)
    points = plan(cfg, g.size)
    done, limit = g.comm.bcast(stored(cfg.out) if g.rank == 0 else None, root=0)
    todo = [p for p in points if trace.point_key(p) not in done]
    if cfg.dry_run:
        if g.rank == 0:
            for p in points:
                print("done" if trace.point_key(p) in done else "todo", trace.point_key(p))
            print(f"{len(points)} points, {len(points) - len(todo)} done, {len(todo)} to do -> {cfg.out}")
        return 0
    if any(p["impl"] == "gloo" for p in todo):
        init_gloo(g)
    tracer = trace.Tracer(mesh)
    prov = trace.provenance(mesh)
    writer = trace.ResultsWriter(cfg.out, TABLE, UNITS, prov, {"description": "nccl-tests-style sweep"}) \
        if g.rank == 0 else None
    from tqdm import tqdm

    bar = tqdm(total=len(todo), desc="collectives", unit="pt", disable=g.rank != 0, file=sys.stderr,
               mininterval=0.5 if sys.stderr.isatty() else 5.0)
    for group in by_size(todo):
        op, size = group[0]["op"], group[0]["nbytes"]
        bar.set_postfix_str(f"{op} {human(size)} x{len(group)}", refresh=False)
        with tracer.span("size", op=op, nbytes=size, impls=",".join(f"{p['impl']}:{p['mode']}" for p in group)):
            measured = measure_size(group, g, cfg.rounds)
        tracer.sample_memory(f"{op} {size}")   # /memory: the rank's resident set along the sweep
        for p, metrics in zip(group, measured):
            if p["op"] == "memcpy" and p["mode"] == "loop":
                limit[p["nbytes"]] = metrics["busbw_GBps"]
            metrics["memcpy_GBps"] = limit.get(p["nbytes"], float("nan"))
            if writer is not None:
                writer.append(p, metrics)  # flushed per size: a killed sweep keeps what finished
        bar.update(len(group))
        stop.check("collectives")
    bar.close()
    tracer.save(cfg.out, attrs={"driver": "experiments/collectives.py"})
    if g.rank == 0:
        table = trace.read_results(cfg.out, TABLE)
        keys, wanted = table.get("point_key", np.array([])).tolist(), {trace.point_key(p) for p in points}
        rows = [{c: v[i] for c, v in table.items()} for i, k in enumerate(keys) if k in wanted]
        fit_rows = fits(rows, g.size, cfg.dtype)
        trace.write_table(cfg.out, "collectives_fit", fit_rows, FIT_UNITS)
        print_report(rows, fit_rows, g.size, cfg.dtype)
        print("\n".join(verdicts(rows)))
        print(f"\nwrote {cfg.out}")
    if any(p["impl"] == "gloo" for p in todo):
        import torch.distributed as dist

        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
