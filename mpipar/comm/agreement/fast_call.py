"""One C call of a planned collective (fast.c's `run`), for mpipar.comm.agreement.fast_ops.

The plan of a call shape is looked up per group (made by fast_plan's builders when new, or
when the settings object changed) and the call made from the caller's memory into an output
the plan allocates. Where the call did not finish (run()'s status), the heads differed (the
MpiparError raised on every rank, collectively), or an all_gather's pieces differ in size
(`Exchanged`: inline_ops finishes it in Python). A call whose data rides in the payload slots
is taken by every rank, a rank whose tensor is not a contiguous CPU tensor from a copy
(`_plan_of`'s host tensor); every other call on such a tensor takes the Python path.
"""
from __future__ import annotations

import torch

from .. import outputs
from ..symmetric.pool import _ATTR as _POOL
from ...flight.recorder import described, done
from ...settings import current
from ..wait import polite_packed
from .inline import _disagreement
from .fast_plan import _Plan
from .protocol import validation_enabled

_DONE, _FINISH = 1, 2  # run()'s statuses (0: the heads differ)
_PLANS = 1024  # plans kept per group before the cache starts over (each holds a template)


def _planned(buf, k, make, *args) -> _Plan:
    """The plan of call shape `k` on this group (`make(settings, *args)` the first time, and
    again when the settings object changed)."""
    settings = current()
    if len(buf.plans) > _PLANS:
        buf.plans.clear()
    plan = buf.plans[k] = make(settings, *args) if validation_enabled() else _Plan(settings, None)
    return plan


def _finish(g, plan, v):
    """After a C call that did not finish (v: run()'s value, the record open): raise MpiparError on
    every rank when the heads differ (closing the record); else the open record's slot."""
    slot = (v >> 2) - 1
    if v & 3 == _FINISH:
        return slot
    try:
        _disagreement(g, plan.info)
    finally:
        described.info = plan.info  # the record keeps its description (done files described.info)
        done(slot)


def _plan_of(t: torch.Tensor, g, k: tuple, make, *args):
    """(buffers, plan, the tensor C reads and writes) of call shape `k` on group g (planned by
    `make` when new or when the settings object changed), or (None, None, None) where the C call
    does not apply: no C context, a tensor that is not a contiguous CPU tensor (unless the plan's
    data rides in the payload slots: every rank takes those calls, and C gets a contiguous CPU
    copy of `t`), an unhashable argument (the Python path raises), no kernel."""
    buf = g.__dict__.get("_inline_buffers")
    if buf is None or buf.run is None:
        return None, None, None
    plain = t.is_cpu and t.is_contiguous()
    if not plain and not buf.slot_bytes:
        return None, None, None
    k = (k, _POOL in g.__dict__)  # a symmetric pool changes what rides in the payload slots (fast_plan._in_slots)
    try:
        plan = buf.plans.get(k)
    except TypeError:
        return None, None, None
    if plan is None or plan.settings is not current():
        plan = _planned(buf, k, make, t, g, *args)
    if plan.key is None or not (plain or plan.slots):
        return None, None, None
    return buf, plan, t if plain else t.detach().cpu().contiguous()


def _into_new(buf, g, plan, algorithm, name: str, t: torch.Tensor, host: torch.Tensor) -> torch.Tensor:
    """`plan`'s call from `host` (`t`, or its contiguous CPU copy: _plan_of) into a new output like
    its template (MpiparError on every rank when the heads differ), on t's device."""
    out = plan.output()
    src = _source(plan, host)  # (held while C runs)
    v = _run(buf, g, plan, algorithm, name, src.data_ptr(), out.data_ptr())
    if v != _DONE:
        _finish(g, plan, v)
    return out if host is t or t.is_cpu else out.to(t.device)


def _source(plan, t: torch.Tensor) -> torch.Tensor:
    """What MPI reads: `t`, or (plan.permute) a copy with that dim first, as collectives.py sends
    it (ranks on either path must send the same bytes)."""
    return t if plan.permute is None else t.movedim(plan.permute, 0).contiguous()


def _scratch(buf, nbytes: int) -> torch.Tensor:
    """Memory for MPI's pieces during one call: the group's spare buffer up to outputs.MIN_BYTES
    (it never leaves the call, so one per group serves every call shape: a torch.empty costs
    several microseconds here), past that a recycled one (mpipar.comm.outputs)."""
    if nbytes > outputs.MIN_BYTES:
        return outputs.empty([nbytes], torch.uint8)
    if buf.spare is None or buf.spare.numel() < nbytes:
        buf.spare = torch.empty(max(nbytes, 64 << 10), dtype=torch.uint8)
    return buf.spare


def _run(buf, g, plan, algorithm, name: str, src: int, dst: int) -> int:
    """fast.c's run() of `plan` from address src into dst; its status (an MPI error: MpiparError)."""
    buf.last = None  # the C call writes this rank's head: inline's cached one is stale
    try:
        if plan.scratch:  # MPI's pieces land here, then C rearranges them into dst
            scratch = _scratch(buf, plan.scratch * plan.info.dtype.itemsize)
            return buf.run(g, plan.info, algorithm, name, src, dst, plan.key, polite_packed(), scratch.data_ptr())
        return buf.run(g, plan.info, algorithm, name, src, dst, plan.key, polite_packed())
    except RuntimeError as e:  # an MPI error code
        from ...errors import MpiparError

        raise MpiparError(f"{name}: {e}") from e


def _exchanged(buf, g, plan, v):
    """The Exchanged of an all_gather whose C call agreed but found pieces of other sizes (v: run()'s
    value), with the table's descriptors where the group has a one-node pool (this rank's are -1s:
    what inline.exchange_args sends for a plain tensor). MpiparError on every rank when the heads
    differ."""
    slot = _finish(g, plan, v)
    pool = g.__dict__.get(_POOL)
    return Exchanged(buf, buf.descriptors.copy() if pool is not None and pool.one_node else None, plan.info, slot)


class Exchanged:
    """all_gather's call that the C call agreed on and exchanged, but whose rows' sizes differ:
    the table for inline_ops.agree_all_gather to finish from, and the record to close."""

    __slots__ = ("buf", "entry", "info", "slot")

    def __init__(self, buf, entry, info, slot):
        self.buf, self.entry, self.info, self.slot = buf, entry, info, slot

    def close(self) -> None:
        described.info = self.info
        done(self.slot)
