#!/usr/bin/env python3
"""Tensor parallelism study: mpipar TP vs the serial block vs torch.distributed.tensor.parallel.

    mpiexec -n 2 python experiments/tensor_parallel.py --out results/tensor_parallel.h5 [--quick]
        [--blocks mlp,attention] [--hiddens 512,1024,2048,4096] [--tokens 2048] [--tp 1,2]
        [--methods serial,mpipar,mpipar-sp,torch] [--iters 3] [--warmup 1]

For every block (MLP, causal self-attention), hidden size and TP size N (the
first N ranks; the others wait politely), one forward+backward step of a
[1, tokens, hidden] activation is timed (median over iterations, max over
ranks). In the same run: the serial torch block on one rank with 1 thread
(`--serial-threads`), mpipar TP (`mpipar`; `mpipar-sp` with Megatron sequence
parallelism) and torch's ColwiseParallel/RowwiseParallel on a gloo DeviceMesh
(`torch`). Per point: step/forward/backward time, mpipar's collective time and
bytes per step (full-tensor bytes of every all-reduce / all-gather /
reduce-scatter), peak activation bytes saved for backward per rank, and the
ratios to serial and to torch. HDF5 table /results/tensor_parallel; table on rank 0.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import statistics
import time
from pathlib import Path

import torch
from mpi4py import MPI

import mpipar.comm
import mpipar.comm.autograd as region_ops
from mpipar import models
from mpipar.comm.wait import wait_all
from mpipar.flight.abort import install_abort_on_exception
from mpipar.models import preempt
from _common import init_gloo, prefix_groups, print_table, setup_threads
from mpipar.mesh import Group, as_group
from mpipar.layers.heads import merge_heads, split_heads
from mpipar.tensor import ParallelMLP, ParallelSelfAttention
from mpipar.trace import ActivationMeter, ResultsWriter, Tracer, provenance, read_results

TABLE = "tensor_parallel"
METHODS = ("serial", "mpipar", "mpipar-sp", "torch")
UNITS = {"time_s": "s", "fwd_s": "s", "bwd_s": "s", "comm_s": "s", "comm_bytes": "B",
         "act_bytes": "B", "tokens": "tokens", "gflops": "GFLOP/s"}


@dataclasses.dataclass
class Config:
    blocks: list
    hiddens: list
    tp: list
    methods: list
    tokens: int = 2048
    heads: int = 8
    dtype: str = "float32"
    iters: int = 3
    warmup: int = 1
    serial_threads: int = 1
    threads: int = 0
    out: str = "results/tensor_parallel.h5"


def parse_args(world: int) -> Config:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--blocks", default="mlp,attention")
    p.add_argument("--hiddens", default="512,1024,2048,4096")
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--tp", default="", help="TP sizes (default 1..world size)")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float64"])
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--serial-threads", type=int, default=1)
    p.add_argument("--threads", type=int, default=0, help="threads per rank (0: cores // ranks per node)")
    p.add_argument("--out", default="results/tensor_parallel.h5")
    p.add_argument("--quick", action="store_true", help="tiny sizes, 1 timed iteration (smoke test)")
    a = p.parse_args()
    tp = [int(x) for x in a.tp.split(",") if x] or list(range(1, world + 1))
    cfg = Config(a.blocks.split(","), [int(h) for h in a.hiddens.split(",")], [n for n in tp if n <= world],
                 [m for m in a.methods.split(",") if m], a.tokens, a.heads, a.dtype, a.iters, a.warmup,
                 a.serial_threads, a.threads, a.out)
    if a.quick:
        cfg.hiddens, cfg.tokens, cfg.iters, cfg.warmup = [96, 192], 192, 1, 1
    return cfg


def polite_barrier(comm) -> None:
    wait_all([comm.Ibarrier()])


class CommMeter:
    """Times and counts (full-tensor bytes) the collectives behind mpipar's region operators."""

    NAMES = ("all_reduce", "all_gather", "reduce_scatter")

    def __init__(self):
        self.seconds, self.nbytes, self.calls = 0.0, 0, 0

    def _wrap(self, name, fn):
        def timed(t, group, *args, **kwargs):
            start = time.perf_counter()
            out = fn(t, group, *args, **kwargs)
            self.seconds += time.perf_counter() - start
            full = out if name == "all_gather" else t
            if as_group(group).size > 1:
                self.nbytes += full.numel() * full.element_size()
                self.calls += 1
            return out
        return timed

    @contextlib.contextmanager
    def active(self):
        """Wrap the collectives where mpipar's layers reach them: the region operators and mpipar.comm."""
        saved = {(mod, n): getattr(mod, n) for mod in (region_ops, mpipar.comm) for n in self.NAMES}
        try:
            for (mod, n), fn in saved.items():
                setattr(mod, n, self._wrap(n, fn))
            yield self
        finally:
            for (mod, n), fn in saved.items():
                setattr(mod, n, fn)


