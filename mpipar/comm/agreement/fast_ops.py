"""Broadcast, all_gather, reduce_scatter and all_to_all in one C call (fast.c's `run`).

inline_ops.py finishes these calls in Python after the agreement's exchange: typed
views of the table, torch.cat, a reduction in rank order. Where ranks outnumber cores,
every rank waits for its peers' Python, so that Python cost several times raw MPI's
latency. Here the Python side looks up a plan made once per signature and group (the
C key: this call's head, its payload, the blocks of the table that make the result),
allocates the output, and makes one call that writes the head and payload, exchanges
the table (the same exchange as inline_ops: the same ShmTable count, or the same
MPI_Allgather, so ranks on either path meet), checks the heads, copies or reduces the
blocks into the output (the same bytes as inline_ops' torch calls: copies, and the
rank-order reduction of fast.c's all-reduce) and records itself.

Where the group's ranks outnumber cores on one node, a call too large for the table's row
but within tuning.SLOT_BYTES rides in the shared table's payload slots instead
(mpipar.comm.agreement.shm_table, `fast_plan._in_slots`): the same walk over the rows, read from
the slots, with no MPI collective after the exchange. An all_to_all from tuning.CMA_BYTES, where
every rank can read its peers' memory (mpipar.comm.agreement.cma), takes the same walk over the
peers' inputs themselves, read with process_vm_readv (`fast_plan._by_cma`). The Python path has
no such exchange, so every rank takes these calls in C, a rank whose tensor is not a contiguous
CPU tensor from a contiguous CPU copy (fast_call._plan_of).

This module holds each op's entry point and plan builder; mpipar.comm.agreement.fast_call
looks plans up and makes the call, mpipar.comm.agreement.fast_plan builds the keys.

A call too large for the table takes the same C call where collectives.py would follow
the agreement with MPI's blocking collective (fast_plan._mpi_plan): the key then names
that collective, its datatype and count, and C calls it after the heads agree. MPI
reads the input as collectives.py sends it (with the scattered or gathered dim moved to
the front where the dims before it are not 1) and writes the result, or pieces into a
scratch buffer that C then copies into the result along the key's walk. A torch call
costs microseconds here, and the Python path made a dozen.

Each entry point returns None when nothing was communicated (the caller takes the
Python path): no C context (fast.py: MPIPAR_FAST_AGREEMENT=0, no build, ranks that
outnumber cores on several nodes), validation off, a tensor that is not a contiguous
CPU tensor, a signature whose data does not ride in the table, a dtype or op without
a kernel (floats reduce by sum only: torch.maximum's NaN rules stay in Python), a
bad argument on this rank (the Python path raises it, meeting the others' exchange),
all_gather into an `out` that requires grad or does not hold the even-sized result,
or whose piece is a symmetric tensor of the group's one-node pool (its descriptor
rides in the table). Every condition but the tensor's own layout is shared by all
ranks, and a rank whose tensor takes the Python path makes the same exchange.
"""
from __future__ import annotations

import torch

from .. import tuning
from ..buffers import flat_chunks, offsets, overlaps
from ..symmetric.pool import _ATTR as _POOL
from .fast import FAST_DTYPES
from .inline import _call, _increment_version
from .into import NO_OUT, check as check_out, code as out_code
from .fast_call import _DONE, Exchanged, _exchanged, _finish, _into_new, _plan_of, _run, _source
from .fast_plan import (_ALLGATHER, _ALLTOALL, _BCAST, _CMA_COPY, _COPY, _REDUCE, _REDUCE_SCATTER, _SLOT_COPY,
                        _SLOT_REDUCE, _SLOT_SPLIT, _Plan,
                        _blocks, _by_cma, _front_strides, _in_slots, _kernel, _key, _leading, _mpi_plan, _sent_as,
                        _slot_plan, _strides, _walk)
from .protocol import BAD_DIM, norm_dim

__all__ = ["Exchanged", "all_gather", "all_reduce", "all_to_all", "broadcast", "reduce_scatter"]


def all_reduce(t: torch.Tensor, g, op, algorithm) -> bool:
    """collectives.all_reduce's validated call (g.size > 1) where its data rides in the payload
    slots: True when `t` now holds the reduction (every row reduced in rank order, as the table's
    small all-reduce). False: nothing was communicated (inline.fast_all_reduce and the Python path
    follow)."""
    buf = g.__dict__.get("_inline_buffers")
    if buf is None or not buf.slot_bytes:  # (ranks with their own cores: one lookup)
        return False
    buf, plan, host = _plan_of(t, g, ("all_reduce", t.shape, t.dtype, op, algorithm), _all_reduce_plan, op,
                               algorithm)
    if plan is None:
        return False
    v = _run(buf, g, plan, algorithm, "all_reduce", host.data_ptr(), host.data_ptr())
    if v != _DONE:
        _finish(g, plan, v)
    if host is t:
        _increment_version((t,))  # an in-place write, as autograd must see it (C wrote the memory)
    else:
        (t.detach() if t.requires_grad else t).copy_(host)
    return True


