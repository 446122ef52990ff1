"""Pipeline schedules as data: each stage's ordered list of compute actions.

Pure functions (no MPI, no torch). A schedule is, for one stage, the order in
which that stage runs forward ("F"), backward ("B") and, for schedules that
split the backward, weight-gradient ("W") work on (microbatch, chunk) pairs.
Communication is not listed: it follows from the actions (see `validate.messages`):
the F of virtual stage k sends its output to virtual stage k+1, the B of virtual
stage k sends the input gradient to virtual stage k-1. Chunk c on stage s is
virtual stage c*p + s (Megatron's order), so with v chunks there are p*v
virtual stages and the activations wrap from stage p-1 back to stage 0.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import MpiparError

OPS = ("F", "B", "W")


@dataclass(frozen=True)
class Action:
    """One unit of compute on one stage: op "F", "B" or "W" for (microbatch, chunk)."""

    op: str
    microbatch: int
    chunk: int = 0

    def __post_init__(self):
        if self.op not in OPS:
            raise MpiparError(f"Action op must be one of {OPS}, got {self.op!r}")

    def __str__(self) -> str:
        return f"{self.op}{self.microbatch}" + (f".{self.chunk}" if self.chunk else "")


def virtual_stage(stage: int, chunk: int, num_stages: int) -> int:
    """Virtual stage of chunk `chunk` on stage `stage`: chunk * p + stage."""
    return chunk * num_stages + stage


def stage_of(virtual: int, num_stages: int) -> tuple[int, int]:
    """(stage, chunk) holding virtual stage `virtual`."""
    return virtual % num_stages, virtual // num_stages


def _naive(p, m, s, v):
    """One microbatch at a time through every stage and back."""
    out = []
    for i in range(m):
        out += [Action("F", i, c) for c in range(v)]
        out += [Action("B", i, c) for c in reversed(range(v))]
    return out


def _gpipe(p, m, s, v):
    """All forwards, then all backwards (a flush at the end)."""
    fwd = [Action("F", i, c) for c in range(v) for i in range(m)]
    bwd = [Action("B", i, c) for c in reversed(range(v)) for i in range(m)]
    return fwd + bwd


def _one_f_one_b(p, m, s, v):
    """PipeDream-Flush: min(p-s-1, m) warm-up forwards, then 1F1B, then drain."""
    _only_one_chunk("1f1b", v)
    warm = min(p - s - 1, m)
    out = [Action("F", i) for i in range(warm)]
    for i in range(m - warm):
        out += [Action("F", warm + i), Action("B", i)]
    out += [Action("B", i) for i in range(m - warm, m)]
    return out


def _zb_h1(p, m, s, v):
    """Zero Bubble H1 (Qi et al. 2023): 1F1B with B split into B (input grad) and W.

    Stage s keeps 1F1B's p-s-1 warm-up forwards and defers its weight-gradient
    passes by s microbatches, so every stage holds at most p microbatches, the
    1F1B maximum (reached on stage 0). The B passes, now cheaper, run down the
    pipeline faster and the deferred W passes fill the drain bubble.
    """
    _only_one_chunk("zb-h1", v)
    warm = min(p - s - 1, m)
    out = [Action("F", i) for i in range(warm)]
    pending: list[int] = []
    for i in range(m - warm):
        out += [Action("F", warm + i), Action("B", i)]
        pending.append(i)
        if len(pending) > s:
            out.append(Action("W", pending.pop(0)))
    for i in range(m - warm, m):
        out.append(Action("B", i))
        pending.append(i)
        out.append(Action("W", pending.pop(0)))
    out += [Action("W", i) for i in pending]
    return out


def interleaved_order(p: int, m: int, v: int) -> list[tuple[int, int]]:
    """Megatron's (microbatch, chunk) forward order: groups of p microbatches, chunk by chunk.

    The last group holds the m % p leftover microbatches when m is not a multiple of p.
    """
    order = []
    for start in range(0, m, p):
        group = range(start, min(start + p, m))
        order += [(i, c) for c in range(v) for i in group]
    return order


def _interleaved(p, m, s, v):
    """Interleaved 1F1B (Narayanan et al. 2021): v model chunks per stage.

    Forwards run in `interleaved_order`, backwards in the same order with the
    chunks reversed; stage s warms up with 2*(p-s-1) + (v-1)*p chunk-forwards
    (Megatron-LM's count), then alternates one forward and one backward.
    With v == 1 this is exactly "1f1b".
    """
    if v == 1:
        return _one_f_one_b(p, m, s, v)
    order = interleaved_order(p, m, v)
    fwd = [Action("F", i, c) for i, c in order]
    bwd = [Action("B", i, v - 1 - c) for i, c in order]
    total = m * v
    warm = min(total, 2 * (p - s - 1) + (v - 1) * p)
    out = fwd[:warm]
    for i in range(total - warm):
        out += [fwd[warm + i], bwd[i]]
    return out + bwd[total - warm:]


def _only_one_chunk(name: str, v: int) -> None:
    if v != 1:
        raise MpiparError(f"schedule {name!r} runs one chunk per stage, got num_chunks={v} "
                          f"(use 'interleaved-1f1b' for several)")


SCHEDULES = {
    "naive": _naive,
    "gpipe": _gpipe,
    "1f1b": _one_f_one_b,
    "interleaved-1f1b": _interleaved,
    "zb-h1": _zb_h1,
}


def check_args(name: str, num_stages: int, num_microbatches: int, num_chunks: int = 1) -> None:
    """Raise MpiparError unless the schedule name and sizes make sense."""
    if name not in SCHEDULES:
        raise MpiparError(f"unknown pipeline schedule {name!r}; choose from {sorted(SCHEDULES)}")
    for label, value in (("num_stages", num_stages), ("num_microbatches", num_microbatches),
                         ("num_chunks", num_chunks)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise MpiparError(f"schedule: {label} must be a positive int, got {value!r}")
    if name in ("1f1b", "zb-h1"):
        _only_one_chunk(name, num_chunks)
    m, p = num_microbatches, num_stages
    if name == "interleaved-1f1b" and num_chunks > 1 and m > p and m % p:
        raise MpiparError(f"interleaved-1f1b with num_chunks={num_chunks} needs num_microbatches "
                          f"({m}) <= num_stages or divisible by num_stages ({p})")


def schedule(name: str, num_stages: int, num_microbatches: int, stage: int,
             num_chunks: int = 1) -> list[Action]:
    """The ordered actions of `stage` (0-based) under schedule `name`."""
    check_args(name, num_stages, num_microbatches, num_chunks)
    if not isinstance(stage, int) or not 0 <= stage < num_stages:
        raise MpiparError(f"schedule: stage must be in [0, {num_stages}), got {stage!r}")
    return SCHEDULES[name](num_stages, num_microbatches, stage, num_chunks)


def all_stages(name: str, num_stages: int, num_microbatches: int,
               num_chunks: int = 1) -> list[list[Action]]:
    """Every stage's action list, stage 0 first."""
    return [schedule(name, num_stages, num_microbatches, s, num_chunks) for s in range(num_stages)]


def splits_weight_grad(actions) -> bool:
    """True when the action list contains "W" actions (B then computes input gradients only)."""
    return any(a.op == "W" for a in actions)
