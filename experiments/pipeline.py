#!/usr/bin/env python3
"""Pipeline parallelism study: mpipar schedules vs the simulator vs torch.distributed.pipelining.

    mpiexec -n 2 python experiments/pipeline.py --out results/pipeline.h5 [--quick]
        [--schedules gpipe,1f1b,interleaved-1f1b,zb-h1] [--stages 2,3,4] [--microbatches 1,2,4,8,16]
        [--layers 8] [--hidden 1024] [--batch 512] [--chunks 2] [--steps 3] [--no-torch]

An MLP stack (`--layers` x [Linear(hidden, hidden), GELU], MSE loss) is split
into p stages (the first p ranks; the others wait politely). For every
schedule, p and m: the step time (median over steps of the max over ranks),
the measured bubble fraction (idle / (p x makespan), from as many steps traced
with spans alone after the timed ones, which run untraced), the simulated
bubble (`pipeline.simulate` with the measured per-microbatch F/B/W times, the
p2p time those steps paid, and the node's cores where the stages outnumber
them), and the peak activation bytes per stage (one more step, with the memory
traced). In the same
run, torch.distributed.pipelining on gloo (ScheduleGPipe, Schedule1F1B,
ScheduleInterleaved1F1B, and ScheduleInterleavedZeroBubble next to zb-h1) on
the same model. HDF5: /results/pipeline, /spans (every traced F/B/W/send/recv,
tagged with the point), /memory; PNG timelines (measured next to simulated)
per schedule via mpipar.analysis.pipeline_timeline.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from mpi4py import MPI
from torch import nn

from mpipar import device as mdevice
from mpipar.comm.wait import wait_all
from mpipar.errors import MpiparError
from mpipar.flight.abort import install_abort_on_exception
from mpipar.models import preempt
from mpipar.mesh import Group
from mpipar.analysis.pipeline_timeline import hop_seconds, simulate_point
from mpipar.pipeline import PipelineRunner, partition
from mpipar.pipeline.schedules import check_args
from mpipar.trace import ResultsWriter, Tracer, provenance

from _pipeline_torch import TORCH, init_torch, run_torch

TABLE = "pipeline"
UNITS = {"time_s": "s", "f_s": "s", "b_s": "s", "w_s": "s", "comm_s": "s", "hop_s": "s", "makespan_s": "s",
         "sim_makespan_s": "s", "peak_act_bytes": "B", "act_bytes_per_stage": "B", "costs_per_stage": "s",
         "cpu_costs_per_stage": "s"}
LOSS = nn.functional.mse_loss


@dataclasses.dataclass
class Config:
    schedules: list
    stages: list
    microbatches: list
    layers: int = 8
    hidden: int = 1024
    batch: int = 512
    chunks: int = 2
    steps: int = 3
    warmup: int = 1
    dtype: str = "float32"
    torch: bool = True
    figures: str = ""
    out: str = "results/pipeline.h5"


def parse_args(world: int) -> Config:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--schedules", default="gpipe,1f1b,interleaved-1f1b,zb-h1")
    p.add_argument("--stages", default="", help="pipeline sizes p (default 2..world size)")
    p.add_argument("--microbatches", default="1,2,4,8,16")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--chunks", type=int, default=2, help="model chunks per stage for interleaved schedules")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16"])
    p.add_argument("--no-torch", action="store_true", help="skip torch.distributed.pipelining")
    p.add_argument("--figures", default="", help="folder for timeline PNGs (default: next to --out)")
    p.add_argument("--out", default="results/pipeline.h5")
    p.add_argument("--quick", action="store_true", help="tiny model, m in {1,2,4}, one timed step")
    a = p.parse_args()
    stages = [int(x) for x in a.stages.split(",") if x] or list(range(2, world + 1)) or [1]
    cfg = Config(a.schedules.split(","), [s for s in stages if s <= world],
                 [int(x) for x in a.microbatches.split(",")], a.layers, a.hidden, a.batch, a.chunks,
                 a.steps, a.warmup, a.dtype, not a.no_torch, a.figures, a.out)
    if a.quick:
        cfg.hidden, cfg.batch, cfg.microbatches, cfg.steps = 64, 32, [1, 2, 4], 1
        cfg.stages = cfg.stages if a.stages else sorted({min(2, world), world})
    return cfg


def polite_barrier(comm) -> None:
    wait_all([comm.Ibarrier()])  # sleeps between polls when oversubscribed


def build_layers(cfg: Config) -> list:
    torch.manual_seed(0)  # the same model on every rank
    dt = getattr(torch, cfg.dtype)
    return [nn.Sequential(nn.Linear(cfg.hidden, cfg.hidden, dtype=dt), nn.GELU()) for _ in range(cfg.layers)]


def batch(cfg: Config):
    g = torch.Generator().manual_seed(1)
    dt = getattr(torch, cfg.dtype)
    return (torch.randn(cfg.batch, cfg.hidden, generator=g).to(dt),
            torch.randn(cfg.batch, cfg.hidden, generator=g).to(dt))


def timed(step, comm, cfg: Config, warmup: int | None = None) -> list:
    """Per-step wall times on this rank (barrier before each step): `warmup` (default
    cfg.warmup) steps, then cfg.steps timed ones."""
    times = []
    warmup = cfg.warmup if warmup is None else warmup
    for it in range(warmup + cfg.steps):
        polite_barrier(comm)
        t0 = time.perf_counter()
        step()
        if it >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def p2p_time(g: Group, nbytes: int, iters: int = 5) -> float:
    """One-way time of an nbytes message between ranks 0 and 1 (ping-pong); 0 for one rank."""
    if g.size < 2:
        return 0.0
    buf = np.zeros(max(nbytes // 4, 1), dtype=np.float32)
    ops = (g.comm.Isend, g.comm.Irecv) if g.rank == 0 else (g.comm.Irecv, g.comm.Isend)
    times = []
    for _ in range(iters + 1):
        polite_barrier(g.comm)
        t0 = time.perf_counter()
        for op in ops if g.rank < 2 else ():
            wait_all([op(buf, 1 - g.rank, 7)])
        times.append((time.perf_counter() - t0) / 2)
    return g.comm.bcast(statistics.median(times[1:]), root=0)


def run_mpipar(cfg, name, m, g, layers, tracer) -> dict:
    """Time cfg.steps untraced steps (what a user's step costs), then trace as many with spans
    alone for the bubble, the F/B/W costs and the p2p hops, then one step with the memory
    samples and the activation meter for the activation peak: those two cost time inside and
    between the spans (a traced 1F1B p=2 step took 1.4x an untraced one with them)."""
    v = cfg.chunks if name == "interleaved-1f1b" else 1
    chunks = [part for k, part in enumerate(partition(layers, g.size * v)) if k % g.size == g.rank]
    runner = PipelineRunner(chunks if len(chunks) > 1 else chunks[0], g, schedule=name,
                            num_microbatches=m, loss_fn=LOSS, tracer=tracer)
    x, y = batch(cfg)
    marks = []

    def step():
        marks.append(len(tracer.spans))
        runner.step(x, y)
        for c in chunks:
            c.zero_grad(set_to_none=True)

    tracer.enabled = False
    times = timed(step, g.comm, cfg)
    marks.clear()
    tracer.enabled, tracer.memory_enabled = True, False
    timed(step, g.comm, cfg, warmup=0)
    tracer.memory_enabled = True
    tracer.activations.reset_peak()
    polite_barrier(g.comm)
    step()
    del tracer.spans[marks.pop():]  # the memory step's spans: slowed by the meter
    tracer.enabled = False
    runner.close()
    marks.append(len(tracer.spans))
    steps = []
    for it in range(cfg.steps):
        spans = tracer.spans[marks[it]:marks[it + 1]]
        for s in spans:
            s.update(impl="mpipar", schedule=name, pp=g.size, microbatches=m, chunks=v, iteration=it)
        step_span = next(s for s in spans if s["name"] == "step")
        dur = {op: [s["t_end"] - s["t_start"] for s in spans if s["name"] == op] for op in "FBW"}
        cpu = {op: [s["cpu_s"] for s in spans if s["name"] == op] for op in "FBW"}
        steps.append({"busy": sum(map(sum, dur.values())), "start": step_span["t_start"],
                      "end": step_span["t_end"], **{op.lower(): dur[op] for op in "FBW"},
                      **{f"{op.lower()}_cpu": cpu[op] for op in "FBW"},
                      "p2p": [s for s in spans if s["name"] in ("send", "recv")]})
    return {"times": times, "steps": steps, "act": tracer.activations.peak, "chunks": v}


def summarize(rows: list[dict], name: str, m: int, p: int, comm_s: float, cores: int | None) -> dict:
    """One table row from every rank's numbers (rank 0 of the group); medians over the timed steps.
    `cores`: the node's cores where the stages outnumber them (their CPU times are then kept for
    the simulation, `simulate_point`), else None."""
    n = len(rows[0]["times"])
    time_s = statistics.median(max(r["times"][i] for r in rows) for i in range(n))
    acts = [int(r["act"]) for r in rows]
    out = {"time_s": time_s, "peak_act_bytes": max(acts), "act_bytes_per_stage": json.dumps(acts)}
    if "steps" not in rows[0]:
        return out
    v = rows[0]["chunks"]
    makespans = [max(r["steps"][i]["end"] for r in rows) - min(r["steps"][i]["start"] for r in rows)
                 for i in range(n)]
    bubbles = [1 - sum(r["steps"][i]["busy"] for r in rows) / (p * makespans[i]) for i in range(n)]

    def per_stage(suffix):  # one microbatch through the whole stage (all chunks), mean over the steps
        return {k: [v * statistics.fmean([t for st in r["steps"] for t in st[k + suffix]] or [0.0]) for r in rows]
                for k in "fbw"}

    costs = per_stage("")
    hop_s = hop_seconds([s for r in rows for s in r["steps"][i]["p2p"]] for i in range(n))
    out.update(makespan_s=statistics.median(makespans), bubble_measured=statistics.median(bubbles),
               **{f"{k}_s": statistics.fmean(c) for k, c in costs.items()}, costs_per_stage=json.dumps(costs),
               cpu_costs_per_stage=json.dumps(per_stage("_cpu")) if cores else "", sim_cores=cores or 0,
               comm_s=comm_s, hop_s=hop_s, bubble_theory=_theory(name, p, m, v))
    sim = simulate_point({**out, "schedule": name, "pp": p, "microbatches": m, "chunks": v})
    out.update(bubble_simulated=sim.bubble_fraction, sim_makespan_s=sim.makespan)
    return out


def _theory(name: str, p: int, m: int, v: int) -> float:
    """The papers' bubble for equal stage costs: (p-1)/(v*m+p-1); NaN where it does not apply."""
    if name in ("gpipe", "1f1b") or name == "interleaved-1f1b" and m % p == 0:
        return (p - 1) / (v * m + p - 1)
    return float("nan")