def _all_reduce_plan(settings, t, g, op, algorithm) -> _Plan:
    """Every row (t flattened) reduced in rank order into t itself (C copied t into its slot
    first), where the call rides in the payload slots and fast.c has the kernel; else no key.
    Past tuning.SLOT_SPLIT_BYTES each rank reduces its own chunk, and the chunks are exchanged."""
    info = _call("all_reduce", t, op, algorithm)
    kernel = _kernel(t.dtype, op)
    if kernel is None or not _in_slots(g, info, "all_reduce", info.nbytes, algorithm):
        return _Plan(settings, info)
    flat = t.reshape(-1)
    kind = _SLOT_SPLIT if info.nbytes > tuning.SLOT_SPLIT_BYTES else _SLOT_REDUCE
    return _slot_plan(settings, info, _blocks(info, flat, g, kind, 0, 0, flat.numel(), None, kernel=kernel))


def broadcast(t: torch.Tensor, g, root) -> bool:
    """collectives.broadcast's call (g.size > 1): True when `t` holds root's data."""
    buf, plan, host = _plan_of(t, g, ("broadcast", t.shape, t.dtype, root, root.__class__), _broadcast_plan, root)
    if plan is None or (plan.mpi and _symmetric(g, t)):
        return False
    v = _run(buf, g, plan, None, "broadcast", host.data_ptr(), host.data_ptr())
    if v != _DONE:
        _finish(g, plan, v)
    if plan.receives and host is t:
        _increment_version((t,))  # an in-place write, as autograd must see it (C wrote the memory)
    elif plan.receives:
        (t.detach() if t.requires_grad else t).copy_(host)
    return True


def _broadcast_plan(settings, t, g, root) -> _Plan:
    """inline_ops.agree_broadcast's inline case: root's row copied into the others' tensors."""
    r = root if isinstance(root, int) and 0 <= root < g.size else BAD_DIM
    info = _call("broadcast", t, dim=r)
    mine = g.rank == r
    slots = _in_slots(g, info, "broadcast", info.nbytes)
    if not slots and not (info.fits and info.nbytes > 0 and not tuning.shm_pays("broadcast", info.nbytes)):
        return _mpi_plan(settings, info, g, t, _BCAST, t.numel(), root=r, receives=g.rank != r)
    key = _key(info, _SLOT_COPY if slots else _COPY, nbytes=info.nbytes if mine else 0, k0=r, nk=0 if mine else 1,
               run=info.nbytes, out_bytes=info.nbytes)
    return _Plan(settings, info, key, receives=not mine, slots=slots)


def reduce_scatter(t: torch.Tensor, g, dim, op, algorithm):
    """collectives.reduce_scatter's validated call (g.size > 1): this rank's slice of the
    reduction, or None."""
    k = ("reduce_scatter", t.shape, t.dtype, dim, dim.__class__, op, algorithm)
    buf, plan, host = _plan_of(t, g, k, _reduce_scatter_plan, dim, op, algorithm)
    if plan is None or (plan.mpi and _symmetric(g, t)):
        return None
    return _into_new(buf, g, plan, algorithm, "reduce_scatter", t, host)


def _reduce_scatter_plan(settings, t, g, dim, op, algorithm) -> _Plan:
    """inline_ops.agree_reduce_scatter's inline case with a kernel in fast.c: every row's slice
    g.rank (tensor_split order along d) reduced in rank order."""
    d = norm_dim(dim, t.dim())
    info = _call("reduce_scatter", t, op, algorithm, dim=d)
    kernel = _kernel(t.dtype, op)
    if (kernel is not None and t.dim() > 0 and d != BAD_DIM
            and _in_slots(g, info, "reduce_scatter", info.nbytes, algorithm)):
        sizes = flat_chunks(t.shape[d], g.size)
        return _slot_plan(settings, info, _blocks(info, t, g, _SLOT_REDUCE, d, offsets(sizes)[g.rank], sizes[g.rank],
                                                  None, kernel=kernel))
    if (info.combine is None or t.dim() == 0
            or (algorithm == "auto" and tuning.shm_pays("reduce_scatter", info.nbytes))):
        if (info.combine is not None or t.dim() == 0 or d == BAD_DIM or t.shape[d] % g.size
                or t.dtype not in FAST_DTYPES or t.dtype is torch.bool or op not in ("sum", "max", "min")):
            return _Plan(settings, info)  # (small, or not MPI_Reduce_scatter_block in t's own dtype)
        shape = list(t.shape)
        shape[d] //= g.size
        count = t.numel() // g.size
        if _leading(t.shape, d):  # MPI's block is this rank's slice as it lies
            return _mpi_plan(settings, info, g, t, _REDUCE_SCATTER, count, shape=shape, op=op, algorithm=algorithm)
        # the input with d first (collectives.py's movedim), this rank's block back in t's order
        item = t.element_size()
        walk, _ = _walk(shape, item, d, 0, shape[d], None, g.size, _front_strides(shape, d, item), 1)
        pre, scratch, permute = _sent_as(t, d, count)
        return _mpi_plan(settings, info, g, t, _REDUCE_SCATTER, count, shape=shape, op=op, algorithm=algorithm,
                         walk=walk, scratch=scratch, permute=permute, pre=pre)
    if kernel is None:
        return _Plan(settings, info)
    sizes = flat_chunks(t.shape[d], g.size)
    return _Plan(settings, info, *_blocks(info, t, g, _REDUCE, d, offsets(sizes)[g.rank], sizes[g.rank], None,
                                          kernel=kernel))


