"""The pipeline on a host whose ranks share its cores: compute slows while more ranks compute.

On accelerators every stage computes at its own speed; on a CPU host with
fewer cores than ranks a stage's compute runs slower the more stages compute
at the same moment, and how many do changes through a pipeline step (one
stage at the start and end, all of them in the steady state). The host's
slowdown is convex in the busy ranks (calibrate's `contention`; docs/plan.md
has this host's figures), so charging the slowdown of the mean busy count under-predicts
a pipeline. Here the action lists run as events: each stage's action first
computes (its work advancing at 1 / slowdown(ranks computing now)), then
waits its tensor- and sequence-parallel communication (not computing); an
action starts when its stage is free and its dependency has arrived (+ the
p2p time across stages), as in mpipar.plan.pipeline.makespan, to which it is
equal when the slowdown is 1.

Waiting ranks are not free either: a polite wait wakes to check its request,
and each wake is a context switch that evicts the cache of the rank it
displaces. `idle_share` (calibrated: mpipar.plan.calibrate fits it to a
4-stage pipeline's step) counts each waiting rank as that fraction of a
computing one while its wait is young: the first `young` seconds, in which
its sleeps are short and its wakes many (mpipar.comm.wait's polite backoff
grows a sleep with the time waited until it reaches its longest). Past that
it wakes rarely and costs nothing here. Charged for the whole wait
instead, the share fitted at one micro-batch size over-charged larger ones
(docs/plan.md).
"""
from __future__ import annotations

from .pipeline import action_lists

LIMIT = 20_000  # actions; beyond, estimate falls back to the mean busy count (searches of large worlds)


def makespan_shared(schedule: str, p: int, m: int, v: int, work, wait, share, comm: float, slowdown,
                    ranks_per_stage: int, idle_share: float = 0.0, young: float = float("inf"),
                    work_share=None):
    """(makespan, compute seconds, communication seconds of each stage) of `schedule` on a shared host.

    work[s], wait[s]: (F, B with W, B alone, W) compute seconds at full speed and communication
    seconds of one action of stage s; share[s]: its tensor- and sequence-parallel peers' waiting
    while all other ranks compute (the host's sync_share), charged for the fraction of the other
    stages computing when the action starts; slowdown(n): compute slowdown with n ranks computing;
    idle_share: how much of a computing rank a rank waiting (for its stage's input, or for its
    tensor- or sequence-parallel peers) costs the host during the first `young` seconds of
    each wait (infinite: the whole wait); work_share[s]: the device-work fraction of stage s's compute
    (slowdown(n, work_share[s]): the host slows per-op overhead and device work differently)."""
    order, n, _ = action_lists(schedule, p, m, v)
    rows = [[] for _ in range(p)]
    for s, i, dep, kind, cross in order:
        rows[s].append((i, dep, kind, cross))
    done = [None] * n
    ptr = [0] * p
    phase = [0] * p              # 0 idle, 1 computing, 2 waiting for its communication
    left = [0.0] * p             # work (phase 1, seconds at full speed) or time (phase 2) left
    pending = [0.0] * p          # the communication time of the action in hand
    waited = [0.0] * p           # communication seconds per stage
    elapsed = [0.0] * p          # compute seconds spent per stage (slowed)
    since = [0.0] * p            # when the stage's current wait began
    t, remaining = 0.0, n
    while remaining:
        nxt = float("inf")
        for s in range(p):       # start what can start now
            if phase[s] or ptr[s] >= len(rows[s]):
                continue
            i, dep, kind, cross = rows[s][ptr[s]]
            ready = 0.0 if dep < 0 else (None if done[dep] is None else done[dep] + (comm if cross else 0.0))
            if ready is None:
                continue
            if ready <= t + 1e-15:
                others = sum(1 for o in range(p) if o != s and phase[o] == 1)
                pending[s] = (wait[s][kind] + share[s][kind] * others / max(p - 1, 1)) / v
                waited[s] += pending[s]
                phase[s], left[s] = 1, work[s][kind] / v
                if left[s] <= 0.0:
                    phase[s], left[s], since[s] = 2, pending[s], t
            else:
                nxt = min(nxt, ready)
        busy = sum(1 for s in range(p) if phase[s] == 1)
        fresh = sum(1 for s in range(p) if phase[s] != 1 and t < since[s] + young)
        crowd = (busy + idle_share * fresh) * ranks_per_stage
        rates = [(1.0 / (slowdown(crowd) if work_share is None else slowdown(crowd, work_share[s]))
                  if phase[s] == 1 else 1.0) for s in range(p)]
        for s in range(p):
            if phase[s] == 1:
                nxt = min(nxt, t + left[s] / rates[s])
            else:
                if t < since[s] + young:
                    nxt = min(nxt, since[s] + young)
                if phase[s] == 2:
                    nxt = min(nxt, t + left[s])
        dt = nxt - t
        for s in range(p):
            if phase[s] == 1:   # the stage that sets nxt finishes exactly (no float residue)
                left[s] = 0.0 if t + left[s] / rates[s] <= nxt else left[s] - dt * rates[s]
                elapsed[s] += dt
                if left[s] <= 1e-15:
                    phase[s], left[s], since[s] = 2, pending[s], nxt
            elif phase[s] == 2:
                left[s] = 0.0 if t + left[s] <= nxt else left[s] - dt
            if phase[s] == 2 and left[s] <= 1e-15:
                done[rows[s][ptr[s]][0]] = nxt
                phase[s] = 0
                ptr[s] += 1
                remaining -= 1
        t = nxt
    return t, elapsed, waited