def points(cfg: Config):
    for p in cfg.stages:
        for name in cfg.schedules:
            for m in cfg.microbatches:
                v = cfg.chunks if name == "interleaved-1f1b" else 1
                try:
                    check_args(name, p, m, v)
                except MpiparError:
                    continue
                if cfg.layers >= p * v and cfg.batch % m == 0:
                    yield p, name, m, v


def print_table(done: list[dict]) -> None:
    cols = ["impl", "schedule", "pp", "microbatches", "chunks", "time_s", "time_vs_torch", "bubble_measured",
            "bubble_simulated", "peak_act_bytes"]
    print(" ".join(f"{c[:13]:>13}" for c in cols))
    for r in done:
        vals = [r.get(c, float("nan")) for c in cols]
        print(" ".join(f"{v:>13.4g}" if isinstance(v, float) else f"{str(v):>13}" for v in vals))


def conf_of(cfg: Config, impl: str, name: str, p: int, m: int, v: int, threads: int) -> dict:
    """The config columns of one point (torch's zero-bubble schedule runs cfg.chunks chunks)."""
    torch_v = cfg.chunks if name in ("interleaved-1f1b", "zb-h1") else 1
    return {"impl": impl, "schedule": name if impl == "mpipar" else TORCH[name], "pp": p, "microbatches": m,
            "chunks": v if impl == "mpipar" else torch_v, "layers": cfg.layers, "hidden": cfg.hidden,
            "batch": cfg.batch, "dtype": cfg.dtype, "threads": threads}


