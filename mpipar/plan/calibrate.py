"""`python -m mpipar.plan calibrate -o FILE.json`: measure this machine into a System file.

Measured, with one torch thread per rank (what mpipar gives each rank when
ranks fill the cores):
  op_overhead      eager PyTorch's cost per op: a tiny GPT block's forward (and,
                   for backward ops, its backward) divided by the ops the model counts
  matmul           fp32 GEMMs over square and transformer shapes: the peak and the
                   half-size of the efficiency curve (least squares on log time);
                   bf16 / fp16 as their measured ratio to fp32 at one size
  attention        the fused CPU attention kernel (forward + backward) as a
                   fraction of the matmul peak
  memory           the copy bandwidth of 4 MiB tensors; Adam's traffic per parameter
                   (1M parameters in 256 KiB tensors) and its host cost per tensor
                   (with the gradient-norm pass of clipping)
  serial steps     a small GPT-2 and a Llama-tiny on one rank at micro-batch 1 and 8: the
                   per-op overhead and FLOP time scaled per arch to reproduce them
                   (calibrate_fit.fit_compute; the system's compute_scale); the same with
                   every rank of the 2- and 4-rank runs stepping its own at once: how much
                   each arch's per-op overhead and its device work slow when ranks share the
                   host (calibrate_fit.fit_contention_split; contention_split)
  collectives      mpipar.comm's all-reduce, all-gather, reduce-scatter, all-to-all
                   and p2p at 2 and 4 ranks under mpiexec (calibrate_comm.py), fitted
                   per call as a + nbytes * b; the resident set of a bare rank
  training         steps of a small GPT at 2 and 4 ranks (dp, tp, pp, sp, tp2 x dp2):
                   contention (how much slower each rank computes when ranks share
                   the host, beyond contention_split where measured) is fitted to the dp steps, sync_after_compute (what a
                   collective called right after compute costs at least) to the tp
                   steps (calibrate_fit.fit_training); the pp and sp steps are printed as a check
A shared host's speed drifts while this runs: every single-rank measurement
is bracketed by a fixed compute probe and scaled to the probes' median, and
the probe times are stored (measurements.probe_s) so that a run can measure
the host again and scale the prediction (runs.host_load).
Everything runs in a minute or two; --quick in less.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from ..errors import MpiparError
from .calibrate_fit import fit_compute, fit_contention_split, fit_training
from .costs import layer_cost
from .spec import Layout, ModelSpec
from .system import System


def _bench(fn, reps: int, rounds: int = 5) -> float:
    """Median seconds per call over `rounds` rounds (medians, as train_gpt reports its steps)."""
    fn()
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        times.append((time.perf_counter() - t0) / reps)
    return float(np.median(times))


def _counting_system() -> System:
    """A system where every op costs 1 s and work costs nothing: layer costs become op counts."""
    data = {"name": "count", "peak_flops": {"fp32": 1e30, "bf16": 1e30, "fp16": 1e30},
            "matmul": {"efficiency": 1.0, "half_dim": 0}, "attention": {"efficiency": 1.0, "half_dim": 0},
            "memory_bandwidth": 1e30, "memory_efficiency": 1.0, "memory_capacity": 1e30, "op_overhead": 1.0,
            "overhead_mode": "add", "ranks_per_node": 1, "links": {"intra": {"alpha": 0, "bandwidth": 1e30},
                                                                   "inter": {"alpha": 0, "bandwidth": 1e30}},
            "optimizer": {"bytes_per_param": 0, "per_tensor": 0}, "runtime_bytes": 0, "software": {}}
    return System(data)


def measure_overhead(torch) -> tuple[float, dict]:
    from ..models.gpt import Block, GPTConfig

    cfg = GPTConfig(16, 4, 8, 2, 1)
    block = Block(cfg, 0)
    x = torch.randn(1, 4, 8, requires_grad=True)
    t_f = _bench(lambda: block(x), 200)
    y = block(x).sum()

    def fb():
        block(x).sum().backward()

    t_fb = _bench(fb, 100)
    del y
    ops = layer_cost(ModelSpec(16, 4, 8, 2, 1), _counting_system(), Layout(dtype="fp32"))
    n_f, n_b = ops.f, ops.b + ops.w
    per_op_f = t_f / n_f                              # Python modules and the dispatcher
    per_op_b = max(t_fb - t_f, 0.0) / n_b             # the C++ autograd engine: cheaper per node
    return per_op_f, per_op_b, {"block_forward_s": t_f, "block_forward_backward_s": t_fb, "ops_forward": n_f,
                                "ops_backward": n_b}


def measure_matmul(torch, overhead: float, quick: bool) -> tuple[float, float, dict]:
    shapes = [(128, 128, 128), (256, 256, 256), (512, 512, 512), (256, 432, 144), (256, 144, 576),
              (256, 576, 144), (1024, 256, 256), (2048, 64, 64), (256, 64, 256), (64, 1024, 64)]
    if not quick:
        shapes += [(1024, 1024, 1024), (512, 1536, 512), (4096, 128, 128)]
    pts = []
    for m, n, k in shapes:
        a, b = torch.randn(m, k), torch.randn(k, n)
        reps = max(1, int(2e8 / (2 * m * n * k)))
        pts.append((m, n, k, _bench(lambda: a @ b, reps, 3)))   # a bare matmul: no autograd overhead
    best = None
    for half in (0, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256):
        shape = np.array([(m / (m + half)) * (n / (n + half)) * (k / (k + half)) for m, n, k, _ in pts])
        flops = np.array([2.0 * m * n * k for m, n, k, _ in pts])
        t = np.array([x[3] for x in pts])
        log_peak = np.mean(np.log(flops / (shape * t)))
        resid = np.sum((np.log(flops / (shape * np.exp(log_peak))) - np.log(t)) ** 2)
        if best is None or resid < best[0]:
            best = (resid, float(np.exp(log_peak)), half)
    _, peak, half = best
    return peak, half, {"matmul_points": [[m, n, k, t] for m, n, k, t in pts]}


def measure_dtype_ratio(torch, dtype) -> float:
    a32, b32 = torch.randn(512, 512), torch.randn(512, 512)
    a, b = a32.to(dtype), b32.to(dtype)
    return _bench(lambda: a32 @ b32, 3, 3) / _bench(lambda: a @ b, 3, 3)


def measure_attention(torch, peak: float, overhead: float, half: float) -> tuple[float, dict]:
    import torch.nn.functional as F

    effs, pts = [], []
    for b, a, s, d in ((4, 4, 64, 36), (2, 4, 256, 64), (1, 8, 128, 32)):
        q, k, v = (torch.randn(b, a, s, d, requires_grad=True) for _ in range(3))

        def fb():
            F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()

        t = max(_bench(fb, 5, 3) - 4 * overhead, 1e-9)
        flops = 3.5 * 0.5 * 4.0 * b * a * s * s * d     # forward + 2.5x backward, causal half
        effs.append(flops / (t * peak) / (d / (d + half)))
        pts.append([b, a, s, d, t])
    return float(np.median(effs)), {"attention_points": pts}


def measure_memory(torch) -> float:
    """Copy bandwidth of 4 MiB tensors: the size of a small model's activations (cache-resident
    tensors copy faster than DRAM-sized ones; CPU systems are calibrated for what mpipar runs here)."""
    a = torch.ones(1 << 20)
    b = torch.empty_like(a)
    t = _bench(lambda: b.copy_(a), 20, 5)
    return 2 * a.numel() * 4 / t


def measure_optimizer(torch, bandwidth: float) -> tuple[float, float]:
    def run(params):
        for p in params:
            p.grad = torch.ones_like(p)
        opt = torch.optim.AdamW(params, lr=1e-3)

        def step():
            total = sum(float(p.grad.detach().double().pow(2).sum()) for p in params)   # clipping's norm
            for p in params:
                p.grad.mul_(min(1.0, 1.0 / (total + 1e-6)))
            opt.step()

        return _bench(step, 3, 3)

    many = [torch.nn.Parameter(torch.zeros(16)) for _ in range(64)]
    per_tensor = run(many) / len(many)
    mid = [torch.nn.Parameter(torch.zeros(1 << 16)) for _ in range(16)]   # 1M parameters in 256 KiB tensors
    t = max(run(mid) - per_tensor * len(mid), 1e-9)
    return per_tensor, t * bandwidth / sum(p.numel() for p in mid)


def _run_comm(n: int, *args: str) -> dict:
    """calibrate_comm's JSON from `mpiexec -n n python -m mpipar.plan.calibrate_comm OUT *args`."""
    mpiexec = shutil.which("mpiexec", path=str(Path(sys.executable).parent)) or shutil.which("mpiexec")
    if mpiexec is None:
        raise MpiparError("calibrate: no mpiexec found next to the Python executable or on PATH")
    root = str(Path(__file__).resolve().parents[2])   # `-m` from here imports this checkout's mpipar
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "comm.json"
        cmd = [mpiexec, "-n", str(n), sys.executable, "-m", "mpipar.plan.calibrate_comm", str(path), *args]
        r = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=300)
        if r.returncode != 0 or not path.exists():
            raise MpiparError(f"calibrate: {' '.join(cmd)} failed ({r.returncode}): {r.stderr[-2000:]}")
        return json.loads(path.read_text())


