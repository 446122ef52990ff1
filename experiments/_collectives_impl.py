"""The measured side of experiments/collectives.py: inputs, expected outputs, implementations, timing.

Each implementation turns a point (op, impl, nbytes, dtype, iters, warmup)
into an input tensor and a `run()` returning the output: mpipar's
collectives ("mpi", "ring", "auto", "shm"; "auto_sym" = auto on a symmetric
tensor; "auto_pooled" = auto on a plain tensor in the group that has a symmetric pool, as a
training job's group has once a staged call or a symmetric bucket made one; "hier" = the
hierarchical all-reduce on fake nodes; "sym_inplace" = an
in-place all-gather into a symmetric output), raw mpi4py on numpy views
("mpi4py"; "mpi4py_inplace": MPI_IN_PLACE all-gather), torch.distributed over gloo ("gloo"), a local copy
("memcpy") and an in-place pass np.add(buf, 0, out=buf) over plain ("inplace") or
symmetric ("inplace_sym") memory. `measure_size` checks
each implementation once against the exact expected output, then times them side by side
in interleaved rounds: back-to-back calls ("loop" mode) or single calls, each started
together after a barrier ("single" mode).
"""
from __future__ import annotations

import os
import time

import numpy as np
import torch
from mpi4py import MPI

from mpipar import comm as C

ALGO_OPS = ("all_reduce", "all_gather", "reduce_scatter")
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
          "float16": torch.float16, "int32": torch.int32, "int64": torch.int64}


OPS = ("all_reduce", "all_gather", "reduce_scatter", "broadcast", "all_to_all")
IMPLS = ("mpi", "ring", "auto", "shm", "auto_sym", "auto_pooled", "sym_inplace",
         "hier", "mpi4py", "mpi4py_inplace", "gloo",
         "memcpy", "inplace", "inplace_sym")
MODES = ("loop", "single")
PASSES = ("memcpy", "inplace", "inplace_sym")  # one-rank memory passes (every rank at once): busbw = their rate


def element_count(op: str, size: int, itemsize: int, n: int) -> int:
    """Elements of the full tensor: a multiple of n where the op splits it over the ranks."""
    count = size // itemsize
    return count - count % n if op in ("all_gather", "reduce_scatter", "all_to_all") else count


# ---- inputs and the exact expected outputs ---------------------------------------------------

def _pattern(count: int, offset: int = 0) -> torch.Tensor:
    return (torch.arange(offset, offset + count, dtype=torch.int32) % 4) + 1


