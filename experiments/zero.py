#!/usr/bin/env python3
"""ZeRO 0-3 against torch DDP and torch FSDP2: step time and peak memory per rank; memory sweep.

    mpiexec -n 2 python experiments/zero.py                 # benchmark (ranks 0-1 of any world)
    mpiexec -n 4 python experiments/zero.py --sweep         # + bytes per parameter at dp = 1, 2, 4

Benchmark: train_gpt.py's GPT on the character corpus (default hidden 384,
4 layers: 7.2M parameters) on 4 x 64 tokens per step (--batch: a small batch
keeps AdamW's step visible beside the forward and backward), data parallel
over 2 ranks, one microbatch per step, float32, AdamW. Variants:
mpipar zero 0-3 (models.GPT(cfg, mesh, zero=z) + models.optimizer), torch
DDP and torch FSDP2 (`fully_shard` per block and at the root, gloo), serial
(the plain model and AdamW on the whole batch, on rank 0 with its threads
while the other rank idles: what one device does alone); zero 1-3
move their flat buffers through node shared memory, "zeroN-mpi" through MPI
(MPIPAR_SYMMETRIC_BUCKETS=0 for that model: mpipar.models.zero.shared). Per
variant: median and minimum step time (slowest rank; all variants built, one
step of each in turn per round), the median CPU time of the step (process
time, slowest rank: the work, whatever else shares the cores; run with
MPIPAR_POLITE=1 so that mpipar's waits sleep instead of spinning) and peak memory per rank: the highest RSS sampled
every 0.5 ms during 3 steps of the variant alone minus the RSS before it was
built (glibc's mmap threshold is pinned at 64 KiB then, so freed tensors
leave the RSS; at 32 MiB for the timed rounds). /results/zero_benchmark.

--sweep: mixed precision (bf16 parameters; zero >= 1 keeps float32 master
weights, zero=0 is plain AdamW on the bf16 parameters) at dp = 1, 2, 4 (those
that fit the world): bytes per parameter a rank holds of parameters, gradients
(at the optimizer step), optimizer state (master weights + moments) and the
activations saved for backward (ActivationMeter peak), beside the closed forms
(16, 4 + 12/d, 2 + 14/d, 16/d) and the ones of what mpipar keeps (reduced
gradient shards are float32: + 4/d). /results/zero_memory and a PNG.
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import statistics
import sys
import threading
import time
from pathlib import Path

import torch
from mpi4py import MPI

import mpipar
from mpipar import settings
from _common import init_gloo, prefix_groups, print_table, setup_threads
from mpipar import models
from mpipar.flight.abort import install_abort_on_exception
from mpipar.models import preempt
from mpipar.trace import ActivationMeter, Tracer, write_table
from mpipar.trace.memory import rss_bytes

VARIANTS = ["zero0", "zero1", "zero2", "zero3", "zero1-mpi", "zero2-mpi", "zero3-mpi", "torch-ddp", "torch-fsdp2",
            "serial"]
UNITS = {"step_s": "s", "step_min_s": "s", "cpu_s": "s", "peak_bytes": "B", "tokens_per_s": "tokens/s"}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=384)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--batch", type=int, default=4, help="global batch (rows of --seq tokens)")
    p.add_argument("--steps", type=int, default=8, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--sweep", action="store_true", help="also the memory sweep over zero 0-3 x dp 1, 2, 4")
    p.add_argument("--sweep-only", action="store_true", help="only the memory sweep")
    p.add_argument("--threads", type=int, default=0, help="torch threads per rank (0: cores / ranks)")
    p.add_argument("--quick", action="store_true", help="tiny model, 2 timed steps")
    p.add_argument("--out", default="results/zero.h5")
    a = p.parse_args()
    if a.quick:
        a.hidden, a.layers, a.steps, a.warmup = 64, 2, 2, 1
    return a


def mmap_threshold(nbytes: int) -> None:
    """glibc's M_MMAP_THRESHOLD (and twice it as M_TRIM_THRESHOLD): 64 KiB while memory is
    measured, so freed tensors leave the RSS; 32 MiB while timing, so that allocations are
    recycled in the heap instead of each one faulting fresh pages in (what glibc's own
    dynamic threshold converges to)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, nbytes)     # M_MMAP_THRESHOLD (setting it turns off its dynamic growth)
        libc.mallopt(-1, 2 * nbytes)  # M_TRIM_THRESHOLD
    except OSError:
        pass


