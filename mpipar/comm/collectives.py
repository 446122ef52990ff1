"""Collectives on torch tensors: all_reduce, all_gather, reduce_scatter, broadcast, all_to_all.

algorithm="mpi" uses the MPI library's collective (mpipar.comm.backends.mpi), "ring"
the textbook ring on point-to-point (mpipar.comm.backends.ring), "auto" picks by message
size from the measured crossover (`tuning.choose`). Every call first agrees on
its arguments across the group (mpipar.comm.agreement.protocol), so bad input raises
MpiparError on every rank and never hangs. For all_reduce, broadcast,
reduce_scatter and all_gather that agreement is one fixed-size Allgather that
also carries tensors of at most 4 KiB, which then finish locally
(mpipar.comm.agreement.inline, inline_ops): one collective per small call. Every
agreement also carries the shared-memory entry exchange of symmetric tensors
(mpipar.comm.symmetric.collectives). `validate=False` (all_reduce,
reduce_scatter) skips that agreement for callers whose arguments are
consistent by construction, e.g. a backward whose shapes mirror a forward
that was validated. Where ranks outnumber cores, mpipar.comm.backends.crowded
picks how the data moves after the agreement.
"""
from __future__ import annotations

import math

import torch

from ..errors import MpiparError
from ..mesh import as_group
from . import outputs, tuning
from .agreement import fast_ops, inline, inline_ops, into
from .backends import crowded, mpi as native, ring
from .symmetric import collectives as shm, entry as shm_entry
from .buffers import (borrowed_buffer, flat_chunks, host_contiguous, needs_staging, offsets, overlaps, reduce_dtype,
                      staging_forced)
from .agreement.protocol import BAD_DIM, agree, norm_dim, signature, validation_enabled
from .wait import complete
from ..flight.recorder import begin, done, note


_NATIVE = (torch.float32, torch.float64, torch.int32, torch.int64, torch.int16, torch.int8, torch.uint8)


def _bool_op(op: str, dtype: torch.dtype) -> str:
    """bool sum = logical or (= max of 0/1); other dtypes keep their op."""
    return "max" if dtype is torch.bool and op == "sum" else op


def _agree(name, g, t, op=None, algorithm=None, dim=0, root=0, free_dim=False, root_name="root"):
    """Agree on the call's arguments across the group (raises MpiparError on every rank)."""
    sig = signature(t, op, algorithm, dim, root)
    return agree(name, g, sig, need_op=op is not None, need_algorithm=algorithm is not None, free_dim=free_dim,
                 root_name=root_name)