def all_to_all(t: torch.Tensor, g, scatter_dim, gather_dim):
    """collectives.all_to_all's call (g.size > 1): the result, or None."""
    k = ("all_to_all", t.shape, t.dtype, scatter_dim, scatter_dim.__class__, gather_dim, gather_dim.__class__)
    buf, plan, host = _plan_of(t, g, k, _all_to_all_plan, scatter_dim, gather_dim)
    if plan is None:
        return None
    return _into_new(buf, g, plan, None, "all_to_all", t, host)  # (collectives.py's all_to_all never uses shared memory)


def _all_to_all_plan(settings, t, g, scatter_dim, gather_dim) -> _Plan:
    """inline_ops.agree_all_to_all's inline case: block g.rank along sd of every row, concatenated
    along gd in rank order."""
    sd, gd = norm_dim(scatter_dim, t.dim()), norm_dim(gather_dim, t.dim())
    info = _call("all_to_all", t, dim=sd if gd != BAD_DIM else BAD_DIM, root=gd)
    blocks = t.dim() > 0 and BAD_DIM not in (sd, gd) and not t.shape[sd] % g.size
    kind = None  # read out of the peers' inputs, else out of the payload slots
    if blocks and _by_cma(g, info, "all_to_all", info.nbytes):
        kind = _CMA_COPY
    elif blocks and _in_slots(g, info, "all_to_all", info.nbytes):
        kind = _SLOT_COPY
    if kind is not None:
        c = t.shape[sd] // g.size
        return _slot_plan(settings, info, _blocks(info, t, g, kind, sd, g.rank * c, c, gd))
    if not info.fits and blocks:
        count, item = t.numel() // g.size, t.element_size()
        if sd == gd and _leading(t.shape, sd):  # MPI's blocks in and out are the result's
            return _mpi_plan(settings, info, g, t, _ALLTOALL, count, shape=list(t.shape))
        block = list(t.shape)
        block[sd] //= g.size
        leading = _leading(t.shape, sd)  # else the input goes with sd first (collectives.py's movedim)
        src = _strides(block, item) if leading else _front_strides(block, sd, item)
        walk, shape = _walk(block, item, sd, 0, block[sd], gd, g.size, src)
        pre, scratch, permute = (None, t.numel(), None) if leading else _sent_as(t, sd, t.numel())
        return _mpi_plan(settings, info, g, t, _ALLTOALL, count, shape=shape, walk=walk,
                         scratch=scratch, permute=permute, pre=pre)
    if not info.fits or t.dim() == 0 or t.shape[sd] % g.size:
        return _Plan(settings, info)
    c = t.shape[sd] // g.size
    return _Plan(settings, info, *_blocks(info, t, g, _COPY, sd, g.rank * c, c, gd))


def all_gather(t: torch.Tensor, g, dim, algorithm, out):
    """collectives.all_gather's call (g.size > 1): the result (`out`, or a new tensor), an
    Exchanged (the agreement is made and the call recorded: finish it), or None."""
    try:
        k = ("all_gather", t.shape, t.dtype, dim, dim.__class__, algorithm,
             NO_OUT if out is None else out_code(t, out, norm_dim(dim, t.dim())))
    except TypeError:
        return None
    buf, plan, host = _plan_of(t, g, k, _all_gather_plan, dim, algorithm, k[-1])
    if plan is None:
        return None
    if plan.slots:
        return _all_gather_slots(buf, g, plan, algorithm, t, host, norm_dim(dim, t.dim()), out, k[-1])
    if out is None:
        result = plan.output()
    elif out.requires_grad or k[-1] != plan.total or (plan.mpi and _aliased(t, out, g.rank)):
        return None  # (the Python path: out.copy_ raises, or out holds pieces of other sizes, or t is in out)
    else:
        result = out
    pool = g.__dict__.get(_POOL)
    one_node = pool is not None and pool.one_node
    if one_node and plan.mpi and (pool.locate(t if out is None else out) is not None
                                  or (out is not None and pool.locate(t) is not None)):
        return None  # a symmetric tensor: its descriptor rides in the table (inline.exchange_args)
    # (a call that fits the table's rows is below the zero-copy crossover: the Python path would
    # finish it from the rows too, so a symmetric tensor takes the C call as a plain one does)
    src = _source(plan, t)  # (held while C runs)
    v = _run(buf, g, plan, algorithm, "all_gather", src.data_ptr(), result.data_ptr())
    if v == _DONE:
        if out is not None:
            _increment_version((out,))  # an in-place write, as autograd must see it (C wrote the memory)
        return result
    return _exchanged(buf, g, plan, v)