class RssSampler:
    """Peak RSS while entered, sampled from a thread every `period` seconds."""

    def __init__(self, period: float = 5e-4):
        self.period, self.peak, self._stop = period, 0, threading.Event()

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.period)

    def __enter__(self):
        self._stop.clear()
        self.peak = rss_bytes()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


def gpt_config(a, vocab):
    return models.GPTConfig(vocab, a.seq, a.hidden, a.heads, a.layers, seed=0)


# ---- benchmark ---------------------------------------------------------------------------------
def build(variant: str, cfg, group):
    """(step function(tokens, targets), cleanup) of one variant on `group` (data parallel)."""
    lr, wd = 3e-3, 0.1
    if variant.startswith("zero"):
        mesh = mpipar.Mesh(dp=group.size, comm=group.comm)
        # "-mpi": ZeRO's collectives on MPI, not in node shared memory (mpipar.models.zero.shared)
        with settings.override(symmetric_buckets="0") if variant.endswith("-mpi") else contextlib.nullcontext():
            model = models.GPT(cfg, mesh, zero=int(variant[4]))
        opt = models.optimizer(model, torch.optim.AdamW, lr=lr, weight_decay=wd)

        def step(x, y):
            return models.train_step(model, (x, y), opt, mesh, 1)

        def cleanup():
            model.close()
            mesh.close()

        return step, cleanup
    model = models.GPT(cfg)
    if variant == "serial":  # the whole batch on rank 0 alone, with one rank's threads
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=wd)

        def serial_step(x, y):
            if group.rank != 0:
                return float("nan")
            loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.reshape(-1))
            loss.backward()
            opt.step()
            opt.zero_grad()
            return float(loss.detach())

        return serial_step, lambda: None
    import torch.distributed as dist

    if variant == "torch-ddp":
        from torch.nn.parallel import DistributedDataParallel

        wrapped = DistributedDataParallel(model)
    else:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        dmesh = init_device_mesh("cpu", (group.size,))
        for block in model.blocks:
            fully_shard(block, mesh=dmesh)
        wrapped = fully_shard(model, mesh=dmesh)
    opt = torch.optim.AdamW(wrapped.parameters(), lr=lr, weight_decay=wd)
    rank, size = dist.get_rank(), dist.get_world_size()

    def step(x, y):
        xs, ys = x.tensor_split(size)[rank], y.tensor_split(size)[rank]
        logits = wrapped(xs)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ys.reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad()
        return float(loss.detach())

    return step, lambda: None


def benchmark(a, group, corpus) -> list[dict]:
    """Peak memory of each variant alone (built, primed, sampled, torn down in turn), then step
    times with every variant built, one step of each in turn per round (the machine's load
    drifts alike for all)."""
    cfg = gpt_config(a, corpus.vocab_size)
    variants = a.variants.split(",")
    batches = [corpus.batch(s, a.batch, a.seq) for s in range(a.warmup + a.steps)]
    peaks = {}
    mmap_threshold(1 << 16)
    for variant in variants:
        step, cleanup = build(variant, cfg, group)  # a first run pays the one-time allocations
        for x, y in batches[:2]:
            step(x, y)
        cleanup()
        del step, cleanup
        gc.collect()
        base = rss_bytes()
        step, cleanup = build(variant, cfg, group)
        with RssSampler() as rss:
            for x, y in batches[:3]:
                step(x, y)
        peaks[variant] = group.comm.allreduce(rss.peak - base, op=MPI.MAX)
        cleanup()
        del step, cleanup
        gc.collect()
    mmap_threshold(32 << 20)
    built = {v: build(v, cfg, group) for v in variants}
    times = {v: [] for v in variants}
    cpu = {v: [] for v in variants}
    for i, (x, y) in enumerate(batches):
        for v in variants:
            group.comm.Barrier()
            t0, c0 = time.perf_counter(), time.process_time()
            built[v][0](x, y)
            dt, dc = group.comm.allreduce((time.perf_counter() - t0, time.process_time() - c0), op=MPI.MAX)
            if i >= a.warmup:
                times[v].append(dt)
                cpu[v].append(dc)
    for _, cleanup in built.values():
        cleanup()
    rows = []
    for v in variants:
        step_s = statistics.median(times[v])
        rows.append({"variant": v, "ranks": group.size, "params": cfg.num_params(), "step_s": step_s,
                     "step_min_s": min(times[v]), "cpu_s": statistics.median(cpu[v]),
                     "tokens_per_s": a.batch * a.seq / step_s,
                     "peak_bytes": int(peaks[v])})
    return rows