class TorchAttention(torch.nn.Module):
    """The serial attention with separate q, k, v projections (torch TP shards each by heads)."""

    def __init__(self, serial: models.SelfAttention):
        super().__init__()
        h = serial.hidden
        self.local_heads, self.causal = serial.num_heads, serial.causal
        self.q, self.k, self.v = (torch.nn.Linear(h, h, dtype=serial.qkv.weight.dtype) for _ in range(3))
        with torch.no_grad():
            for lin, w, b in zip((self.q, self.k, self.v), serial.qkv.weight.chunk(3), serial.qkv.bias.chunk(3)):
                lin.weight.copy_(w)
                lin.bias.copy_(b)
        self.proj = serial.proj

    def forward(self, x):
        q, k, v = (split_heads(lin(x), self.local_heads) for lin in (self.q, self.k, self.v))
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return self.proj(merge_heads(out))


def torch_block(serial, block: str, mesh, n: int):
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    if block == "mlp":
        return parallelize_module(serial, mesh, {"fc1": ColwiseParallel(), "fc2": RowwiseParallel()})
    mod = TorchAttention(serial)
    plan = {"q": ColwiseParallel(), "k": ColwiseParallel(), "v": ColwiseParallel(), "proj": RowwiseParallel()}
    mod = parallelize_module(mod, mesh, plan)
    mod.local_heads //= n
    return mod


def build(cfg: Config, block: str, method: str, hidden: int, g: Group, torch_mesh):
    dt = getattr(torch, cfg.dtype)
    if block == "mlp":
        serial = models.MLP(hidden, 4 * hidden, seed=0, dtype=dt)
        if method.startswith("mpipar"):
            return ParallelMLP.from_serial(serial, g, sequence_parallel=method == "mpipar-sp")
    else:
        serial = models.SelfAttention(hidden, cfg.heads, seed=0, dtype=dt)
        if method.startswith("mpipar"):
            return ParallelSelfAttention.from_serial(serial, g, sequence_parallel=method == "mpipar-sp")
    return torch_block(serial, block, torch_mesh, g.size) if method == "torch" else serial


def flops(block: str, hidden: int, tokens: int) -> float:
    """Model FLOPs of fwd+bwd (3x forward) of the block's matmuls (causal attention: half the scores)."""
    if block == "mlp":
        fwd = 2 * tokens * hidden * 4 * hidden * 2
    else:
        fwd = 2 * tokens * hidden * 4 * hidden + 2 * tokens * tokens * hidden
    return 3.0 * fwd


def measure(cfg: Config, block: str, method: str, hidden: int, g: Group, torch_mesh, tracer) -> dict:
    """This rank's numbers for one point (collective over g)."""
    dt = getattr(torch, cfg.dtype)
    module = build(cfg, block, method, hidden, g, torch_mesh)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, cfg.tokens, hidden, generator=gen).to(dt)
    if method == "mpipar-sp":  # this rank's block of the sequence
        x = x.tensor_split(g.size, dim=1)[g.rank].clone()  # its own storage (what a real shard is)
    x = x.contiguous().requires_grad_()
    dy = torch.randn(x.shape, generator=gen).to(dt)
    fwd, bwd, comm_s, comm_b, meter, cm = [], [], [], [], ActivationMeter(exclude=module), CommMeter()
    for it in range(cfg.warmup + cfg.iters):
        meter.reset_peak()
        cm.seconds, cm.nbytes = 0.0, 0
        polite_barrier(g.comm)
        with cm.active():
            t0 = time.perf_counter()
            with tracer.span("forward", microbatch=it, block=block, method=method, hidden=hidden, tp=g.size), meter:
                y = module(x)
                if hasattr(y, "trigger_wait"):  # torch TP returns an async all-reduce: finish it
                    y.trigger_wait()
            t1 = time.perf_counter()
            with tracer.span("backward", microbatch=it, block=block, method=method, hidden=hidden, tp=g.size):
                y.backward(dy)
            t2 = time.perf_counter()
        module.zero_grad(set_to_none=True)
        x.grad = None
        del y
        if it >= cfg.warmup:
            fwd.append(t1 - t0)
            bwd.append(t2 - t1)
            comm_s.append(cm.seconds)
            comm_b.append(cm.nbytes)
    return {"step": statistics.median(f + b for f, b in zip(fwd, bwd)), "fwd": statistics.median(fwd),
            "bwd": statistics.median(bwd), "comm_s": statistics.median(comm_s), "comm_b": max(comm_b),
            "act": meter.peak}


def summarize(rows: list[dict], block: str, hidden: int, tokens: int, ref: dict) -> dict:
    """One table row from every rank's numbers; ref: baseline step times {"serial", "torch"} of the point."""
    step = max(r["step"] for r in rows)
    m = {"time_s": step, "fwd_s": max(r["fwd"] for r in rows), "bwd_s": max(r["bwd"] for r in rows),
         "comm_s": max(r["comm_s"] for r in rows), "comm_bytes": max(r["comm_b"] for r in rows),
         "act_bytes": max(r["act"] for r in rows), "act_bytes_per_rank": json.dumps([r["act"] for r in rows]),
         "gflops": flops(block, hidden, tokens) / step / 1e9}
    m["time_vs_serial"] = step / ref["serial"] if "serial" in ref else float("nan")
    m["time_vs_torch"] = step / ref["torch"] if "torch" in ref else float("nan")
    return m


