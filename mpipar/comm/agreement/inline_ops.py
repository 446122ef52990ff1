"""Small broadcast, reduce_scatter and all_gather finished from the agreement's table.

Each `agree_<op>` is collective over the group (size > 1) and makes ONE Allgather
(mpipar.comm.agreement.inline.exchange_args): it agrees on the arguments (MpiparError on
every rank otherwise) and carries the data of small tensors. It returns
(result, entry): `result` is the finished call's result when the data rode along
(None: go on to the collective), `entry` the shared-memory entry table, as from
mpipar.comm.agreement.protocol.agree. Every rank takes the same branch: the choice reads only
the agreed signature, settings shared by all ranks, or the gathered table.

Where fast.c builds (mpipar.comm.agreement.fast), a contiguous CPU call whose data rides
in the table is finished in C instead (mpipar.comm.agreement.fast_ops), with the same
exchange and the same bytes; this module is then the path of the other calls (and of a
rank whose tensor is not contiguous, which meets the C ranks' exchange), and finishes
an all_gather whose pieces differ in size after the C call agreed on it (`exchanged`).
"""
from __future__ import annotations

import math

import torch

from .. import tuning
from ..buffers import flat_chunks, offsets
from .inline import INLINE_BYTES, _call, exchange_args, reduce_rows
from .protocol import BAD_DIM


def agree_broadcast(t: torch.Tensor, g, root: int, dim_slot: int):
    """(True when `t` now holds root's data, entry). `dim_slot`: root, or BAD_DIM for a bad one."""
    info = _call("broadcast", t, dim=dim_slot)
    inline = info.fits and info.nbytes > 0 and not tuning.shm_pays("broadcast", info.nbytes)
    buf, entry = exchange_args(g, info, t, inline and g.rank == root, None if inline else t)
    if not inline:
        return None, entry
    if g.rank != root:
        (t.detach() if t.requires_grad else t).copy_(buf.typed_rows(t.dtype, t.shape)[root])
    return True, None


def agree_reduce_scatter(t: torch.Tensor, g, d: int, op, algorithm):
    """(rank g.rank's slice of the reduction when `t` was small, entry)."""
    info = _call("reduce_scatter", t, op, algorithm, dim=d)
    inline = (info.combine is not None and t.dim() > 0
              and not (algorithm == "auto" and tuning.shm_pays("reduce_scatter", info.nbytes)))
    buf, entry = exchange_args(g, info, t, inline, None if inline else t)
    if not inline:
        return None, entry
    rows = buf.cached(("reduce_scatter", t.dtype, t.shape, d), lambda: _slices(buf, t, d, g))
    out = reduce_rows(info.combine, rows)
    return (out if out.is_contiguous() else out.contiguous()).to(t.device), None


def _slices(buf, t: torch.Tensor, d: int, g) -> list:
    """Every row's slice g.rank (tensor_split order along d): what this rank reduces."""
    sizes = flat_chunks(t.shape[d], g.size)
    a, cnt = offsets(sizes)[g.rank], sizes[g.rank]
    return [r.narrow(d, a, cnt) for r in buf.typed_rows(t.dtype, t.shape)]


def agree_all_gather(t: torch.Tensor, g, d: int, algorithm, out_code: int, shared_of, exchanged=None):
    """(the concatenation along `d` when every rank's piece was small, each rank's size along
    `d`, entry). `out_code`: mpipar.comm.agreement.into.code(t, out, d), agreed like any argument.
    `exchanged`: the (buffers, entry) of an exchange already made (fast_ops.Exchanged)."""
    info = _call("all_gather", t, algorithm=algorithm, dim=d, root=out_code, free_dim=True, root_name="out")
    buf, entry = exchange_args(g, info, t, info.fits, shared_of) if exchanged is None else exchanged
    sizes = buf.free_sizes()
    inner = math.prod(s for k, s in enumerate(t.shape) if k != d)
    item = t.element_size()
    total = sum(sizes) * inner * item
    inline = (info.fits and max(sizes) * inner * item <= INLINE_BYTES
              and not (algorithm == "auto" and tuning.shm_pays("all_gather", total)))
    if not inline:
        return None, sizes, entry
    pieces = buf.cached(("all_gather", t.dtype, t.shape, d, tuple(sizes)), lambda: _pieces(buf, t, d, sizes))
    return torch.cat(pieces, dim=d).to(t.device), sizes, None


def _pieces(buf, t: torch.Tensor, d: int, sizes: list[int]) -> list:
    """Row k's payload shaped as rank k's piece (t's shape with sizes[k] along d)."""
    shapes = [t.shape[:d] + (s,) + t.shape[d + 1:] for s in sizes]
    return [buf.row(k, t.dtype, shape) for k, shape in enumerate(shapes)]


def agree_all_to_all(t: torch.Tensor, g, sd: int, gd: int):
    """The all-to-all of `t` when it was small (every rank's whole tensor rode in the table:
    block g.rank of each row, in rank order along `gd`), else None. `sd`, `gd`: normalised
    dims (BAD_DIM when out of range: every rank then raises). The caller checks divisibility
    after this (the shapes are agreed by then)."""
    info = _call("all_to_all", t, dim=sd if gd != BAD_DIM else BAD_DIM, root=gd)
    buf, _ = exchange_args(g, info, t, info.fits, None)
    if not info.fits or t.dim() == 0 or t.shape[sd] % g.size:
        return None
    rows = buf.cached(("all_to_all", t.dtype, t.shape, sd, gd), lambda: _blocks(buf, t, sd, g))
    return torch.cat(rows, dim=gd).to(t.device)


def _blocks(buf, t: torch.Tensor, sd: int, g) -> list:
    """Block g.rank (along sd) of every row: what rank k sent to this rank."""
    c = t.shape[sd] // g.size
    return [r.narrow(sd, g.rank * c, c) for r in buf.typed_rows(t.dtype, t.shape)]
