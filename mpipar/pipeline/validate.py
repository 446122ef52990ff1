"""Check pipeline action lists before anything runs: completeness, order, pairing, deadlock.

`validate(actions_by_stage, num_microbatches, num_chunks)` raises MpiparError
with a readable report when the lists cannot run: a missing or duplicated
action, a B before its F, a W without its B, a send without its receive, or a
set of stages each waiting for another (a deadlock). The same dependency rules
drive the simulator (`simulate.py`) and the runner's message plan (`messages`).
"""
from __future__ import annotations

from collections import Counter

from ..errors import MpiparError
from .schedules import Action, stage_of, virtual_stage

ACT, GRAD = 0, 1  # message directions: activation forward, gradient backward


def dependencies(action: Action, stage: int, p: int, v: int) -> list[tuple[int, Action]]:
    """(stage, action) pairs that must finish before `action` can start on `stage`."""
    k = virtual_stage(stage, action.chunk, p)
    i = action.microbatch
    if action.op == "F":
        if k == 0:
            return []
        s, c = stage_of(k - 1, p)
        return [(s, Action("F", i, c))]
    if action.op == "B":
        deps = [(stage, Action("F", i, action.chunk))]
        if k < p * v - 1:
            s, c = stage_of(k + 1, p)
            deps.append((s, Action("B", i, c)))
        return deps
    return [(stage, Action("B", i, action.chunk))]


def messages(actions: list[Action], stage: int, p: int, v: int):
    """The point-to-point traffic of one stage's list, in list order.

    Yields (kind, action, peer, direction, key): kind "recv" before the action
    that needs the data, "send" after the action that produces it; key =
    (direction, microbatch, receiving virtual stage) names the message uniquely.
    Messages between chunks of the same stage (p == 1) are included with
    peer == stage; the runner passes those locally.
    """
    last = p * v - 1
    for a in actions:
        k = virtual_stage(stage, a.chunk, p)
        if a.op == "F":
            if k > 0:
                yield "recv", a, stage_of(k - 1, p)[0], ACT, (ACT, a.microbatch, k)
            if k < last:
                yield "send", a, stage_of(k + 1, p)[0], ACT, (ACT, a.microbatch, k + 1)
        elif a.op == "B":
            if k < last:
                yield "recv", a, stage_of(k + 1, p)[0], GRAD, (GRAD, a.microbatch, k)
            if k > 0:
                yield "send", a, stage_of(k - 1, p)[0], GRAD, (GRAD, a.microbatch, k - 1)


def _check_complete(actions: list[Action], stage: int, m: int, v: int) -> None:
    counts = Counter((a.op, a.microbatch, a.chunk) for a in actions)
    for (op, i, c), n in counts.items():
        if not (0 <= i < m and 0 <= c < v):
            raise MpiparError(f"stage {stage}: {Action(op, i, c)!r} is outside {m} microbatches x {v} chunks")
        if n > 1:
            raise MpiparError(f"stage {stage}: {Action(op, i, c)!r} appears {n} times")
    for i in range(m):
        for c in range(v):
            for op in ("F", "B"):
                if (op, i, c) not in counts:
                    raise MpiparError(f"stage {stage}: missing {Action(op, i, c)!r}")


def _check_local_order(actions: list[Action], stage: int, p: int, v: int) -> None:
    keys = [(a.op, a.microbatch, a.chunk) for a in actions]
    position = {key: n for n, key in enumerate(keys)}
    for n, (op, i, c) in enumerate(keys):
        for ds, dop, di, dc in raw_deps(op, i, c, stage, p, v):
            if ds == stage and position.get((dop, di, dc), -1) > n:
                raise MpiparError(f"stage {stage}: {actions[n]!r} at position {n} comes before "
                                  f"{Action(dop, di, dc)!r} at position {position[(dop, di, dc)]}")