def points(cfg: Config):
    """(block, hidden, n, method): serial first, then per TP size torch before mpipar (the baselines)."""
    order = sorted(cfg.methods, key=lambda m: ("serial", "torch", "mpipar", "mpipar-sp").index(m))
    for block in cfg.blocks:
        for hidden in cfg.hiddens:
            for n in cfg.tp:
                for method in order:
                    if method == "serial" and n != 1:
                        continue
                    if divides(cfg, block, hidden, n, method):
                        yield block, hidden, n, method


def divides(cfg: Config, block: str, hidden: int, n: int, method: str) -> bool:
    """Whether TP size n divides the sharded sizes (ffn, heads, tokens for sequence parallelism)."""
    sharded = [4 * hidden] if block == "mlp" else [cfg.heads, hidden]
    return all(v % n == 0 for v in sharded) and (not method.endswith("-sp") or cfg.tokens % n == 0)


def init_torch_distributed(world, tp_sizes):
    """gloo on 127.0.0.1 with a free port from rank 0; a DeviceMesh over the first n ranks for each n."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import DeviceMesh

    init_gloo(world, timeout_s=120)
    meshes = {}
    for n in tp_sizes:
        pg = dist.new_group(list(range(n)), backend="gloo")  # collective over the world
        meshes[n] = DeviceMesh.from_group(pg, "cpu") if world.rank < n else None
    return meshes


def previous_times(path: str) -> dict:
    """Step times of the points a resumed run already stored (the baselines of the new points)."""
    if not Path(path).exists():
        return {}
    t = read_results(path, TABLE)
    keys = zip(t.get("block", []), t.get("hidden", []), t.get("method", []), t.get("tp", []), t.get("time_s", []))
    return {(str(b), int(h), str(m), int(n)): float(s) for b, h, m, n, s in keys}


TABLE_COLUMNS = ["block", "hidden", "tp", "method", "time_s", "fwd_s", "bwd_s", "comm_s", "comm_bytes",
                 "act_bytes", "gflops", "time_vs_serial", "time_vs_torch"]


def main() -> None:
    install_abort_on_exception()
    world = MPI.COMM_WORLD
    cfg = parse_args(world.size)
    stop = preempt.trap(world)  # SIGTERM/SIGUSR1: stop after the point in hand (its row is stored)
    threads = setup_threads(world, cfg.threads)
    groups = prefix_groups(world, cfg.tp, "tp")
    meshes = init_torch_distributed(world, cfg.tp) if "torch" in cfg.methods else {}
    tracer = Tracer(world)
    prov = provenance(world)  # collective
    writer = ResultsWriter(cfg.out, TABLE, UNITS, prov) if world.rank == 0 else None
    plan = list(points(cfg))
    done, ref = [], previous_times(cfg.out) if world.rank == 0 else {}
    for i, (block, hidden, n, method) in enumerate(plan):
        conf = {"block": block, "hidden": hidden, "tokens": cfg.tokens, "tp": n, "method": method,
                "dtype": cfg.dtype, "heads": cfg.heads if block == "attention" else 0,
                "threads": cfg.serial_threads if method == "serial" else threads}
        if world.bcast(writer.done(conf) if world.rank == 0 else None):
            continue
        polite_barrier(world)
        g = groups[n]
        if g is not None:
            torch.set_num_threads(conf["threads"])
            mine = measure(cfg, block, method, hidden, g, meshes.get(n), tracer)
            torch.set_num_threads(threads)
            rows = g.comm.gather(mine, root=0)
            if g.rank == 0:
                base = {"serial": ref.get((block, hidden, "serial", 1)), "torch": ref.get((block, hidden, "torch", n))}
                m = summarize(rows, block, hidden, cfg.tokens,
                              {k: v for k, v in base.items() if v is not None and k != method})
                ref[(block, hidden, method, n)] = m["time_s"]
                writer.append(conf, m, UNITS)
                done.append({**conf, **m})
                print(f"[{i + 1}/{len(plan)}] {block:9s} h={hidden:5d} tp={n} {method:9s} "
                      f"{m['time_s']:.4f} s  act {m['act_bytes'] / 2**20:.1f} MiB", flush=True)
        polite_barrier(world)
        stop.check("tensor_parallel")
    tracer.save(cfg.out, attrs={"config": json.dumps(dataclasses.asdict(cfg))})
    if world.rank == 0:
        print_table(done, TABLE_COLUMNS)
        print(f"wrote {cfg.out}")
    if meshes:
        import torch.distributed as dist

        dist.destroy_process_group()


if __name__ == "__main__":
    main()