# ---- memory sweep ------------------------------------------------------------------------------
CLOSED = {0: lambda d: 16.0, 1: lambda d: 4 + 12 / d, 2: lambda d: 2 + 14 / d, 3: lambda d: 16 / d}
MPIPAR = {0: lambda d: 8.0, 1: lambda d: 4 + 16 / d, 2: lambda d: 2 + 16 / d, 3: lambda d: 18 / d}


def _tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def measure(zero: int, group, cfg, corpus, batch: int) -> dict:
    """Bytes this rank holds: parameters and optimizer state between steps, gradients at the step,
    peak activations saved for backward."""
    mesh = mpipar.Mesh(dp=group.size, comm=group.comm)
    model = models.GPT(cfg, mesh, zero=zero, dtype=torch.bfloat16)
    opt = models.optimizer(model, torch.optim.AdamW, lr=1e-3)
    seen = {}

    def at_step(*_):
        if zero:
            seen["grads"] = model.buckets.held_bytes()["grads"]
        else:
            seen["grads"] = _tensor_bytes(p.grad for p in model.parameters() if p.grad is not None)

    opt.register_step_pre_hook(at_step)
    meter = ActivationMeter()
    for s in range(2):
        meter.reset_peak()
        with meter:
            models.train_step(model, corpus.batch(s, batch, cfg.seq_len), opt, mesh, 1)
    state = _tensor_bytes(t for st in opt.state.values() for t in st.values() if torch.is_tensor(t) and t.dim())
    if zero:
        held = model.buckets.held_bytes()
        params, masters = held["params"], held["masters"]
    else:
        params, masters = _tensor_bytes(model.parameters()), 0
    model.close()
    mesh.close()
    return {"params": params, "grads": seen["grads"], "optimizer": state + masters, "activations": meter.peak}