def measure_serial(quick: bool) -> tuple[dict, float]:
    """({"ARCH@B": seconds of a step of that arch's probe model on one rank at micro-batch B},
    the compute probe around them)."""
    got = _run_comm(1, "--serial", *(("--quick",) if quick else ()))
    return got["serial_s"], got["probe_s"]


def measure_comm(ranks, quick: bool) -> dict:
    out: dict = {"collectives": {}, "collective_points": {}, "rss_bytes": 0, "probe_s": {}, "train_s": {},
                 "busy_serial_s": {}}
    for n in ranks:
        got = _run_comm(n, *(("--quick",) if quick else ()))
        for key in ("collectives", "collective_points"):
            for op, fits in got[key].items():
                out[key].setdefault(op, {}).update(fits)
        out["rss_bytes"] = max(out["rss_bytes"], got["rss_bytes"])
        out["probe_s"][str(n)] = got["probe_s"]
        out["train_s"].update(got["train_s"])
        out["busy_serial_s"][str(n)] = got.get("busy_serial_s", {})
    return out


def calibrate(out=None, ranks=(2, 4), quick: bool = False, threads: int = 1, log=print,
              keep: bool = False) -> System:
    """Measure this machine; returns the System (and writes it to `out` when given; `keep`: also
    as this host's calibration, the system "local" of mpipar.plan.host)."""
    import torch

    t_start = time.perf_counter()
    torch.set_num_threads(threads)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    from .calibrate_comm import compute_probe

    # A shared host's speed drifts: each measurement is bracketed by the compute probe and
    # scaled to the median probe, so the file describes one consistent host speed.
    probes = []

    def steady(fn):
        p0 = compute_probe(torch)
        out = fn()
        p1 = compute_probe(torch)
        probes.extend([p0, p1])
        return out, (p0 + p1) / 2

    (overhead, overhead_b, o_pts), p_o = steady(lambda: measure_overhead(torch))
    (peak, half, m_pts), p_m = steady(lambda: measure_matmul(torch, overhead, quick))
    ratios = {dt: measure_dtype_ratio(torch, getattr(torch, name)) for dt, name in (("bf16", "bfloat16"),
                                                                                  ("fp16", "float16"))}
    att_half = 16
    (att_eff, a_pts), p_a = steady(lambda: measure_attention(torch, peak, overhead, att_half))
    bw, p_bw = steady(lambda: measure_memory(torch))
    (per_tensor, bytes_per_param), p_opt = steady(lambda: measure_optimizer(torch, bw))
    serial = serial_probe = None
    if ranks:   # one rank under mpiexec: the parallel model as every layout's ranks run it
        serial, serial_probe = measure_serial(quick)
    probe1 = float(np.median(probes))
    overhead, overhead_b = overhead * probe1 / p_o, overhead_b * probe1 / p_o
    peak *= p_m / probe1
    att_eff *= p_a / p_m            # its time scaled to probe1, against the scaled peak
    bw *= p_bw / probe1
    per_tensor *= probe1 / p_opt
    bytes_per_param *= (probe1 / p_opt) * (p_bw / probe1)
    log(f"op overhead {overhead * 1e6:.1f} us forward, {overhead_b * 1e6:.1f} us backward "
        f"({o_pts['ops_forward']:.0f} + {o_pts['ops_backward']:.0f} ops per block)")
    log(f"matmul fp32 peak {peak / 1e9:.1f} GFLOP/s, half-size {half}")
    log("bf16 / fp16 rate vs fp32: " + ", ".join(f"{k} {v:.2f}" for k, v in ratios.items()))
    log(f"attention efficiency {att_eff:.2f} of the matmul peak")
    log(f"memory bandwidth {bw / 1e9:.1f} GB/s")
    log(f"optimizer {per_tensor * 1e6:.1f} us per tensor, {bytes_per_param:.0f} bytes per parameter")
    log(f"compute probe {probe1 * 1e3:.1f} ms (spread {min(probes) * 1e3:.1f}-{max(probes) * 1e3:.1f} ms)")
    comm = measure_comm(ranks, quick) if ranks else {"collectives": {}, "collective_points": {}, "rss_bytes": 0,
                                                      "probe_s": {}, "train_s": {}, "busy_serial_s": {}}
    contention = {n: t / probe1 for n, t in comm["probe_s"].items()}
    o_pts["probe_s"] = {"1": probe1, **comm["probe_s"]}
    log("compute probe slowdown with N ranks busy: "
        + ", ".join(f"{n}: {c:.2f}x" for n, c in contention.items()))
    ar = {k: v for k, v in comm["collectives"].get("all_reduce", {}).items() if "@" not in k}
    n_big = max((int(n) for n in ar), default=2)
    a, b = ar.get(str(n_big), [20e-6, 1e-9])
    alpha = a / (2 * (n_big - 1))
    busbw = 2 * (n_big - 1) / n_big / max(b, 1e-15)
    pa, pb = comm["collectives"].get("send_recv", {}).get(str(min(ranks or [2])), [a, b])
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    data = {
        "name": "local-cpu",
        "description": f"{platform.node()} ({platform.processor() or platform.machine()}, {cores} cores), "
                       f"torch {torch.__version__}, {threads} thread(s) per rank; calibrated {when}"
                       + (f" at load average {load:.1f}" if load is not None else ""),
        "peak_flops": {"fp32": peak, "bf16": peak * ratios["bf16"], "fp16": peak * ratios["fp16"]},
        "matmul": {"efficiency": 1.0, "half_dim": half},
        "attention": {"efficiency": att_eff, "half_dim": att_half},
        "memory_bandwidth": bw, "memory_efficiency": 1.0,
        "memory_capacity": float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")),
        "op_overhead": overhead, "op_overhead_backward": overhead_b, "overhead_mode": "add",
        "cores": cores, "ranks_per_node": 1 << 20, "contention": contention,
        "links": {"intra": {"alpha": alpha, "bandwidth": busbw, "p2p_alpha": pa, "p2p_bandwidth": 1 / max(pb, 1e-15)},
                  "inter": {"alpha": alpha, "bandwidth": busbw, "p2p_alpha": pa, "p2p_bandwidth": 1 / max(pb, 1e-15)}},
        "collectives": comm["collectives"],
        "optimizer": {"bytes_per_param": bytes_per_param, "per_tensor": per_tensor},
        "runtime_bytes": comm["rss_bytes"],
        "software": {"attention": "flash", "dp_overlap": 0.0, "ring_overlap": 0.0, "bucket_bytes": 1 << 20,
                     "grad_reduce_bytes": 4, "grad_accumulation_bytes": 12},
        "sources": {
            "all": f"measured by `python -m mpipar.plan calibrate` ({time.perf_counter() - t_start:.0f} s)",
            "software": "mpipar on CPU: MPI progresses only inside MPI calls, so bucket all-reduces and ring "
                        "passes are counted as exposed; 1 MiB gradient buckets reduced in fp32; PyTorch "
                        "accumulates fp32 gradients in place (read, read, write: 12 bytes per parameter)",
        },
        "measurements": {**o_pts, **m_pts, **a_pts, "collective_points": comm["collective_points"],
                         "train_s": comm["train_s"]},
    }
    if serial:
        data = fit_compute(data, {k: t * probe1 / serial_probe for k, t in serial.items()}, log)
        if comm["busy_serial_s"]:
            data = fit_contention_split(data, comm["busy_serial_s"], log)
    if comm["train_s"]:
        data = fit_training(data, comm["train_s"], log)
    from . import host

    data["host"] = host.fingerprint()
    system = System(data)
    if out:
        system.save(out)
        log(f"wrote {out} in {time.perf_counter() - t_start:.0f} s")
    if keep:
        mine = host.cache_path(data["host"])
        mine.parent.mkdir(parents=True, exist_ok=True)
        tmp = mine.with_name(f".{mine.name}.{os.getpid()}")
        system.save(tmp)
        os.replace(tmp, mine)   # a calibration cut short leaves the previous one
        log(f"kept as this host's calibration (system \"local\"): {mine}")
    return system
