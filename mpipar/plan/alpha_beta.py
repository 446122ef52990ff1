"""Alpha-beta cost models of ring collectives, nccl-tests bus factors, and a fit.

With N ranks and a full tensor of `nbytes` bytes (alpha: latency per step in
seconds, beta: seconds per byte):
  all_reduce      2(N-1) alpha + 2(N-1)/N * nbytes * beta
  all_gather      (N-1) alpha + (N-1)/N * nbytes * beta
  reduce_scatter  (N-1) alpha + (N-1)/N * nbytes * beta
  all_to_all      (N-1) alpha + (N-1)/N * nbytes * beta   (pairwise exchange of one rank's buffer)
  send_recv       alpha + nbytes * beta                    (one message; N is ignored)
A ring all-reduce moves 2(N-1)/N x size per rank, not 2(N-1) x size.
"""
from __future__ import annotations

import numpy as np

from ..errors import MpiparError

_STEPS = {"all_reduce": 2.0, "all_gather": 1.0, "reduce_scatter": 1.0, "all_to_all": 1.0}


def bus_factor(op: str, group_size: int) -> float:
    """nccl-tests' busbw = algbw * factor (broadcast, all_to_all: 1 and (N-1)/N)."""
    n = group_size
    if op == "all_reduce":
        return 2.0 * (n - 1) / n
    if op in ("all_gather", "reduce_scatter", "all_to_all"):
        return (n - 1) / n
    if op in ("broadcast", "send_recv"):
        return 1.0
    raise MpiparError(f"bus_factor: unknown op {op!r}")


def cost(op: str, nbytes: float, group_size: int, alpha: float, beta: float) -> float:
    """Alpha-beta model time (seconds) of the ring algorithm for `op`."""
    if op == "send_recv":
        return alpha + nbytes * beta
    if op not in _STEPS:
        raise MpiparError(f"cost: unknown op {op!r}; expected one of {sorted(_STEPS)}")
    if group_size < 1:
        raise MpiparError(f"cost: group_size must be >= 1, got {group_size}")
    n, k = group_size, _STEPS[op]
    return k * (n - 1) * alpha + k * (n - 1) / n * nbytes * beta


def fit_alpha_beta(op: str, nbytes, group_size: int, times) -> tuple[float, float]:
    """Least-squares (alpha, beta) from measured (nbytes, time) points of one group size.

    Minimises relative error (rows weighted by 1/time): timing noise is relative, and
    unweighted, the largest messages would swamp alpha (even make it negative)."""
    if op not in _STEPS:
        raise MpiparError(f"fit_alpha_beta: unknown op {op!r}; expected one of {sorted(_STEPS)}")
    if group_size < 2:
        raise MpiparError("fit_alpha_beta needs group_size >= 2 (a single rank moves nothing)")
    x = np.asarray(nbytes, dtype=float)
    t = np.asarray(times, dtype=float)
    if x.size < 2 or x.size != t.size:
        raise MpiparError("fit_alpha_beta needs at least two (nbytes, time) points of equal count")
    n, k = group_size, _STEPS[op]
    design = np.stack([np.full_like(x, k * (n - 1)), k * (n - 1) / n * x], axis=1)
    w = 1.0 / np.where(t > 0, t, 1.0)
    (alpha, beta), *_ = np.linalg.lstsq(design * w[:, None], t * w, rcond=None)
    return float(alpha), float(beta)