def sweep(a, world, corpus, stop) -> list[dict]:
    cfg = models.GPTConfig(corpus.vocab_size, a.seq, a.hidden, a.heads, a.layers, seed=0)
    n = cfg.num_params()
    sizes = [d for d in (1, 2, 4) if d <= world.size]
    groups = prefix_groups(world, sizes, "dp")
    rows = []
    for d in sizes:
        for zero in range(4):
            if stop.stopped:  # signalled: the rows that finished are kept
                break
            m = measure(zero, groups[d], cfg, corpus, a.batch) if groups[d] is not None else None
            world.Barrier()
            stop.agreed()
            if world.rank != 0:
                continue
            per = {k: v / n for k, v in m.items()}
            rows.append({"zero": zero, "dp": d, "params": n, **{f"{k}_bytes": v for k, v in m.items()},
                         **{f"{k}_per_param": v for k, v in per.items()},
                         "model_state_per_param": per["params"] + per["grads"] + per["optimizer"],
                         "closed_form_per_param": CLOSED[zero](d), "mpipar_form_per_param": MPIPAR[zero](d)})
    return rows


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(14, 3.6), sharey=True)
    for zero, ax in enumerate(axes):
        mine = [r for r in rows if r["zero"] == zero]
        ds = [r["dp"] for r in mine]
        bottom = [0.0] * len(mine)
        for key, color in (("params", "C0"), ("grads", "C1"), ("optimizer", "C2")):
            vals = [r[f"{key}_per_param"] for r in mine]
            ax.bar([str(d) for d in ds], vals, bottom=bottom, color=color, label=key)
            bottom = [b + v for b, v in zip(bottom, vals)]
        ax.plot([str(d) for d in ds], [r["closed_form_per_param"] for r in mine], "k_", ms=28, mew=2,
                label="closed form (16, 4+12/d, 2+14/d, 16/d)")
        ax.plot([str(d) for d in ds], [r["mpipar_form_per_param"] for r in mine], "r.", ms=10,
                label="mpipar's form")
        ax.set_title(f"zero={zero}")
        ax.set_xlabel("dp")
    axes[0].set_ylabel("bytes per parameter held by a rank")
    axes[-1].legend(fontsize=7)
    fig.suptitle("ZeRO: model state per rank, bf16 parameters + AdamW (measured bars)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    install_abort_on_exception()
    a = parse_args()
    world = MPI.COMM_WORLD
    tracer = Tracer(mpipar.Mesh(dp=world.size))  # the first Mesh installs the job's hooks: on the world
    setup_threads(world, a.threads)
    corpus = models.CharCorpus(num_chars=200_000, seed=0)
    if world.size < 2 and not a.sweep_only:
        sys.exit("zero.py: the benchmark needs 2 ranks (or --sweep-only)")
    stop = preempt.trap(world)  # SIGTERM/SIGUSR1: finish the measurement in hand, write what finished, exit
    rows = []
    if not a.sweep_only:
        pair = prefix_groups(world, [2], "pair")[2]
        if pair is not None:
            if any(v.startswith("torch") for v in a.variants.split(",")):
                init_gloo(pair)
            with tracer.span("benchmark"):
                rows = benchmark(a, pair, corpus)
            tracer.sample_memory("after the benchmark")
        world.Barrier()
        stop.agreed()
    with tracer.span("sweep"):
        mem = sweep(a, world, corpus, stop) if (a.sweep or a.sweep_only) and not stop.stopped else []
    tracer.sample_memory("after the sweep")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    tracer.save(a.out, attrs={"experiment": "zero"})   # /spans and /memory, collectively
    if world.rank != 0:
        stop.finish("zero")
        return
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    if rows:
        z0 = next((r for r in rows if r["variant"] == "zero0"), None)
        for r in rows:
            for key, col in (("step_s", "vs_zero0_step"), ("step_min_s", "vs_zero0_min"), ("cpu_s", "vs_zero0_cpu"),
                             ("peak_bytes", "vs_zero0_peak")):
                r[col] = r[key] / z0[key] if z0 and z0[key] else float("nan")
        for peer, col in (("torch-ddp", "vs_ddp_step"), ("serial", "vs_serial_step")):  # the two peers
            base = next((r["step_s"] for r in rows if r["variant"] == peer), None)
            for r in rows:
                r[col] = r["step_s"] / base if base else float("nan")
        write_table(a.out, "zero_benchmark", rows, UNITS, attrs={"experiment": "zero", "config": str(vars(a))})
        shown = [{**r, "step_ms": r["step_s"] * 1e3, "min_ms": r["step_min_s"] * 1e3, "cpu_ms": r["cpu_s"] * 1e3,
                  "peak_MiB": r["peak_bytes"] / 2**20} for r in rows]
        print(f"\n{rows[0]['params'] / 1e6:.2f}M parameters, {a.batch}x{a.seq} tokens per step, 2 ranks "
              f"(step: median and min over {a.steps} rounds)")
        print_table(shown, ["variant", "step_ms", "min_ms", "cpu_ms", "peak_MiB", "vs_zero0_step", "vs_zero0_min",
                            "vs_zero0_cpu", "vs_zero0_peak", "vs_ddp_step", "vs_serial_step"])
    if mem:
        write_table(a.out, "zero_memory", mem, {k: "B" if k.endswith("_bytes") else "B/parameter"
                                                for k in mem[0] if k.endswith(("_bytes", "_per_param"))})
        png = str(Path(a.out).with_suffix("")) + "_memory.png"
        plot(mem, png)
        print("\nbytes per parameter held by a rank (bf16 parameters, AdamW)")
        print_table(mem, ["zero", "dp", "params_per_param", "grads_per_param", "optimizer_per_param",
                          "model_state_per_param", "closed_form_per_param", "mpipar_form_per_param",
                          "activations_bytes"], width=12)
        print(f"plot: {png}")
    print(f"results: {a.out}")
    stop.finish("zero")


if __name__ == "__main__":
    main()
