"""Discrete-event simulation of pipeline action lists: makespan, bubble, memory, timeline.

Each stage runs its actions strictly in list order; an action starts when the
stage is free and every dependency has finished (plus `comm` when the
dependency ran on another stage). Costs are per microbatch through a whole
stage (all its chunks), so one chunk's F takes f / v. A B whose (microbatch,
chunk) has no W also does the weight-gradient work: it takes (b + w) / v.
f, b and w may also be sequences of one cost per stage (unequal stages).

`cores`: the processors the stages share, when there are fewer than stages
(4 ranks on 2 cores). While k > cores stages compute at once, each advances at
cores / k of its speed (processor sharing): f, b and w are then the work of an
action alone on a core (its CPU time), and an action's timeline entry is the
wall time it took, as a trace of such a run measures it. A waiting stage takes
no core.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import MpiparError
from .schedules import Action, all_stages, check_args
from .validate import raw_deps, check_structure, execute


@dataclass
class SimResult:
    """Outcome of `simulate`: times in the units of f, b, w and comm."""

    makespan: float
    bubble_fraction: float          # idle time / (num_stages * makespan)
    peak_inflight: list[float]      # per stage: most microbatches' activations held at once
    timeline: list[list[tuple[Action, float, float]]] = field(repr=False)
    busy: list[float] = field(default_factory=list, repr=False)  # per stage compute time


def simulate(name: str, num_stages: int, num_microbatches: int, num_chunks: int = 1,
             f: float = 1.0, b: float = 2.0, w: float = 0.0, comm: float = 0.0,
             cores: float | None = None) -> SimResult:
    """Simulate schedule `name` with per-microbatch stage costs f, b, w and p2p time comm
    (on `cores` shared processors; None: one each)."""
    check_args(name, num_stages, num_microbatches, num_chunks)
    actions = all_stages(name, num_stages, num_microbatches, num_chunks)
    return simulate_actions(actions, num_microbatches, num_chunks, f=f, b=b, w=w, comm=comm, cores=cores)


def simulate_actions(actions_by_stage, num_microbatches: int, num_chunks: int = 1,
                     f: float = 1.0, b: float = 2.0, w: float = 0.0, comm: float = 0.0,
                     cores: float | None = None) -> SimResult:
    """Simulate any valid action lists (one per stage); see `simulate`."""
    p, v = len(actions_by_stage), num_chunks
    f, b, w = (_per_stage(label, value, p) for label, value in (("f", f), ("b", b), ("w", w)))
    if comm < 0:
        raise MpiparError(f"simulate: comm must be >= 0, got {comm}")
    if cores is not None and not cores > 0:
        raise MpiparError(f"simulate: cores must be > 0 or None, got {cores}")
    check_structure(actions_by_stage, num_microbatches, num_chunks)
    has_w = [{(a.microbatch, a.chunk) for a in acts if a.op == "W"} for acts in actions_by_stage]
    free = [0.0] * p
    end: dict[tuple, float] = {}  # (stage, op, microbatch, chunk) -> finish time
    timeline: list[list] = [[] for _ in range(p)]

    def duration(s: int, a: Action) -> float:
        if a.op == "F":
            return f[s] / v
        if a.op == "W":
            return w[s] / v
        return (b[s] if (a.microbatch, a.chunk) in has_w[s] else b[s] + w[s]) / v

    def run(s: int, a: Action, deps) -> None:
        start = free[s]
        for d in deps:
            start = max(start, end[d] + (comm if d[0] != s else 0.0))
        finish = start + duration(s, a)
        end[(s, a.op, a.microbatch, a.chunk)] = free[s] = finish
        timeline[s].append((a, start, finish))

    execute(actions_by_stage, p, v, on_action=run)
    if cores is not None and cores < p:
        timeline = _shared(actions_by_stage, p, v, duration, comm, float(cores))
        free = [row[-1][2] if row else 0.0 for row in timeline]
    makespan = max(free) if p else 0.0
    busy = [sum(e - s0 for _, s0, e in row) for row in timeline]
    idle = p * makespan - sum(busy)
    bubble = idle / (p * makespan) if makespan > 0 else 0.0
    peaks = [_peak_inflight(acts, marks, v) for acts, marks in zip(actions_by_stage, has_w)]
    return SimResult(makespan, bubble, peaks, timeline, busy)


def _shared(actions_by_stage, p: int, v: int, duration, comm: float, cores: float) -> list[list]:
    """The timeline on `cores` processors shared by the running actions (processor sharing).

    Event by event: between two events (an action finishing, or becoming ready once
    its inputs have crossed), each of the k running actions does min(1, cores / k) of
    a core's work per second. The plain simulation above has already checked that
    the lists cannot deadlock."""
    rows = [list(acts) for acts in actions_by_stage]
    pos, free = [0] * p, [0.0] * p
    ready: list = [None] * p   # when the stage's next action may start; None: an input is missing
    left: list = [None] * p    # work left of the stage's running action; None: not running
    began = [0.0] * p
    end: dict[tuple, float] = {}
    timeline: list[list] = [[] for _ in range(p)]

    def arm(s: int) -> None:
        if left[s] is not None or pos[s] == len(rows[s]):
            ready[s] = None
            return
        a = rows[s][pos[s]]
        deps = raw_deps(a.op, a.microbatch, a.chunk, s, p, v)
        ready[s] = (max([free[s]] + [end[d] + (comm if d[0] != s else 0.0) for d in deps])
                    if all(d in end for d in deps) else None)

    now, remaining = 0.0, sum(map(len, rows))
    for s in range(p):
        arm(s)
    while remaining:
        for s in range(p):
            if ready[s] is not None and ready[s] <= now:
                left[s], began[s], ready[s] = duration(s, rows[s][pos[s]]), now, None
        running = [s for s in range(p) if left[s] is not None]
        rate = min(1.0, cores / len(running)) if running else 0.0
        finish = {s: now + left[s] / rate for s in running}
        t = min([*finish.values(), *(r for r in ready if r is not None)])
        for s in running:
            if finish[s] <= t:
                a = rows[s][pos[s]]
                end[(s, a.op, a.microbatch, a.chunk)] = free[s] = t
                timeline[s].append((a, began[s], t))
                pos[s], left[s], remaining = pos[s] + 1, None, remaining - 1
            else:
                left[s] = max(0.0, left[s] - rate * (t - now))
        now = t
        for s in range(p):
            arm(s)
    return timeline


def _per_stage(label: str, value, p: int) -> list[float]:
    """A cost given for all stages (a number) or per stage (a sequence of p numbers)."""
    values = [float(x) for x in value] if hasattr(value, "__len__") else [float(value)] * p
    if len(values) != p or any(x < 0 for x in values):
        raise MpiparError(f"simulate: {label} must be >= 0, one number or one per stage ({p}), got {value!r}")
    return values


def _peak_inflight(actions: list[Action], with_w: set, v: int) -> float:
    """Most microbatches holding activations at once on one stage (chunk activations / v).

    A (microbatch, chunk) holds its activations from the start of its F to the
    end of its W, or of its B when it has no W.
    """
    held = peak = 0
    for a in actions:
        if a.op == "F":
            held += 1
            peak = max(peak, held)
        elif a.op == "W" or (a.op == "B" and (a.microbatch, a.chunk) not in with_w):
            held -= 1
    return peak / v
