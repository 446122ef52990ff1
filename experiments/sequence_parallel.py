#!/usr/bin/env python3
"""Sequence parallelism study: ring attention (zigzag, contiguous) and Ulysses vs serial SDPA.

    mpiexec -n 4 python experiments/sequence_parallel.py --out results/sp.h5 [--quick]
        [--seqs 1K,2K,4K,...,64K] [--sp 1,2,4] [--heads 8] [--head-dim 64] [--budget-mb 256]

For every sequence length and every sequence-parallel size N (a sub-group of
the first N ranks; the others wait politely), causal fwd+bwd of one attention
layer is timed. The points of one length run in turns, one iteration each, so
they are measured side by side. Per point: wall and CPU time (each rank's
median over iterations, then the max over ranks; CPU time, which a busy
neighbour on a shared machine barely moves, beside the wall time), per rank
the exposed communication (step time minus the block computations) and the
compute imbalance (compute / mean over ranks), the compute time per ring step,
peak activation bytes per rank (tensors autograd saves for backward), and
whether it fits the per-rank budget. Serial SDPA
(N=1, same threads per rank) is the baseline; torch's context_parallel is
tried and the reason it does not run on CPU is recorded. HDF5 tables
/results/sequence_parallel, /results/sequence_parallel_budget,
/results/context_parallel; a PNG of time and memory vs sequence length.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from mpi4py import MPI

from mpipar import device as mdevice
from mpipar.comm.wait import wait_all
from mpipar.flight.abort import install_abort_on_exception
from mpipar.models import preempt
from _common import init_gloo, prefix_groups, print_table, setup_threads
from mpipar.mesh import Group
from mpipar.sequence import ring_attention, ulysses_attention
from mpipar.sequence.layout import num_chunks
from mpipar.trace import (ActivationMeter, ResultsWriter, Tracer, provenance, read_results,
                          write_table)

TABLE = "sequence_parallel"
METHODS = ("serial", "ring-zigzag", "ring-contiguous", "ulysses")
UNITS = {"time_s": "s", "fwd_s": "s", "bwd_s": "s", "cpu_s": "s", "compute_s": "s", "exposed_comm_s": "s",
         "peak_act_bytes": "B", "serial_peak_act_bytes": "B", "budget_bytes": "B", "seq": "tokens"}


@dataclasses.dataclass
class Config:
    seqs: list
    sp: list
    methods: list
    batch: int = 1
    heads: int = 8
    head_dim: int = 64
    dtype: str = "float32"
    causal: bool = True
    iters: int = 3
    warmup: int = 1
    budget_mb: float = 256.0
    max_point_s: float = 30.0
    threads: int = 0
    context_parallel: bool = True
    out: str = "results/sequence_parallel.h5"
    figure: str = ""


def parse_size(s: str) -> int:
    s = s.strip().upper()
    return int(float(s[:-1]) * 1024) if s.endswith("K") else int(s)


def parse_args(world: int) -> Config:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seqs", default="1K,2K,4K,8K,16K,32K,64K", help="sequence lengths (K = 1024)")
    p.add_argument("--sp", default="", help="sequence-parallel sizes (default: 1, 2, 4, ... and the world size)")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float64"])
    p.add_argument("--non-causal", action="store_true")
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--budget-mb", type=float, default=256.0, help="per-rank activation budget (MiB)")
    p.add_argument("--max-point-s", type=float, default=30.0, help="skip points predicted slower (s/iter)")
    p.add_argument("--threads", type=int, default=0, help="threads per rank (0: cores // ranks per node)")
    p.add_argument("--no-context-parallel", action="store_true")
    p.add_argument("--out", default="results/sequence_parallel.h5")
    p.add_argument("--figure", default="", help="PNG path (default: next to --out)")
    p.add_argument("--quick", action="store_true", help="tiny sizes, 1 timed iteration (smoke test)")
    a = p.parse_args()
    sp = [int(x) for x in a.sp.split(",") if x] or sorted({1 << i for i in range(world.bit_length())} | {world})
    cfg = Config([parse_size(x) for x in a.seqs.split(",")], [n for n in sp if n <= world],
                 [m for m in a.methods.split(",") if m], a.batch, a.heads, a.head_dim, a.dtype,
                 not a.non_causal, a.iters, a.warmup, a.budget_mb, a.max_point_s, a.threads,
                 not a.no_context_parallel, a.out, a.figure)
    if a.quick:
        cfg.seqs, cfg.heads, cfg.head_dim, cfg.iters, cfg.warmup = [256, 512], 4, 32, 1, 1
        cfg.context_parallel = False
    cfg.figure = cfg.figure or str(Path(cfg.out).with_suffix(".png"))
    return cfg


def fits_in_ram(cfg: Config, seq: int, n: int, ranks_here: int) -> bool:
    """Rough guard: ~16 [B, H, seq/n, D] tensors per rank must fit in half this rank's share of RAM."""
    try:
        with open("/proc/meminfo") as f:
            avail = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable"))
    except (OSError, StopIteration):
        return True
    need = 16 * cfg.batch * cfg.heads * (seq // n) * cfg.head_dim * getattr(torch, cfg.dtype).itemsize
    return need < 0.5 * avail / ranks_here


def polite_barrier(comm) -> None:
    wait_all([comm.Ibarrier()])


def attention_fn(method: str, g: Group | None, causal: bool):
    if method == "serial":
        return lambda q, k, v, prof: F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    if method == "ulysses":
        return lambda q, k, v, prof: ulysses_attention(q, k, v, g, causal, "zigzag", profile=prof)
    layout = method.split("-")[1]
    return lambda q, k, v, prof: ring_attention(q, k, v, g, causal, layout, profile=prof)


class Point:
    """One (method, N, seq) on this rank: one timed fwd+bwd per `run`, so the points of a
    sequence length can be run in turns (side by side: a slow spell of a shared machine
    hits each of them, not one). Inputs are made afresh for every iteration (untimed)."""

    def __init__(self, cfg: Config, method: str, g: Group, seq: int, tracer: Tracer):
        self.cfg, self.method, self.g, self.seq, self.tracer = cfg, method, g, seq, tracer
        self.fn = attention_fn(method, g, cfg.causal)
        self.samples: list[dict] = []
        self.peak, self.steps = 0, []

    def run(self, it: int) -> None:
        cfg, g = self.cfg, self.g
        dt = getattr(torch, cfg.dtype)
        shape = (cfg.batch, cfg.heads, self.seq // g.size, cfg.head_dim)
        gen = torch.Generator().manual_seed(1 + g.rank)
        q, k, v = (torch.randn(shape, generator=gen).to(dt).requires_grad_() for _ in range(3))
        dout = torch.randn(shape, generator=gen).to(dt)
        prof, meter = [], ActivationMeter()
        tags = {"microbatch": it, "method": self.method, "seq": self.seq, "sp": g.size}
        polite_barrier(g.comm)
        c0, t0 = time.process_time(), time.perf_counter()
        with self.tracer.span("forward", **tags), meter:
            out = self.fn(q, k, v, prof)
        t1 = time.perf_counter()
        with self.tracer.span("backward", **tags):
            out.backward(dout)
        t2, c2 = time.perf_counter(), time.process_time()
        if it < cfg.warmup:
            return
        step = t2 - t0
        if self.method == "ulysses":  # its profile times the all-to-alls
            exposed = sum(p.get("comm_s", 0.0) for p in prof)
            wait = exposed
        elif prof:  # ring: everything but the block computations (waits, posting, the final copies)
            exposed = step - sum(p["compute_s"] for p in prof)
            wait = sum(p["wait_s"] for p in prof)
        else:
            exposed = wait = 0.0
        self.samples.append({"step": step, "fwd": t1 - t0, "bwd": t2 - t1, "cpu": c2 - c0,
                             "exposed": exposed, "wait": wait})
        self.peak = meter.peak
        self.steps = [[p["pass"][0], p["step"], round(p["compute_s"], 6)] for p in prof if "step" in p]

    def result(self) -> dict:
        """This rank's medians over the timed iterations (compute = step - exposed, per iteration)."""
        med = {k: statistics.median(s[k] for s in self.samples) for k in self.samples[0]}
        med["compute"] = statistics.median(s["step"] - s["exposed"] for s in self.samples)
        return {**med, "peak": self.peak, "steps": self.steps}


def summarize(rows: list[dict], cfg: Config, serial: dict | None) -> dict:
    """One table row from every rank's numbers (rank 0 of the sub-group)."""
    comp = [r["compute"] for r in rows]
    step = max(r["step"] for r in rows)
    peak = max(r["peak"] for r in rows)
    m = {"time_s": step, "fwd_s": max(r["fwd"] for r in rows), "bwd_s": max(r["bwd"] for r in rows),
         "cpu_s": max(r["cpu"] for r in rows),
         "compute_s": max(comp), "exposed_comm_s": max(r["exposed"] for r in rows),
         "imbalance": max(comp) / max(statistics.mean(comp), 1e-12), "peak_act_bytes": peak,
         "compute_s_per_rank": json.dumps([round(c, 6) for c in comp]),
         "exposed_comm_s_per_rank": json.dumps([round(r["exposed"], 6) for r in rows]),
         "wait_s_per_rank": json.dumps([round(r["wait"], 6) for r in rows]),
         "imbalance_per_rank": json.dumps([round(c / max(statistics.mean(comp), 1e-12), 4) for c in comp]),
         "peak_act_bytes_per_rank": json.dumps([r["peak"] for r in rows]),
         "step_compute_s": json.dumps([r["steps"] for r in rows]),
         "budget_bytes": int(cfg.budget_mb * 2**20), "fits_budget": peak <= cfg.budget_mb * 2**20}
    m["exposed_frac"] = m["exposed_comm_s"] / step
    if serial is not None:
        m["time_vs_serial"] = step / serial["time_s"]
        m["cpu_vs_serial"] = m["cpu_s"] / serial["cpu_s"] if serial.get("cpu_s") else float("nan")
        m["mem_vs_serial"] = peak / max(serial["peak_act_bytes"], 1)
    return m


def per_rank_line(m: dict) -> str:
    """Exposed communication (share of the step) and compute imbalance, rank by rank."""
    exposed, comp = json.loads(m["exposed_comm_s_per_rank"]), json.loads(m["compute_s_per_rank"])
    parts = [f"r{i}: exposed {e * 1e3:.1f} ms ({e / m['time_s']:.1%}), compute {c * 1e3:.1f} ms "
             f"(x{c / statistics.mean(comp):.3f} of mean)" for i, (e, c) in enumerate(zip(exposed, comp))]
    return "    " + "; ".join(parts)


def points(cfg: Config):
    """(seq, n, method) in order: serial first for each length (the baseline of the others)."""
    for seq in cfg.seqs:
        for n in cfg.sp:
            for method in cfg.methods:
                if (method == "serial") != (n == 1) or seq % num_chunks(n, "zigzag"):
                    continue
                if method == "ulysses" and cfg.heads % n:
                    continue
                yield seq, n, method


def try_context_parallel(world) -> dict:
    """Run torch's context_parallel on CPU (gloo) once; record whether it runs and why not."""
    import torch.distributed as dist

    status, reason = "ok", ""
    try:
        init_gloo(world, timeout_s=30)
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor.experimental import context_parallel

        mesh = init_device_mesh("cpu", (world.size,))
        q, k, v = (torch.randn(1, 2, 16 * world.size, 8) for _ in range(3))
        with context_parallel(mesh, buffers=[q, k, v], buffer_seq_dims=[2, 2, 2]):
            F.scaled_dot_product_attention(q, k, v, is_causal=True)
    except Exception as exc:  # recorded, not fatal: the study goes on without it
        status, reason = "does not run on CPU", f"{type(exc).__name__}: {exc}"[:500]
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return {"torch_version": torch.__version__, "status": status, "reason": reason}


def stored_rows(cfg: Config) -> list[dict]:
    """Rows of /results/sequence_parallel already in the file for this model shape (rank 0)."""
    cols = read_results(cfg.out, TABLE) if Path(cfg.out).exists() else {}
    rows = [{k: (v[i].item() if hasattr(v[i], "item") else v[i]) for k, v in cols.items()}
            for i in range(len(next(iter(cols.values()), [])))]
    same = {"batch": cfg.batch, "heads": cfg.heads, "head_dim": cfg.head_dim, "dtype": cfg.dtype,
            "causal": cfg.causal}
    return [r for r in rows if all(r.get(k) == v for k, v in same.items())]


def budget_rows(done: list[dict], cfg: Config) -> list[dict]:
    """Longest sequence within the per-rank budget: measured, and extrapolated (bytes ~ seq)."""
    out = []
    for key in sorted({(r["method"], r["sp"]) for r in done}):
        rs = [r for r in done if (r["method"], r["sp"]) == key]
        fit = [r["seq"] for r in rs if r["fits_budget"]]
        per_token = max(r["peak_act_bytes"] / r["seq"] for r in rs)
        budget = cfg.budget_mb * 2**20
        out.append({"method": key[0], "sp": key[1], "budget_bytes": int(budget),
                    "longest_measured_seq": max(fit) if fit else 0,
                    "predicted_max_seq": int(budget / per_token) if per_token else 0})
    return out


def figure(done: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
    for key in sorted({(r["method"], r["sp"]) for r in done}):
        rs = sorted((r for r in done if (r["method"], r["sp"]) == key), key=lambda r: r["seq"])
        label = key[0] if key[0] == "serial" else f"{key[0]} N={key[1]}"
        ax_t.plot([r["seq"] for r in rs], [r["time_s"] for r in rs], "o-", label=label)
        ax_m.plot([r["seq"] for r in rs], [r["peak_act_bytes"] / 2**20 for r in rs], "o-", label=label)
    for ax, ylabel in ((ax_t, "fwd+bwd time (s)"), (ax_m, "peak activation MiB per rank")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length (tokens)")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
    ax_m.legend(fontsize=7)
    fig.suptitle("Causal attention: sequence parallelism vs serial SDPA")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


TABLE_COLUMNS = ["method", "sp", "seq", "time_s", "time_vs_serial", "cpu_vs_serial", "exposed_frac", "imbalance",
                 "peak_act_bytes", "mem_vs_serial", "fits_budget"]


def main() -> None:
    install_abort_on_exception()
    world = MPI.COMM_WORLD
    cfg = parse_args(world.size)
    stop = preempt.trap(world)  # SIGTERM/SIGUSR1: stop after the point in hand (its row is stored)
    threads = setup_threads(world, cfg.threads)
    local_size = mdevice.ranks_on_node(world)[1]
    groups = prefix_groups(world, cfg.sp, "sp")
    tracer = Tracer(world)
    prov = provenance(world)
    writer = ResultsWriter(cfg.out, TABLE, UNITS, prov) if world.rank == 0 else None
    plan = list(points(cfg))
    serial, last = {}, {}  # kept on world rank 0 (rank 0 of every sub-group)
    for r in stored_rows(cfg) if world.rank == 0 else []:  # a resumed run keeps its baselines
        last[(r["method"], r["sp"])] = (r["seq"], r["time_s"])
        if r["method"] == "serial":
            serial[r["seq"]] = r
    for seq in cfg.seqs:  # the points of one length run in turns, one iteration each
        todo = []
        for seq_, n, method in plan:
            if seq_ != seq:
                continue
            conf = {"method": method, "sp": n, "seq": seq, "batch": cfg.batch, "heads": cfg.heads,
                    "head_dim": cfg.head_dim, "dtype": cfg.dtype, "causal": cfg.causal, "threads": threads}
            skip = None
            if world.rank == 0:
                prev = last.get((method, n))
                predicted = prev[1] * (seq / prev[0]) ** 2 if prev else 0.0
                skip = (writer.done(conf) or predicted > cfg.max_point_s * (cfg.warmup + cfg.iters)
                        or not fits_in_ram(cfg, seq, n, local_size))
            if not world.bcast(skip):
                g = groups[n]
                todo.append((conf, Point(cfg, method, g, seq, tracer) if g is not None else None))
        for it in range(cfg.warmup + cfg.iters):
            for conf, point in todo:
                polite_barrier(world)
                if point is not None:
                    point.run(it)
        polite_barrier(world)
        for conf, point in sorted(todo, key=lambda cp: cp[0]["method"] != "serial"):  # the baseline first
            if point is None:
                continue
            rows = point.g.comm.gather(point.result(), root=0)
            if point.g.rank == 0:
                method, n = conf["method"], conf["sp"]
                m = summarize(rows, cfg, serial.get(seq))
                writer.append(conf, m, UNITS)
                last[(method, n)] = (seq, m["time_s"])
                if method == "serial":
                    serial[seq] = m
                vs = f"  x{m['time_vs_serial']:.3f} serial (cpu x{m['cpu_vs_serial']:.3f})" if "time_vs_serial" in m else ""
                print(f"[{plan.index((seq, n, method)) + 1}/{len(plan)}] {method:16s} N={n} seq={seq:6d}  "
                      f"{m['time_s']:.4f} s  cpu {m['cpu_s']:.4f} s{vs}  peak {m['peak_act_bytes'] / 2**20:.1f} MiB",
                      flush=True)
                if n > 1:
                    print(per_rank_line(m), flush=True)
        polite_barrier(world)
        stop.check("sequence_parallel")
    cp = try_context_parallel(world) if cfg.context_parallel else {
        "torch_version": torch.__version__, "status": "not tried", "reason": "--quick or --no-context-parallel"}
    tracer.save(cfg.out, attrs={"config": json.dumps(dataclasses.asdict(cfg))})
    if world.rank == 0:
        done = stored_rows(cfg)
        write_table(cfg.out, "sequence_parallel_budget", budget_rows(done, cfg), {"budget_bytes": "B"})
        write_table(cfg.out, "context_parallel", [cp])
        if done:
            figure(done, cfg.figure)
            print_table(done, TABLE_COLUMNS, 15)
        print(f"context_parallel on CPU: {cp['status']} {cp['reason']}")
        print(f"wrote {cfg.out} and {cfg.figure}")


if __name__ == "__main__":
    main()
