"""Pipeline makespan over the real action lists of every schedule, fast, cached and scaled.

`pipeline_time(schedule, p, m, v, f, b, w, comm)` with per-stage f, b, w
(seconds per microbatch through the whole stage) returns the makespan, the
makespan with free p2p, and every stage's peak microbatches in flight.

The action lists are mpipar's own (pipeline.schedules.all_stages) and the
timing rules are those of pipeline.simulate.simulate_actions (each stage runs
its list in order; an action starts when the stage is free and its
dependencies are done, plus `comm` across stages; a B without a W also does
the weight gradient). `makespan` evaluates them event by event (each action
visited once, where simulate_actions re-scans), so a 64-stage, 512-microbatch
pipeline takes a fraction of a second; tests check both agree.

Results are cached per (schedule, p, m, v) and the stage costs divided by
their largest value, rounded to 1/1024: times scale linearly, so one run
serves every layout with the same cost ratios. Long pipelines are evaluated
at m0 and m0 + p microbatches and extended by that steady-state growth.
"""
from __future__ import annotations

from ..errors import MpiparError
from ..pipeline.schedules import all_stages
from ..pipeline.simulate import _peak_inflight

_CACHE: dict = {}
_LISTS: dict = {}
_QUANT = 1024.0
_OPS = {"F": 0, "B": 1, "W": 2}


def action_lists(schedule: str, p: int, m: int, v: int):
    """(compiled rows, peaks): per stage, tuples (key, dependency, cost kind, crosses stages)."""
    key = (schedule, p, m, v)
    if key not in _LISTS:
        if len(_LISTS) > 512:
            _LISTS.clear()
        acts = all_stages(schedule, p, m, v)
        with_w = [{(a.microbatch, a.chunk) for a in row if a.op == "W"} for row in acts]
        peaks = tuple(_peak_inflight(row, marks, v) for row, marks in zip(acts, with_w))
        last = p * v - 1
        rows = []
        for s, row in enumerate(acts):
            out = []
            for a in row:
                k, mb = a.chunk * p + s, a.microbatch
                if a.op == "F":
                    dep, kind = ((0, mb, k - 1) if k > 0 else None), 0
                elif a.op == "B":
                    dep, kind = ((1, mb, k + 1) if k < last else None), (1 if (mb, a.chunk) in with_w[s] else 2)
                else:
                    dep, kind = None, 3
                # a dependency on this stage's own chunk (p == 1) costs no p2p
                out.append(((_OPS[a.op], mb, k), dep, kind, dep is not None and dep[2] % p != s))
            rows.append(out)
        _LISTS[key] = (rows, peaks)
    return _LISTS[key]


def makespan(schedule: str, p: int, m: int, v: int, f, b, w, comm: float) -> float:
    """The simulator's makespan of `schedule` with per-stage costs f, b, w and p2p time comm."""
    rows, _ = action_lists(schedule, p, m, v)
    costs = [(f[s] / v, b[s] / v, (b[s] + w[s]) / v, w[s] / v) for s in range(p)]
    free = [0.0] * p
    done: dict = {}          # (op, microbatch, virtual stage) -> finish time
    waiting: dict = {}       # key -> stages blocked on it
    ptr = [0] * p
    todo = list(range(p))
    remaining = sum(len(r) for r in rows)
    while todo:
        s = todo.pop()
        row, i, n = rows[s], ptr[s], len(rows[s])
        cs, t_free = costs[s], free[s]
        while i < n:
            key, dep, kind, cross = row[i]
            start = t_free
            if dep is not None:
                t = done.get(dep)
                if t is None:
                    waiting.setdefault(dep, []).append(s)
                    break
                if cross:
                    t += comm
                if t > start:
                    start = t
            t_free = start + cs[kind]
            done[key] = t_free
            woken = waiting.pop(key, None)
            if woken:
                todo.extend(woken)
            i += 1
        remaining -= i - ptr[s]
        ptr[s], free[s] = i, t_free
    if remaining:
        raise MpiparError(f"pipeline: schedule {schedule!r} (p={p}, m={m}, v={v}) deadlocks")
    return max(free)


def _steady_m0(schedule: str, p: int, m: int) -> int:
    """Microbatches to evaluate before extrapolating (m itself when small)."""
    if schedule in ("naive", "gpipe") or m <= 4 * p or p * m <= 4096:
        return m
    return 2 * p


def _cached(schedule, p, m, v, f, b, w, comm):
    key = (schedule, p, m, v, f, b, w, comm)
    hit = _CACHE.get(key)
    if hit is None:
        if len(_CACHE) > 200_000:
            _CACHE.clear()
        hit = _CACHE[key] = makespan(schedule, p, m, v, f, b, w, comm)
    return hit


def pipeline_time(schedule: str, p: int, m: int, v: int, f, b, w, comm: float):
    """(makespan, makespan with comm=0, peak microbatches in flight per stage); times in seconds."""
    scale = max(max(x + y + z for x, y, z in zip(f, b, w)), 1e-30)

    def q(xs):
        return tuple(round(x / scale * _QUANT) / _QUANT for x in xs)

    fq, bq, wq = q(f), q(b), q(w)
    cq = round(comm / scale * _QUANT) / _QUANT
    m0 = _steady_m0(schedule, p, m)
    span = _cached(schedule, p, m0, v, fq, bq, wq, cq)
    span0 = _cached(schedule, p, m0, v, fq, bq, wq, 0.0)
    peaks = action_lists(schedule, p, m0, v)[1]
    if m0 != m:
        span += (_cached(schedule, p, m0 + p, v, fq, bq, wq, cq) - span) * (m - m0) / p
        span0 += (_cached(schedule, p, m0 + p, v, fq, bq, wq, 0.0) - span0) * (m - m0) / p
    return span * scale, span0 * scale, peaks
