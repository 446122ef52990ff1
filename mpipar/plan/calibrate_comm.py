"""Collective and p2p timings through mpipar.comm, run under mpiexec by `calibrate`.

    mpiexec -n N python -m mpipar.plan.calibrate_comm OUT.json [--quick]
    mpiexec -n 1 python -m mpipar.plan.calibrate_comm OUT.json --serial [--quick]

Times every call as the library's user sees it (argument agreement, staging,
Python included), at message sizes from 256 B to 4 MiB, and fits, per op,
time = a + nbytes * b (rows weighted by 1/time: the noise is relative).
nbytes is the full tensor: the all-reduce's buffer, the all-gather's output,
the reduce-scatter's input, the all-to-all's local buffer, the p2p message.
Rank 0 writes {"collectives": {op: {N: [a, b]}}, "collective_points": the
measurements, "rss_bytes": the largest rank's resident set after a few steps of a
tiny model, "probe_s": the mean
time of a fixed compute probe with all N ranks busy at once, "train_s": the median
step of a small GPT (PROBE_MODEL) on the layouts of probe_layouts(N), "busy_serial_s": the
serial steps below with every rank running its own at once (mean over ranks)} to OUT.json.

Why the training probe: the loop fits above time collectives back to back, with
every rank already waiting, and the compute probe runs alone in cache. In
training each collective follows compute, and on a host with more ranks than
cores a rank arriving first waits until its peers are scheduled again; ranks
also share caches and memory. calibrate fits those two effects to real steps.

With --serial (one rank): {"serial_s": {"ARCH@B": the median step of SERIAL_MODELS[ARCH]
on one rank at micro-batch B (SERIAL_MICRO_BATCHES, all interleaved)}, "probe_s": the
compute probe around them}. calibrate scales the model's per-op overhead and FLOP rate,
per arch, so that it reproduces them (calibrate_fit.fit_compute).
"""
from __future__ import annotations

import json
import sys
import time

import numpy as np

from mpipar.models.config import PRESETS


def _time(fn, comm, reps: int) -> float:
    fn()
    comm.Barrier()
    best = []
    for _ in range(3):
        comm.Barrier()
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        best.append((time.perf_counter() - t0) / reps)
    return comm.allreduce(float(np.median(best)), op=_max())


def _max():
    from mpi4py import MPI
    return MPI.MAX


def compute_probe(torch) -> float:
    """Seconds of a fixed mix of eager ops and GEMMs (the median of 5 rounds)."""
    from mpipar.models.gpt import Block, GPTConfig

    block = Block(GPTConfig(16, 16, 32, 2, 1), 0)
    x = torch.randn(2, 16, 32, requires_grad=True)
    a, b = torch.randn(256, 256), torch.randn(256, 256)

    def once():
        for _ in range(10):
            block(x).sum().backward()
        for _ in range(10):
            a @ b

    once()
    rounds = []
    for _ in range(5):
        t0 = time.perf_counter()
        once()
        rounds.append(time.perf_counter() - t0)
    return float(np.median(rounds))


# The training probe: a small GPT whose steps calibrate fits the host's effective contention and
# per-call synchronisation cost to (calibrate_fit.fit_training). The waits it fits scale with the
# compute between collectives, so its blocks are of the size studied here (a step of tens of
# ms); shapes run each layout of 2 and 4 ranks (pp 4 needs 4 layers; zigzag sp 4, seq % 8).
PROBE_MODEL = dict(vocab_size=64, seq_len=64, hidden=128, num_heads=4, num_layers=4)
PROBE_MICROBATCHES, PROBE_MICRO_BATCH = 4, 2
# The serial steps, one model per arch (the op mix of a block), span the micro-batch sizes a
# rank runs at (1 to 8): the per-op part of a step dominates at 1, its FLOPs at 8.
SERIAL_MODELS = {"gpt2": dict(PROBE_MODEL, arch="gpt2"),
                 "llama": dict(PRESETS["llama-tiny"], vocab_size=64, seq_len=64)}