def _check_pairing(actions_by_stage, p: int, v: int) -> None:
    sends, recvs = Counter(), Counter()
    for s, actions in enumerate(actions_by_stage):
        for kind, _, peer, _, key in messages(actions, s, p, v):
            if kind == "send":
                sends[(s, peer, key)] += 1
            else:
                recvs[(peer, s, key)] += 1
    for key in set(sends) | set(recvs):
        if sends[key] != recvs[key]:
            src, dst, (d, i, k) = key
            what = "activation" if d == ACT else "gradient"
            raise MpiparError(f"unpaired {what} of microbatch {i} for virtual stage {k}: "
                              f"{sends[key]} send(s) on stage {src}, {recvs[key]} recv(s) on stage {dst}")


def raw_deps(op: str, i: int, c: int, stage: int, p: int, v: int) -> list[tuple]:
    """`dependencies` on plain tuples (stage, op, microbatch, chunk): the hot path."""
    k = c * p + stage
    if op == "F":
        return [] if k == 0 else [((k - 1) % p, "F", i, (k - 1) // p)]
    if op == "B":
        if k < p * v - 1:
            return [(stage, "F", i, c), ((k + 1) % p, "B", i, (k + 1) // p)]
        return [(stage, "F", i, c)]
    return [(stage, "B", i, c)]


def execute(actions_by_stage, p: int, v: int, on_action=None) -> None:
    """Run the lists in dependency order, each stage strictly in its own order.

    `on_action(stage, action, deps)` is called for each action once all its
    dependencies have run; deps are (stage, op, microbatch, chunk) tuples.
    Raises MpiparError with a deadlock report when no stage can proceed.
    """
    done: set[tuple] = set()
    pos = [0] * p
    lists = [[(a.op, a.microbatch, a.chunk) for a in acts] for acts in actions_by_stage]
    remaining = sum(len(a) for a in lists)
    sweeps = (list(range(p)), list(reversed(range(p))))  # forward passes flow down, backward up
    n = 0
    while remaining:
        progressed = False
        n += 1
        for s in sweeps[n % 2]:
            acts = lists[s]
            while pos[s] < len(acts):
                op, i, c = acts[pos[s]]
                deps = raw_deps(op, i, c, s, p, v)
                if not all(d in done for d in deps):
                    break
                if on_action is not None:
                    on_action(s, actions_by_stage[s][pos[s]], deps)
                done.add((s, op, i, c))
                pos[s] += 1
                remaining -= 1
                progressed = True
        if not progressed:
            raise MpiparError(_deadlock_report(actions_by_stage, pos, done, p, v))


def _deadlock_report(actions_by_stage, pos, done, p, v) -> str:
    lines = ["pipeline schedule deadlocks:"]
    for s, actions in enumerate(actions_by_stage):
        if pos[s] >= len(actions):
            continue
        a = actions[pos[s]]
        missing = [f"{d} on stage {ds}" for ds, d in dependencies(a, s, p, v)
                   if (ds, d.op, d.microbatch, d.chunk) not in done]
        lines.append(f"  stage {s} blocked at {a} (position {pos[s]}) waiting for {', '.join(missing)}")
    return "\n".join(lines)


def check_structure(actions_by_stage, num_microbatches: int, num_chunks: int = 1) -> None:
    """Every check of `validate` except the deadlock search (which `execute` does)."""
    p = len(actions_by_stage)
    if p < 1:
        raise MpiparError("validate: need at least one stage")
    for s, actions in enumerate(actions_by_stage):
        for a in actions:
            if not isinstance(a, Action):
                raise MpiparError(f"stage {s}: {a!r} is not an Action")
        _check_complete(actions, s, num_microbatches, num_chunks)
        _check_local_order(actions, s, p, num_chunks)
    _check_pairing(actions_by_stage, p, num_chunks)


def validate(actions_by_stage, num_microbatches: int, num_chunks: int = 1) -> None:
    """Raise MpiparError unless every stage's list is complete, ordered, paired and deadlock-free."""
    check_structure(actions_by_stage, num_microbatches, num_chunks)
    execute(actions_by_stage, len(actions_by_stage), num_chunks)
