"""Argument checks for the sequence-parallel attention calls, agreed by every rank.

One small allgather carries each rank's local error (or None) and its call
signature (shapes, dtype, layout, flags). Every rank then runs the same checks
on the same table, so bad input raises the same MpiparError on every rank
before any attention traffic is posted: a job never hangs on bad input.
"""
from __future__ import annotations

import torch

from ..agree import agree_call  # noqa: F401  (re-exported: the sequence calls agree through it)
from .layout import LAYOUTS


def qkv_error(q, k, v, layout: str, grouped: bool = False) -> str | None:
    """Local check of q, k, v [B, H, local_seq, D]; a message, or None if fine.

    grouped=True allows fewer K/V heads than query heads (grouped-query attention) if they divide them.
    """
    for nm, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            return f"{nm} must be a torch.Tensor, got {type(t).__name__}"
        if t.dim() != 4:
            return f"{nm} must be [batch, heads, local_seq, head_dim], got shape {tuple(t.shape)}"
    if not q.is_floating_point():
        return f"q, k, v must be floating point, got {q.dtype}"
    if not (q.dtype == k.dtype == v.dtype):
        return f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}"
    if not (q.device == k.device == v.device):
        return f"q, k, v devices differ: {q.device}, {k.device}, {v.device}"
    if grouped and k.shape == v.shape and q.shape[:1] + q.shape[2:] == k.shape[:1] + k.shape[2:] \
            and k.shape[1] and q.shape[1] % k.shape[1] == 0:
        pass
    elif q.shape != k.shape or k.shape != v.shape:
        return (f"q, k, v must have equal shapes [batch, heads, local_seq, head_dim], got "
                f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if layout not in LAYOUTS:
        return f"layout must be one of {LAYOUTS}, got {layout!r}"
    if q.shape[2] == 0 or q.shape[3] == 0:
        return f"empty local sequence or head dim: shape {tuple(q.shape)}"
    if layout == "zigzag" and q.shape[2] % 2:
        return f"zigzag layout needs an even local_seq (2 equal chunks per rank), got {q.shape[2]}"
    return None


def signature(q, causal, layout, **extra) -> dict:
    """What must be equal on every rank for a sequence-parallel attention call."""
    sig = {"shape": tuple(q.shape) if isinstance(q, torch.Tensor) else None,
           "dtype": str(getattr(q, "dtype", None)), "causal": bool(causal), "layout": str(layout)}
    sig.update(extra)
    return sig