SERIAL_MICRO_BATCHES = (1, 8)


def probe_layouts(n: int) -> dict:
    """name -> Mesh sizes of the training probes run on n ranks."""
    out = {"dp": dict(dp=n), "tp": dict(tp=n), "pp": dict(pp=n), "sp": dict(sp=n)}
    if n == 4:
        out["tp2dp2"] = dict(tp=2, dp=2)
    return out


def _train_probe(torch, mpipar, world, sizes: dict, steps: int) -> float:
    """Median seconds (slowest rank) of one train_step of the probe model on the layout `sizes`."""
    from mpipar import models

    mesh = mpipar.Mesh(**sizes)
    torch.manual_seed(0)
    model = models.GPT(models.GPTConfig(**PROBE_MODEL), mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    m = PROBE_MICROBATCHES
    tokens = torch.randint(0, PROBE_MODEL["vocab_size"], (m * PROBE_MICRO_BATCH * mesh.dp.size, PROBE_MODEL["seq_len"]),
                           generator=torch.Generator().manual_seed(0))
    times = []
    for i in range(2 + steps):
        world.Barrier()
        t0 = time.perf_counter()
        models.train_step(model, (tokens, tokens), opt, mesh, m, max_grad_norm=1.0)
        if i >= 2:
            times.append(world.allreduce(time.perf_counter() - t0, op=_max()))
    return float(np.median(times))


def serial_steps(torch, mpipar, rounds: int, comm=None) -> dict:
    """{"ARCH@B": median seconds of one train_step of SERIAL_MODELS[ARCH] on this one rank at
    micro-batch B}, every model and size once per round, so that a drift of the host moves them alike.
    comm: the one-rank communicator of the model (MPI_COMM_SELF where every rank runs its own)."""
    from mpipar import models

    mesh = mpipar.Mesh(comm=comm)   # the parallel model at one rank: what every layout's ranks run
    m = PROBE_MICROBATCHES
    gen = torch.Generator().manual_seed(0)
    runs = []
    for arch, cfg in SERIAL_MODELS.items():
        torch.manual_seed(0)
        model = models.GPT(models.GPTConfig(**cfg), mesh)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        for b in SERIAL_MICRO_BATCHES:
            tokens = torch.randint(0, cfg["vocab_size"], (m * b, cfg["seq_len"]), generator=gen)
            runs.append((f"{arch}@{b}", model, opt, tokens))
    times: dict = {key: [] for key, *_ in runs}
    for i in range(2 + rounds):
        for key, model, opt, tokens in runs:
            t0 = time.perf_counter()
            models.train_step(model, (tokens, tokens), opt, mesh, m, max_grad_norm=1.0)
            if i >= 2:
                times[key].append(time.perf_counter() - t0)
    mesh.close()
    return {key: float(np.median(t)) for key, t in times.items()}


def _trained_rss(torch, mesh, rss_bytes) -> int:
    """Resident set after a few steps of a tiny data-parallel GPT: what the framework itself holds
    (its model states are a few hundred KiB), with h5py loaded, as in any run that writes its
    trace (mpipar.trace)."""
    import h5py  # noqa: F401 (its libraries' resident pages are part of a run's baseline)

    from mpipar import models

    cfg = models.GPTConfig(64, 32, 32, 2, 2)
    model = models.GPT(cfg, mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        tokens = torch.randint(0, 64, (2 * mesh.dp.size, 32), generator=gen)
        models.train_step(model, (tokens, tokens), opt, mesh, 2, max_grad_norm=1.0)
    return rss_bytes()


def _fit(sizes, times) -> list[float]:
    x, t = np.asarray(sizes, float), np.asarray(times, float)
    A = np.stack([np.ones_like(x), x], axis=1) / t[:, None]
    (a, b), *_ = np.linalg.lstsq(A, np.ones_like(t), rcond=None)
    return [max(float(a), 0.0), max(float(b), 0.0)]


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    out, quick = argv[0], "--quick" in argv
    import torch

    import mpipar
    from mpipar import comm as C
    from mpipar.trace.memory import rss_bytes

    from mpi4py import MPI
    world = MPI.COMM_WORLD
    n = world.Get_size()
    if "--serial" in argv:
        if n != 1:
            raise SystemExit("calibrate_comm --serial runs on one rank")
        torch.set_num_threads(1)
        p0 = compute_probe(torch)
        serial = serial_steps(torch, mpipar, 3 if quick else 5)
        probe = (p0 + compute_probe(torch)) / 2
        with open(out, "w") as f:
            json.dump({"serial_s": serial, "probe_s": probe}, f)
        return 0
    mesh = mpipar.Mesh(dp=n)
    rss = world.allreduce(_trained_rss(torch, mesh, rss_bytes), op=MPI.MAX)
    torch.set_num_threads(1)
    world.Barrier()
    probe = world.allreduce(compute_probe(torch), op=MPI.SUM) / n   # every rank busy at once
    sizes = [256, 4096, 65536, 1 << 20] if quick else [256, 2048, 16384, 131072, 1 << 20, 4 << 20]
    results: dict = {}
    points: dict = {}
    groups = [(mesh.dp, str(n))]
    if n >= 4 and n % 2 == 0:
        groups.append((mpipar.Mesh(tp=2, dp=n // 2).tp, f"2@{n}"))   # pairs, every rank busy
    for (g, key), op in ((gk, op) for gk in groups
                         for op in ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "send_recv")):
        _measure(C, torch, g, key, op, sizes, world, results, points)
    train_s = {f"{name}@{n}": _train_probe(torch, mpipar, world, sizes, 3 if quick else 6)
               for name, sizes in probe_layouts(n).items()}
    world.Barrier()   # every rank its own serial model at once: how the host slows a model's overhead and work
    mine = serial_steps(torch, mpipar, 3 if quick else 5, comm=MPI.COMM_SELF)
    busy = {k: world.allreduce(v, op=MPI.SUM) / n for k, v in sorted(mine.items())}
    if world.rank == 0:
        with open(out, "w") as f:
            json.dump({"collectives": results, "collective_points": points, "rss_bytes": rss,
                       "probe_s": probe, "train_s": train_s, "busy_serial_s": busy}, f)
    return 0


def _measure(C, torch, g, key, op, sizes, world, results, points) -> None:
    """Time `op` on group g (every rank of the world runs its own group at once) and fit it under `key`."""
    n = g.size
    times = []
    for nbytes in sizes:
        numel = max(n, nbytes // 4 // n * n)
        reps = 20 if nbytes <= 65536 else 5
        if op == "all_reduce":
            t = torch.ones(numel)
            fn = lambda t=t: C.all_reduce(t, g)  # noqa: E731
        elif op == "all_gather":
            t = torch.ones(numel // n)
            fn = lambda t=t: C.all_gather(t, g)  # noqa: E731
        elif op == "reduce_scatter":
            t = torch.ones(numel)
            fn = lambda t=t: C.reduce_scatter(t, g)  # noqa: E731
        elif op == "all_to_all":
            t = torch.ones(numel)
            fn = lambda t=t: C.all_to_all(t, g, 0, 0)  # noqa: E731
        else:
            t, buf = torch.ones(numel), torch.empty(numel)
            right, left = (g.rank + 1) % n, (g.rank - 1) % n

            def fn(t=t, buf=buf, right=right, left=left):
                r = C.irecv(buf, left, g)
                C.send(t, right, g)
                r.wait()
        times.append(_time(fn, world, reps))
    results.setdefault(op, {})[key] = _fit([max(n, s // 4 // n * n) * 4 for s in sizes], times)
    points.setdefault(op, {})[key] = [[s, t] for s, t in zip(sizes, times)]


if __name__ == "__main__":
    sys.exit(main())