def report(i: int, total: int, conf: dict, row: dict) -> None:
    nan = float("nan")
    print(f"[{i + 1}/{total}] {conf['impl']:6s} {conf['schedule']:28s} p={conf['pp']} m={conf['microbatches']:2d} "
          f"{row['time_s'] * 1e3:8.2f} ms  bubble {row.get('bubble_measured', nan):.3f} "
          f"(sim {row.get('bubble_simulated', nan):.3f})", flush=True)


def main() -> None:
    install_abort_on_exception()
    world = MPI.COMM_WORLD
    cfg = parse_args(world.size)
    stop = preempt.trap(world)  # SIGTERM/SIGUSR1: stop after the point in hand (its row is stored)
    threads = mdevice.set_threads(mdevice.ranks_on_node(world)[1])
    split = {p: world.Split(0 if world.rank < p else MPI.UNDEFINED, world.rank) for p in cfg.stages}
    groups = {p: Group(c, f"pp{p}") if c != MPI.COMM_NULL else None for p, c in split.items()}
    torch_groups = init_torch(world, cfg.stages) if cfg.torch else {}
    tracer = Tracer(world, enabled=False)
    cores = mdevice.cores_on_node()  # stages on one node beyond its cores share them (simulated so)
    sim_cores = {p: cores if mdevice.ranks_on_node(g.comm)[1] > cores else None for p, g in groups.items() if g}
    prov = provenance(world)  # collective
    writer = ResultsWriter(cfg.out, TABLE, UNITS, prov) if world.rank == 0 else None
    layers, plan, done = build_layers(cfg), list(points(cfg)), []
    for i, (p, name, m, v) in enumerate(plan):
        g = groups[p]
        comm_s = p2p_time(g, cfg.batch // m * cfg.hidden * layers[0][0].weight.element_size()) if g else 0.0
        for impl in (["torch"] if cfg.torch and name in TORCH else []) + ["mpipar"]:  # baseline first
            conf = conf_of(cfg, impl, name, p, m, v, threads)
            if world.bcast(writer.done(conf) if world.rank == 0 else None):
                continue
            polite_barrier(world)
            if g is not None:
                mine = (run_mpipar(cfg, name, m, g, layers, tracer) if impl == "mpipar"
                        else run_torch(cfg, name, m, g, layers, torch_groups[p], batch, timed))
                rows = g.comm.gather(mine, root=0)
                if g.rank == 0 and mine is not None:
                    row = {**summarize(rows, name, m, p, comm_s, sim_cores[p]), "mpipar_schedule": name}
                    ref = next((d["time_s"] for d in done if d["impl"] == "torch" and d["pp"] == p
                                and d["microbatches"] == m and d["mpipar_schedule"] == name), None)
                    row["time_vs_torch"] = row["time_s"] / ref if ref and impl == "mpipar" else float("nan")
                    writer.append(conf, row, UNITS)
                    done.append({**conf, **row})
                    report(i, len(plan), conf, row)
            polite_barrier(world)
            stop.check("pipeline")
    tracer.save(cfg.out, attrs={"config": json.dumps(dataclasses.asdict(cfg))})
    if world.rank == 0:
        print_table(done)
        from mpipar.analysis.pipeline_timeline import plot_timelines

        figs = plot_timelines([cfg.out], cfg.figures or str(Path(cfg.out).with_suffix("")) + "_figures")
        print(f"wrote {cfg.out} and {len(figs)} figure(s)")
    if torch_groups:
        import torch.distributed as dist

        dist.destroy_process_group()


if __name__ == "__main__":
    main()