def check_case(op: str, r: int, n: int, count: int, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(this rank's input, the expected output): small integers.

    Exact in every dtype while sums stay <= 256 (bf16's integer range: up to
    10 ranks), so any difference is an error, whatever the summation order.
    """
    chunk, total = count // n, n * (n + 1) // 2
    if op == "all_reduce":
        inp, exp = (r + 1) * _pattern(count), total * _pattern(count)
    elif op == "all_gather":
        inp = (r + 1) * _pattern(chunk, r * chunk)
        exp = torch.cat([(j + 1) * _pattern(chunk, j * chunk) for j in range(n)])
    elif op == "reduce_scatter":
        inp, exp = (r + 1) * _pattern(count), total * _pattern(chunk, r * chunk)
    elif op == "broadcast":
        inp, exp = _pattern(count) * int(r == 0), _pattern(count)
    elif op == "all_to_all":
        inp = torch.cat([_pattern(chunk) + (r * n + j) % 5 for j in range(n)])
        exp = torch.cat([_pattern(chunk) + (j * n + r) % 5 for j in range(n)])
    else:  # memcpy
        inp = exp = _pattern(count)
    return inp.to(dtype), exp.to(dtype)


# ---- the implementations: each returns (input tensor, run() -> output tensor) ----------------

def _np(t: torch.Tensor) -> np.ndarray:
    return (t.view(torch.int16) if t.dtype in (torch.bfloat16, torch.float16) else t).numpy()


def bench_mpipar(op, algo, g, inp):
    kw = {"algorithm": algo} if op in ALGO_OPS else {}
    calls = {"all_reduce": lambda: C.all_reduce(inp, g, **kw),
             "all_gather": lambda: C.all_gather(inp, g, **kw),
             "reduce_scatter": lambda: C.reduce_scatter(inp, g, **kw),
             "broadcast": lambda: C.broadcast(inp, g, 0),
             "all_to_all": lambda: C.all_to_all(inp, g, 0, 0)}
    return calls[op]


def bench_mpi4py(op, comm, inp, count, n):
    a = _np(inp)
    if op == "all_reduce":
        return lambda: (comm.Allreduce(MPI.IN_PLACE, a), inp)[1]
    if op == "broadcast":
        return lambda: (comm.Bcast(a, root=0), inp)[1]
    out = torch.empty(count // n if op == "reduce_scatter" else count, dtype=inp.dtype)
    o = _np(out)
    fn = {"all_gather": comm.Allgather, "reduce_scatter": comm.Reduce_scatter_block, "all_to_all": comm.Alltoall}
    return lambda: (fn[op](a, o), out)[1]


def bench_gloo(op, inp, count, n):
    import torch.distributed as dist

    if op == "all_reduce":
        return lambda: (dist.all_reduce(inp), inp)[1]
    if op == "broadcast":
        return lambda: (dist.broadcast(inp, 0), inp)[1]
    out = torch.empty(count // n if op == "reduce_scatter" else count, dtype=inp.dtype)
    fn = {"all_gather": getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor,
          "reduce_scatter": getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor,
          "all_to_all": dist.all_to_all_single}[op]
    return lambda: (fn(out, inp), out)[1]


def hier_group(g):
    """g split into fake nodes of MPIPAR_FAKE_RANKS_PER_NODE ranks (default: two nodes), made
    once per g: the hierarchical all-reduce's inter-node path on one machine."""
    hg = getattr(g, "_bench_hier_group", None)
    if hg is None:
        from mpipar.mesh import Group

        saved = os.environ.get("MPIPAR_FAKE_RANKS_PER_NODE")
        os.environ["MPIPAR_FAKE_RANKS_PER_NODE"] = saved or str(max(1, g.size // 2))
        hg = g._bench_hier_group = Group(g.comm.Dup(), "hier")
        C.symmetric_empty((1,), torch.float32, hg)  # its pool reads the setting now
        if saved is None:
            del os.environ["MPIPAR_FAKE_RANKS_PER_NODE"]
    return hg


SYMMETRIC_IMPLS = ("auto_sym", "auto_pooled", "inplace_sym", "sym_inplace", "shm")


def symmetric_group(g):
    """A group over a Dup of g's communicator, made once per g, for the implementations that give
    it a symmetric pool (SYMMETRIC_IMPLS): a pool changes how "auto" moves plain tensors of the
    sizes where the zero-copy path applies (fast_plan._in_slots), and "auto" should be timed as
    a group of plain tensors runs it."""
    sg = getattr(g, "_bench_symmetric_group", None)
    if sg is None:
        from mpipar.mesh import Group

        sg = g._bench_symmetric_group = Group(g.comm.Dup(), g.name)
        C.symmetric_empty((1,), torch.float32, sg)  # its pool, whichever implementation runs first
    return sg


def build(point: dict, g, count: int, plain=None):
    """(input tensor, run) for one point; `plain` (a regular tensor of the right shape) is
    shared by the implementations that take one, so a size's impls fit in memory together."""
    op, impl, dtype, n = point["op"], point["impl"], DTYPES[point["dtype"]], g.size
    if impl in SYMMETRIC_IMPLS:
        g = symmetric_group(g)
    shape = (count // n,) if op == "all_gather" else (count,)
    if impl in ("auto_sym", "inplace_sym"):
        inp = C.symmetric_empty(shape, dtype, g)
    else:
        inp = plain if plain is not None else torch.empty(shape, dtype=dtype)
    if impl == "memcpy":
        out = torch.empty_like(inp)
        return inp, lambda: out.copy_(inp)
    if impl in ("inplace", "inplace_sym"):
        a = _np(inp)
        return inp, lambda: (np.add(a, 0, out=a), inp)[1]
    if impl == "hier":
        hg = hier_group(g)
        inp = C.symmetric_empty(shape, dtype, hg)
        return inp, lambda: C.all_reduce(inp, hg, algorithm="hier")
    if impl in ("sym_inplace", "mpi4py_inplace"):
        return in_place_all_gather(impl, g, count, dtype)
    if impl == "mpi4py":
        return inp, bench_mpi4py(op, g.comm, inp, count, n)
    if impl == "gloo":
        return inp, bench_gloo(op, inp, count, n)
    return inp, bench_mpipar(op, "auto" if impl in ("auto_sym", "auto_pooled") else impl, g, inp)


def in_place_all_gather(impl: str, g, count: int, dtype):
    """All-gather in place: the input is this rank's slice of the output. "sym_inplace":
    mpipar's all_gather(..., out=) into a symmetric output (in shared memory only the peers'
    pieces move); "mpi4py_inplace": MPI_Allgather(MPI_IN_PLACE, ...) on a plain output."""
    piece = count // g.size
    if impl == "sym_inplace":
        out = C.symmetric_empty((count,), dtype, g)
        inp = out[g.rank * piece:(g.rank + 1) * piece]
        return inp, lambda: C.all_gather(inp, g, out=out)
    out = torch.empty(count, dtype=dtype)
    o = _np(out)
    return out[g.rank * piece:(g.rank + 1) * piece], lambda: (g.comm.Allgather(MPI.IN_PLACE, o), out)[1]


BLOCK_SECONDS = 0.02  # a timed block lasts at least this long (within 50x --iters) ...
BLOCK_MAX_SECONDS = 0.1  # ... and at most about this long (down to one call)


def iterations(point: dict, seconds_per_call: float) -> int:
    """Timed calls per round: --iters, or more (up to 50x) so that a block lasts at least
    BLOCK_SECONDS: short hiccups of a shared machine then average out (a 4 KiB call takes
    ~5-10 us, a 1 MiB one ~150 us); or fewer, down to one, so that it lasts at most about
    BLOCK_MAX_SECONDS: a 256 MiB call takes 20-170 ms, and many short rounds give every
    implementation more chances at the machine's quiet phases than a few long ones."""
    iters, per_call = point["iters"], max(seconds_per_call, 1e-7)
    longer = max(iters, min(50 * iters, int(BLOCK_SECONDS / per_call) + 1))
    return min(longer, max(1, int(BLOCK_MAX_SECONDS / per_call)))


def prepare(point: dict, g, plain_for: dict, cases: dict):
    """Build one point's run() and check it once against the exact expected output.
    Returns (run, #wrong on this rank, calls per timed block); the input is zeroed afterwards
    (timing on zeros keeps in-place reductions finite). The warmup calls are timed to size
    the blocks (the slowest rank's estimate, so every rank makes the same number of calls).
    `plain_for` and `cases` share the plain input and the check case between a size's points."""
    op, dtype = point["op"], DTYPES[point["dtype"]]
    count = element_count(op, point["nbytes"], dtype.itemsize, g.size)
    shape = (count // g.size,) if op == "all_gather" else (count,)
    plain = plain_for.setdefault(shape, torch.empty(shape, dtype=dtype))
    inp, run = build(point, g, count, plain)
    checked = point["impl"] if point["impl"] in PASSES else op  # a memory pass checks as one
    key = (checked, count, dtype)
    if key not in cases:
        cases[key] = check_case(checked, g.rank, g.size, count, dtype)
    given, expected = cases[key]
    inp.copy_(given)
    wrong = int((run() != expected).sum())
    inp.zero_()
    g.comm.Barrier()
    start = time.perf_counter()
    for _ in range(max(1, point["warmup"])):
        run()
    per_call = g.comm.allreduce((time.perf_counter() - start) / max(1, point["warmup"]), op=MPI.MAX)
    return run, wrong, iterations(point, per_call)


def time_block(run, iters: int, g) -> np.ndarray:
    """Each rank's mean seconds per call over `iters` calls, started together."""
    g.comm.Barrier()
    start = time.perf_counter()
    for _ in range(iters):
        run()
    return np.array(g.comm.allgather((time.perf_counter() - start) / iters))


def time_single(run, calls: int, g) -> np.ndarray:
    """Each rank's median seconds of `calls` single calls, each started together after a
    barrier (a collective called once, the way training calls it after compute). The
    barrier waits politely where ranks outnumber cores (MPI's own Barrier busy-polls, and
    ranks that fight for the cores leave it staggered by scheduler slices)."""
    times = []
    for _ in range(calls):
        C.wait_all([g.comm.Ibarrier()])  # polite where ranks outnumber cores: busy ones get the cores
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return np.array(g.comm.allgather(float(np.median(times))))


def single_calls(point: dict, iters: int) -> int:
    """Single calls per round: --iters, fewer (down to one) where the loop sizing cut them
    to keep a block near BLOCK_MAX_SECONDS; a barrier per call, so never more."""
    return min(point["iters"], iters)


def measure_size(points: list[dict], g, rounds: int) -> list[dict]:
    """Time the implementations of one (op, size) side by side: `rounds` rounds, each timing
    every point in turn (round k starting with the k-th, so none always runs in the same
    position), so a slow phase of the machine hits all of them alike. The points of one
    implementation in both modes share its input and run(): loop mode times a block of
    back-to-back calls (time_block), single mode single calls after a barrier (time_single).
    time_s is the best round's mean over ranks (time_min_s/time_max_s: that round's ranks),
    time_median_s the median over rounds."""
    plain_for: dict = {}
    cases: dict = {}
    prepared: dict = {}
    for p in points:
        if p["impl"] not in prepared:
            prepared[p["impl"]] = prepare(p, g, plain_for, cases)
    runs = [prepared[p["impl"]] for p in points]
    plain_for.clear()
    cases.clear()
    blocks = [[] for _ in points]
    for k in range(rounds):
        for j in range(len(runs)):  # round k starts at point k: no one always goes first
            i = (j + k) % len(runs)
            run, _, iters = runs[i]
            if points[i].get("mode", "loop") == "single":
                blocks[i].append(time_single(run, single_calls(points[i], iters), g))
            else:
                blocks[i].append(time_block(run, iters, g))
    return [metrics(p, g, b, wrong, single_calls(p, iters) if p.get("mode") == "single" else iters)
            for p, b, (_, wrong, iters) in zip(points, blocks, runs)]


def metrics(point: dict, g, blocks: list, wrong: int, iters: int) -> dict:
    op, dtype = point["op"], DTYPES[point["dtype"]]
    count = element_count(op, point["nbytes"], dtype.itemsize, g.size)
    best = min(blocks, key=lambda b: b.mean())
    nbytes = count * dtype.itemsize
    algbw = nbytes / best.mean() / 1e9
    factor = 1.0 if point["impl"] in PASSES else C.bus_factor(op, g.size)
    return {"count": count, "bytes": nbytes, "time_s": float(best.mean()), "time_min_s": float(best.min()),
            "time_max_s": float(best.max()), "time_median_s": float(np.median([b.mean() for b in blocks])),
            "iters_per_round": iters, "algbw_GBps": algbw,
            "busbw_GBps": algbw * factor, "wrong": int(g.comm.allreduce(wrong))}