def _all_gather_slots(buf, g, plan, algorithm, t: torch.Tensor, host: torch.Tensor, d: int, out, code: int):
    """all_gather's call whose pieces ride in the payload slots: taken by every rank, whatever its
    tensor's layout or `out` (a result the C call could not write into `out` is copied into it, as
    collectives.py's path copies a gathered result; an `out` that cannot hold it raises there too).
    `host`: t or its contiguous CPU copy (_plan_of); `code`: out's into.code."""
    direct = out is not None and out.is_cpu and not out.requires_grad and code == plan.total
    result = out if direct else plan.output()
    # (the slot gets a copy of `host` before anything is written, so `t` may lie inside `out`)
    v = _run(buf, g, plan, algorithm, "all_gather", host.data_ptr(), result.data_ptr())
    if v != _DONE:  # pieces of other sizes: the Python path finishes
        return _exchanged(buf, g, plan, v)
    if direct:
        _increment_version((out,))  # an in-place write, as autograd must see it (C wrote the memory)
        return out
    if out is None:
        return result if host is t or t.is_cpu else result.to(t.device)
    check_out(t, out, d, plan.total)  # the same verdict on every rank (out's code was agreed)
    return out.copy_(result)


def _all_gather_plan(settings, t, g, dim, algorithm, code) -> _Plan:
    """inline_ops.agree_all_gather's inline case when every rank's size along d is this rank's:
    the rows concatenated along d. (Other sizes: the C call leaves the finish to inline_ops.)"""
    d = norm_dim(dim, t.dim())
    info = _call("all_gather", t, algorithm=algorithm, dim=d, root=code, free_dim=True, root_name="out")
    if t.dim() > 0 and d != BAD_DIM and _in_slots(g, info, "all_gather", info.nbytes, algorithm,
                                                  shm_bytes=g.size * info.nbytes):
        return _slot_plan(settings, info, _blocks(info, t, g, _SLOT_COPY, d, 0, t.shape[d], d, free=t.shape[d],
                                                  no_descriptor=1), total=g.size * t.shape[d])
    if not info.fits and t.dim() > 0 and d != BAD_DIM:
        shape = list(t.shape)
        shape[d] *= g.size
        walk = permute = pre = None
        scratch = 0
        if not _leading(t.shape, d):  # pieces go with d first (collectives.py's movedim), C concatenates them
            src = _front_strides(list(t.shape), d, t.element_size())
            walk = _walk(list(t.shape), t.element_size(), d, 0, t.shape[d], d, g.size, src)[0]
            pre, scratch, permute = _sent_as(t, d, g.size * t.numel())
        return _mpi_plan(settings, info, g, t, _ALLGATHER, t.numel(), shape=shape, algorithm=algorithm,
                         free=t.shape[d], total=g.size * t.shape[d], walk=walk, scratch=scratch, permute=permute,
                         pre=pre)
    if (not info.fits or t.dim() == 0
            or (algorithm == "auto" and tuning.shm_pays("all_gather", g.size * info.nbytes))):
        return _Plan(settings, info)
    key, template = _blocks(info, t, g, _COPY, d, 0, t.shape[d], d, free=t.shape[d], no_descriptor=1)
    return _Plan(settings, info, key, template, g.size * t.shape[d])


def _symmetric(g, t: torch.Tensor) -> bool:
    """Is `t` in the group's one-node symmetric pool (collectives.py's shared-memory path: its
    descriptor rides in the table, inline.exchange_args)?"""
    pool = g.__dict__.get(_POOL)
    return pool is not None and pool.one_node and pool.locate(t) is not None


def _aliased(t: torch.Tensor, out: torch.Tensor, rank: int) -> bool:
    """Does `t` overlap `out` other than as this rank's block (MPI_IN_PLACE, which fast.c detects)?"""
    return overlaps(t, out) and t.data_ptr() != out.data_ptr() + rank * t.numel() * t.element_size()
