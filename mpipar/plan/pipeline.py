"""Pipeline makespan over the real action lists of every schedule, fast, cached and scaled.

`pipeline_time(schedule, p, m, v, f, b, w, comm)` with per-stage f, b, w
(seconds per microbatch through the whole stage) returns the makespan, the
makespan with free p2p, and every stage's peak microbatches in flight.

The action lists are mpipar's own (pipeline.schedules.all_stages) and the
timing rules are those of pipeline.simulate.simulate_actions (each stage runs
its list in order; an action starts when the stage is free and its
dependencies are done, plus `comm` across stages; a B without a W also does
the weight gradient). `makespan` evaluates them in one pass over an
order that runs each dependency first (found once per schedule and sizes:
it depends on no cost), so a 64-stage, 512-microbatch pipeline takes a
fraction of a second; naive and GPipe with one chunk have exact closed forms.
Tests check all of it against the simulator.

Results are cached per (schedule, p, m, v) and the stage costs divided by
their largest value, rounded to 1/512: times scale linearly, so one run
serves every layout with the same cost ratios. Long pipelines are evaluated
at m0 and m0 + p microbatches and extended by that steady-state growth.
"""
from __future__ import annotations

from ..errors import MpiparError
from ..pipeline.schedules import all_stages
from ..pipeline.simulate import _peak_inflight

_CACHE: dict = {}
_LISTS: dict = {}
_QUANT = 512.0
_OPS = {"F": 0, "B": 1, "W": 2}


def action_lists(schedule: str, p: int, m: int, v: int):
    """(order, n, peaks): every action as (stage, index, dependency index or -1, cost kind, crosses stages),
    in an order that runs each dependency first (found once, event by event: it depends on no cost)."""
    key = (schedule, p, m, v)
    hit = _LISTS.get(key)
    if hit is not None:
        return hit
    if len(_LISTS) > 4096:
        _LISTS.clear()
    acts = all_stages(schedule, p, m, v)
    with_w = [{(a.microbatch, a.chunk) for a in row if a.op == "W"} for row in acts]
    peaks = tuple(_peak_inflight(row, marks, v) for row, marks in zip(acts, with_w))
    last = p * v - 1
    index: dict = {}
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
            key_a = (_OPS[a.op], mb, k)
            index[key_a] = len(index)
            # a dependency on this stage's own chunk (p == 1) costs no p2p
            out.append((key_a, dep, kind, dep is not None and dep[2] % p != s))
        rows.append(out)
    order = []
    done, waiting, ptr, todo = set(), {}, [0] * p, list(range(p))
    while todo:
        s = todo.pop()
        row, i = rows[s], ptr[s]
        while i < len(row):
            key_a, dep, kind, cross = row[i]
            if dep is not None and dep not in done:
                waiting.setdefault(dep, []).append(s)
                break
            order.append((s, index[key_a], -1 if dep is None else index[dep], kind, cross))
            done.add(key_a)
            todo.extend(waiting.pop(key_a, ()))
            i += 1
        ptr[s] = i
    if len(order) != len(index):
        raise MpiparError(f"pipeline: schedule {schedule!r} (p={p}, m={m}, v={v}) deadlocks")
    hit = _LISTS[key] = (order, len(index), peaks)
    return hit


def makespan(schedule: str, p: int, m: int, v: int, f, b, w, comm: float) -> float:
    """The simulator's makespan of `schedule` with per-stage costs f, b, w and p2p time comm."""
    order, n, _ = action_lists(schedule, p, m, v)
    costs = [(f[s] / v, b[s] / v, (b[s] + w[s]) / v, w[s] / v) for s in range(p)]
    free = [0.0] * p
    done = [0.0] * n
    for s, i, dep, kind, cross in order:
        start = free[s]
        if dep >= 0:
            t = done[dep] + comm if cross else done[dep]
            if t > start:
                start = t
        free[s] = done[i] = start + costs[s][kind]
    return max(free)


def closed_form(schedule: str, p: int, m: int, f, b, w, comm: float) -> float | None:
    """Exact makespans of naive and GPipe with one chunk (identical microbatches through a flow shop)."""
    bw = [x + y for x, y in zip(b, w)]
    if schedule == "naive":
        return m * (sum(f) + sum(bw) + 2 * (p - 1) * comm)
    if schedule == "gpipe":
        return sum(f) + (m - 1) * max(f) + sum(bw) + (m - 1) * max(bw) + 2 * (p - 1) * comm
    return None


def _steady_m0(schedule: str, p: int, m: int) -> int:
    """Microbatches to evaluate before extrapolating (m itself when small)."""
    if schedule in ("naive", "gpipe") or m <= 3 * p or p * m <= 1024:
        return m
    return 2 * p if schedule == "interleaved-1f1b" else p


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

    if v == 1 and schedule in ("naive", "gpipe"):
        peaks = tuple(1.0 if schedule == "naive" else float(m) for _ in range(p))
        return closed_form(schedule, p, m, f, b, w, comm), closed_form(schedule, p, m, f, b, w, 0.0), peaks
    fq, bq, wq = q(f), q(b), q(w)
    cq = round(comm / scale * _QUANT) / _QUANT
    m0 = _steady_m0(schedule, p, m)
    span = _cached(schedule, p, m0, v, fq, bq, wq, cq)
    span0 = _cached(schedule, p, m0, v, fq, bq, wq, 0.0)
    peaks = action_lists(schedule, p, m0, v)[2]
    if m0 != m:
        span += (_cached(schedule, p, m0 + p, v, fq, bq, wq, cq) - span) * (m - m0) / p
        span0 += (_cached(schedule, p, m0 + p, v, fq, bq, wq, 0.0) - span0) * (m - m0) / p
    return span * scale, span0 * scale, peaks