def _working(t: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor MPI can read (host copy when staging), in the dtype reductions use."""
    x = t.detach()
    if needs_staging(x):
        x = x.cpu()
    x = x.contiguous()
    rd = reduce_dtype(x.dtype)
    return x.to(rd) if rd != x.dtype else x


def all_reduce(t: torch.Tensor, group, op: str = "sum", algorithm: str = "auto", *,
               validate: bool = True) -> torch.Tensor:
    """In place: every rank's `t` becomes the elementwise op over the group. Returns `t`."""
    g = as_group(group)
    if validate and g.size > 1:  # the agreement notes dtype and shape (it has them cached)
        if fast_ops.all_reduce(t, g, op, algorithm) or inline.fast_all_reduce(t, g, op, algorithm, crowded.staged):
            return t  # agreement, data and record in one C call
        slot = begin(g, "all_reduce", None, None, algorithm)
    else:
        slot = begin(g, "all_reduce", t.dtype, t.shape, algorithm)
    try:
        entry = prestaged = None  # the shared-memory entry exchange, when the agreement already made it
        if validate:
            if g.size > 1 and validation_enabled():  # one Allgather: agreement, and small data too
                if crowded.staged(g, t, algorithm, "all_reduce", t.numel() * t.element_size()) == "shm":
                    prestaged = shm.prestage(g, t)  # the agreement is then the staging barrier too
                entry = inline.agree_all_reduce(t, g, op, algorithm, prestaged is not None)
                if entry is True:
                    return t
            else:
                note(t.dtype, t.shape)
                _agree("all_reduce", g, t, op=op, algorithm=algorithm)
        if g.size == 1:
            return t
        with crowded.present(g, validate):
            return _all_reduce(t, g, _bool_op(op, t.dtype), algorithm, entry, prestaged)
    finally:
        done(slot)


def _all_reduce(t: torch.Tensor, g, op: str, algorithm: str, entry, prestaged=None) -> torch.Tensor:
    """all_reduce's data movement once the arguments are agreed (g.size > 1); `prestaged`: the
    scratch window holding `t` (shm.prestage), when it was copied before the agreement."""
    staged = crowded.staged(g, t, algorithm, "all_reduce", t.numel() * t.element_size())
    if shm.all_reduce(t, g, op, staged, entry, prestaged if staged == "shm" else None):
        return t
    if t.is_cpu and t.dtype in _NATIVE and t.is_contiguous() and t.numel() and not staging_forced():
        # fast path: zero copy, no staging (MPI writes t's memory by address)
        if tuning.choose("all_reduce", algorithm, t.numel() * t.element_size(), g.size) == "mpi":
            native.all_reduce_(g, t, op)
            return t
    with host_contiguous(t) as h:
        rd = reduce_dtype(h.dtype)
        work = h if rd == h.dtype else h.to(rd)
        flat = work.view(-1)
        algo = tuning.choose("all_reduce", algorithm, flat.numel() * flat.element_size(), g.size)
        if algo == "ring":
            ring.all_reduce_(flat, g, flat_chunks(flat.numel(), g.size), op)
        else:
            native.all_reduce_(g, flat, op)
        if work is not h:
            h.copy_(work)
    return t


def all_gather(t: torch.Tensor, group, dim: int = 0, algorithm: str = "auto", *,
               out: torch.Tensor | None = None) -> torch.Tensor:
    g = as_group(group)
    if g.size > 1:
        fast = fast_ops.all_gather(t, g, dim, algorithm, out)  # agreement, data and record in one C call
        if fast.__class__ is fast_ops.Exchanged:  # ... the agreement alone: pieces of different sizes
            try:
                return _all_gather(t, g, dim, algorithm, out=out, exchanged=(fast.buf, fast.entry))
            finally:
                fast.close()
        if fast is not None:
            return fast
    slot = begin(g, "all_gather", t.dtype, t.shape, algorithm)
    try:
        return _all_gather(t, g, dim, algorithm, out=out)
    finally:
        done(slot)


def _all_gather(t: torch.Tensor, group, dim: int = 0, algorithm: str = "auto", *,
                out: torch.Tensor | None = None, exchanged=None) -> torch.Tensor:
    """Concatenation of every rank's `t` along `dim` (sizes along `dim` may differ per rank).

    `out` (keyword, not differentiable): write the result into this contiguous tensor of
    t's dtype and device, shaped like the result, and return it (torch's
    all_gather_into_tensor). When `t` IS this rank's slice of `out` (out.narrow(dim,
    offset of rank r, size of rank r)), the gather is in place: this rank's piece is not
    copied (MPI_IN_PLACE; in shared memory only the peers' pieces move, see mpipar.comm.symmetric.collectives).
    """
    if t.dim() == 0:  # one scalar per rank gathers to a vector of group size (as torch.distributed)
        return all_gather(t.reshape(1), group, 0, algorithm, out=out)
    g = as_group(group)
    d = norm_dim(dim, t.dim())
    code = into.code(t, out, d)
    small = table = None  # table: the shared-memory entry exchange (mpipar.comm.symmetric.collectives)
    if g.size > 1:  # one Allgather: agreement, sizes, and small pieces too
        small, sizes, table = inline_ops.agree_all_gather(t, g, d, algorithm, code, t if out is None else out,
                                                          exchanged)
    else:
        sizes = _agree("all_gather", g, t, algorithm=algorithm, dim=d, root=code, free_dim=True, root_name="out")
    if out is not None:
        into.check(t, out, d, sum(sizes))  # same verdict on every rank: the agreement covered out
        return out.copy_(small) if small is not None else _all_gather_into(t, g, d, sizes, algorithm, out, table)
    if small is not None:
        return small
    if g.size == 1:
        return t.clone()
    inner = math.prod(s for k, s in enumerate(t.shape) if k != d)  # agreed (only dim d may differ)
    staged = crowded.staged(g, t, algorithm, "all_gather", sum(sizes) * inner * t.element_size())
    shared = shm.all_gather(t, g, d, sizes, staged, table) if shm_entry.may_apply(g, staged) else None
    if shared is not None:
        return shared
    x = t.detach() if d == 0 else t.detach().movedim(d, 0)
    x = (x.cpu() if needs_staging(x) else x).contiguous()
    rest = list(x.shape[1:])
    inner = math.prod(rest)
    counts = [s * inner for s in sizes]
    out = outputs.empty([sum(sizes)] + rest, x.dtype, None if x.is_cpu else x.device)
    algo = crowded.choose(g, "all_gather", algorithm, out.numel() * out.element_size())
    if algo == "ring":
        flat = out.view(-1)
        flat.narrow(0, offsets(counts)[g.rank], counts[g.rank]).copy_(x.reshape(-1))
        ring.all_gather_(flat, g, counts)
    else:
        with crowded.present(g, True):  # the agreement (a barrier) ran: g.size > 1 here
            native.all_gather(g, borrowed_buffer(x), borrowed_buffer(out), counts)
    if d:
        out = out.movedim(0, d).contiguous()
    return out if out.device == t.device else out.to(t.device)


@torch.no_grad()
def _all_gather_into(t, g, d: int, sizes: list[int], algorithm: str, out: torch.Tensor, entry) -> torch.Tensor:
    """all_gather(..., out=out) once the ranks agreed on the arguments (out included) and
    `out` was checked."""
    in_place = into.is_own_slice(t, out, d, sizes, g.rank)
    if g.size == 1:
        return out if in_place else out.copy_(t)
    staged = crowded.staged(g, t, algorithm, "all_gather", out.numel() * out.element_size())
    if shm.all_gather(t, g, d, sizes, staged, entry, out=out, in_place=in_place) is not None:
        return out
    if d:  # pieces are strided in `out` (d is agreed: every rank takes this branch): gather, then copy
        return out.copy_(all_gather(t, g, d, algorithm))
    # MPI cannot read `out` (a device without CUDA-aware MPI): the same collective on a host copy
    host = outputs.empty(list(out.shape), out.dtype) if needs_staging(out) else out
    direct = in_place and host is out
    flat = host.view(-1)
    inner = math.prod(out.shape[1:])
    counts = [s * inner for s in sizes]
    if crowded.choose(g, "all_gather", algorithm, flat.numel() * flat.element_size()) == "ring":
        if not direct:
            flat.narrow(0, offsets(counts)[g.rank], counts[g.rank]).copy_(t.reshape(-1))
        ring.all_gather_(flat, g, counts)
    else:
        piece = None if direct else _piece(t, host)  # (held: an address buffer does not keep it alive)
        send = native.in_place() if direct else borrowed_buffer(piece)
        with crowded.present(g, True):
            native.all_gather(g, send, borrowed_buffer(flat), counts)
        if host is out:
            inline._increment_version((out,))  # MPI wrote it: autograd must see the write, as after copy_
    return out if host is out else out.copy_(host)


def _piece(t: torch.Tensor, host: torch.Tensor) -> torch.Tensor:
    """This rank's piece as MPI sends it into `host`: contiguous on host's device, and a copy
    where it lies inside `host` (MPI forbids a send buffer that aliases the receive buffer)."""
    x = t.detach().to(host.device).contiguous()
    return x.clone() if overlaps(x, host) else x


def reduce_scatter(t: torch.Tensor, group, dim: int = 0, op: str = "sum", algorithm: str = "auto", *,
                   validate: bool = True) -> torch.Tensor:
    g = as_group(group)
    if validate and g.size > 1:
        fast = fast_ops.reduce_scatter(t, g, dim, op, algorithm)  # agreement, data and record in one C call
        if fast is not None:
            return fast
    slot = begin(g, "reduce_scatter", t.dtype, t.shape, algorithm)
    try:
        return _reduce_scatter(t, g, dim, op, algorithm, validate=validate)
    finally:
        done(slot)


def _reduce_scatter(t: torch.Tensor, group, dim: int = 0, op: str = "sum", algorithm: str = "auto", *,
                     validate: bool = True) -> torch.Tensor:
    """Rank r gets slice r (torch.tensor_split order) along `dim` of the elementwise op over ranks."""
    g = as_group(group)
    d = norm_dim(dim, t.dim())
    table = None  # the shared-memory entry exchange, when the agreement made it
    if g.size > 1 and (validate or d == BAD_DIM) and validation_enabled():
        small, table = inline_ops.agree_reduce_scatter(t, g, d, op, algorithm)  # one Allgather
        if small is not None:
            return small
    elif validate or d == BAD_DIM:
        _agree("reduce_scatter", g, t, op=op, algorithm=algorithm, dim=d)
    if t.dim() == 0:
        raise MpiparError("reduce_scatter: a 0-d tensor has no dim to scatter along")
    op = _bool_op(op, t.dtype)
    if g.size == 1:
        return t.clone()
    staged = crowded.staged(g, t, algorithm, "reduce_scatter", t.numel() * t.element_size())
    shared = shm.reduce_scatter(t, g, d, op, staged, table) if shm_entry.may_apply(g, staged) else None
    if shared is not None:
        return shared
    x = _working(t.movedim(d, 0) if d else t)
    sizes = flat_chunks(x.shape[0], g.size)
    inner = math.prod(x.shape[1:])
    counts = [s * inner for s in sizes]
    algo = crowded.choose(g, "reduce_scatter", algorithm, x.numel() * x.element_size())
    if algo == "ring":
        mine = ring.reduce_scatter_into(x.reshape(-1), g, counts, op)
    else:
        mine = outputs.empty([counts[g.rank]], x.dtype, None if x.is_cpu else x.device)
        with crowded.present(g, validate):
            native.reduce_scatter(g, borrowed_buffer(x), borrowed_buffer(mine), counts, op)
    out = mine.view([sizes[g.rank]] + list(x.shape[1:]))
    if d:
        out = out.movedim(0, d).contiguous()
    if out.dtype != t.dtype or out.device != t.device:  # (staged, or reduced in a wider dtype)
        out = out.to(device=t.device, dtype=t.dtype)
    return out


def broadcast(t: torch.Tensor, group, root: int = 0) -> torch.Tensor:
    g = as_group(group)
    if g.size > 1 and fast_ops.broadcast(t, g, root):  # agreement, data and record in one C call
        return t
    slot = begin(g, "broadcast", t.dtype, t.shape)
    try:
        return _broadcast(t, g, root)
    finally:
        done(slot)


def _broadcast(t: torch.Tensor, group, root: int = 0) -> torch.Tensor:
    """In place: every rank's `t` becomes root's `t`. Returns `t`."""
    g = as_group(group)
    r = root if isinstance(root, int) and 0 <= root < g.size else BAD_DIM
    table = None  # the shared-memory entry exchange, when the agreement made it
    # (a bad root travels in the dim slot, so every rank raises the same error)
    if g.size > 1 and validation_enabled():
        small, table = inline_ops.agree_broadcast(t, g, root, r)  # one Allgather; small data too
        if small:
            return t
    else:
        _agree("broadcast", g, t, dim=r)
    if g.size == 1:
        return t
    if shm.broadcast(t, g, root, table):  # symmetric tensor on one node: zero copy
        return t
    if t.is_cpu and t.is_contiguous() and not staging_forced():
        # zero copy, without host_contiguous (3 us of a 16 KiB call)
        _bcast(g, borrowed_buffer(t), root, t.numel() * t.element_size())
        return t
    with host_contiguous(t, write_back=g.rank != root) as h:
        _bcast(g, borrowed_buffer(h), root, h.numel() * h.element_size())
    return t


def _bcast(g, buf, root: int, nbytes: int) -> None:
    with crowded.present(g, not crowded.stays_polite("broadcast", nbytes)):  # after the agreement
        complete(g, "Bcast", buf, root=root)


def all_to_all(t: torch.Tensor, group, scatter_dim: int, gather_dim: int) -> torch.Tensor:
    g = as_group(group)
    if g.size > 1:
        fast = fast_ops.all_to_all(t, g, scatter_dim, gather_dim)  # agreement, data and record in one C call
        if fast is not None:
            return fast
    slot = begin(g, "all_to_all", t.dtype, t.shape)
    try:
        return _all_to_all(t, g, scatter_dim, gather_dim)
    finally:
        done(slot)


def _all_to_all(t: torch.Tensor, group, scatter_dim: int, gather_dim: int) -> torch.Tensor:
    """Split `t` into N chunks along scatter_dim, send chunk j to rank j, concat received along gather_dim."""
    g = as_group(group)
    sd, gd = norm_dim(scatter_dim, t.dim()), norm_dim(gather_dim, t.dim())
    small = None
    if g.size > 1 and validation_enabled():  # one Allgather: agreement, and small data too
        small = inline_ops.agree_all_to_all(t, g, sd, gd)
    else:
        _agree("all_to_all", g, t, dim=sd if gd != BAD_DIM else BAD_DIM, root=gd)
    if t.shape[sd] % g.size:
        raise MpiparError(f"all_to_all: size {t.shape[sd]} of scatter_dim {scatter_dim} "
                          f"is not divisible by the group size {g.size}")
    if small is not None:
        return small
    if g.size == 1:
        return t.clone()
    x = t.detach()
    x = x.cpu() if needs_staging(x) else x
    send = x.movedim(sd, 0).contiguous()  # block j (rows j*S/N ..) goes to rank j; no copy when sd == 0
    recv = outputs.empty(send.shape, send.dtype, send.device)
    bufs = borrowed_buffer(send), borrowed_buffer(recv)
    with crowded.present(g, not crowded.stays_polite("all_to_all", send.numel() * send.element_size())):
        complete(g, "Alltoall", *bufs)
    # block i came from rank i: (N, S/N, rest) back in t's dim order, then concatenated along gd
    blocks = recv.view(g.size, send.shape[0] // g.size, *send.shape[1:]).movedim(1, sd + 1)
    out_shape = list(t.shape)
    out_shape[sd] //= g.size
    out_shape[gd] *= g.size
    return blocks.movedim(0, gd).reshape(out_shape).to(t.device)  # a view when sd == gd == 0


for _public, _private in ((all_gather, _all_gather), (reduce_scatter, _reduce_scatter), (broadcast, _broadcast),
                          (all_to_all, _all_to_all)):
    _public.__doc__ = _private.__doc__  # the wrappers record the call (mpipar.flight); the bodies say what it does
del _public, _private
