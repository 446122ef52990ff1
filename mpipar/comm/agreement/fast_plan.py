"""The plan of one call shape's C call (fast.c's `run`) on one group: its key, its output.

mpipar.comm.agreement.fast_ops makes a plan once per signature, group and settings object
and reuses it for every call of that shape. A key is the OpKey fast.c reads: the call's
head, and either the walk that copies or reduces blocks of the agreement table's rows into
the output (a call small enough to ride in the table), or the MPI collective that moves
the data after the heads agree (`_mpi_plan`), with, where MPI's contiguous blocks are not
the result's, the walk that rearranges MPI's pieces from a scratch buffer into it. Where
the table is shared, a call past its rows but within tuning.SLOT_BYTES takes the rows'
walk over the payload slots instead (`_in_slots`, `_slot_plan`).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .. import outputs, tuning
from ..buffers import _CARRIER, staging_forced
from ..symmetric.pool import _ATTR as _POOL
from .fast import FAST_DTYPES

LOOPS = 6  # fast.c's OpKey loops
_COPY, _REDUCE, _MPI, _SLOT_COPY, _SLOT_REDUCE, _SLOT_SPLIT, _CMA_COPY = 1, 2, 3, 4, 5, 6, 7  # fast.c's kinds
_ALLGATHER, _REDUCE_SCATTER, _BCAST, _ALLTOALL = 1, 2, 3, 4  # fast.c's MPI calls (KIND_MPI)
_CALL_NAMES = {_ALLGATHER: "all_gather", _REDUCE_SCATTER: "reduce_scatter", _BCAST: "broadcast",
               _ALLTOALL: "all_to_all"}
# fast.c's datatype code of the MPI datatype collectives.py sends a dtype as (buffers._CARRIER)
_MPI_CODE = {dt: FAST_DTYPES[c] for dt, (c, _) in _CARRIER.items() if c in FAST_DTYPES and c is not torch.bool}
_INT_MAX = 2 ** 31 - 1


class _Plan:
    """One call shape's C call on one group, made once per settings object (they decide validation
    and the shared-memory crossovers): its agreed description `info` (inline._Call), its key
    (None: the Python path), an output like the result (`template`: torch.empty_like of it is
    the cheapest allocation; or, where MPI moves the data, the result's `shape`, allocated by
    mpipar.comm.outputs: a large one recycled, its pages not faulted again), all_gather's
    total size along its dim, whether the call writes its input (broadcast, off the root),
    whether MPI's collective moves the data (`mpi`: _mpi_plan), and where MPI's pieces are
    rearranged into the result: the elements of the scratch buffer MPI writes them to (0: MPI
    writes the result itself) and the dim moved to the front of the input first (None: MPI
    reads the input as it is), and whether the data rides in the payload slots (`slots`:
    _in_slots; every rank of the group then takes this C call, whatever its tensor's
    layout)."""

    __slots__ = ("settings", "info", "key", "template", "total", "receives", "shape", "mpi", "scratch", "permute",
                 "slots")

    def __init__(self, settings, info, key: bytes | None = None, template=None, total: int = -1,
                 receives: bool = False, shape=None, mpi: bool = False, scratch: int = 0,
                 permute: int | None = None, slots: bool = False):
        self.settings, self.info, self.key, self.template = settings, info, key, template
        self.total, self.receives, self.shape = total, receives, shape
        self.mpi, self.scratch, self.permute, self.slots = mpi, scratch, permute, slots

    def output(self) -> torch.Tensor:
        if self.shape is None:
            return torch.empty_like(self.template)
        return outputs.empty(self.shape, self.info.dtype)


def _key(info, kind, nbytes=0, kernel=0, free=-1, no_descriptor=0, k0=0, nk=0, src0=0, dst_step=0, run=0,
         out_bytes=0, loops=(), call=0, count=0, code=0, op=0, pre_run=0, pre_loops=()) -> bytes:
    """fast.c's OpKey: unused loops are size 1, strides 0."""
    words = [*info.head, kind, nbytes, kernel, free, no_descriptor, k0, nk, src0, dst_step, run, out_bytes]
    words += _loop_words(loops) + [call, count, code, op, pre_run] + _loop_words(pre_loops)
    return np.array(words, dtype=np.int64).tobytes()


def _loop_words(loops) -> list[int]:
    """LOOPS sizes, then source strides, then destination strides; unused loops size 1, strides 0."""
    loops = list(loops) + [(1, 0, 0)] * (LOOPS - len(loops))
    return [s for s, _, _ in loops] + [a for _, a, _ in loops] + [b for _, _, b in loops]


def _mpi_plan(settings, info, g, t, call: int, count: int, shape=None, op: str = "sum", algorithm="mpi", root: int = 0,
              free: int = -1, total: int = -1, receives: bool = False, walk=None,
              scratch: int = 0, permute: int | None = None, pre=None) -> _Plan:
    """A call too large for the table whose data MPI's own collective moves, as collectives.py's
    Python path would (the same MPI call, datatype and count, blocking: every rank is present
    after the agreement, wait.all_present), or the Python path's plan where that path would do
    something else: a bad argument, an MPI count past int, staging forced (tests), a ring or
    shared-memory choice (tuning; crowded.staged), or a crowded group's polite wait
    (crowded.stays_polite: a large broadcast). All of these read facts every
    rank shares, so the ranks' calls match (a blocking MPI collective matches only blocking ones).
    `walk` (_walk's fields): MPI writes its pieces into a scratch buffer of `scratch` elements,
    which C then copies into the result along the walk; `pre` (_sent_as): C first lays the
    input out in the scratch's send area as MPI sends it."""
    from ..backends import crowded  # (crowded imports the agreement)

    nbytes = info.nbytes * (g.size if call == _ALLGATHER else 1)
    name = _CALL_NAMES[call]
    if (info.bad or count <= 0 or count * (g.size if call == _ALLTOALL else 1) > _INT_MAX or staging_forced()
            or t.dtype not in _MPI_CODE or algorithm not in ("auto", "mpi")
            or (call in (_ALLGATHER, _REDUCE_SCATTER) and (crowded.choose(g, name, algorithm, nbytes) != "mpi"
                                                         or crowded.staged(g, t, algorithm, name, nbytes) == "shm"))
            or (g.oversubscribed and crowded.stays_polite(name, nbytes))
            or (walk is None and scratch)):
        return _Plan(settings, info)
    key = _key(info, _MPI, free=free, no_descriptor=1, k0=root, call=call, count=count, code=_MPI_CODE[t.dtype],
               op=("sum", "max", "min").index(op), **(walk or {}), **(pre or {}))
    return _Plan(settings, info, key, total=total, receives=receives, shape=shape, mpi=True, scratch=scratch,
                 permute=permute)


def _sent_as(t, d: int, pieces: int) -> tuple:
    """(pre fields of _key or None, scratch elements, permute) for an input sent with `d` first,
    as collectives.py sends it (t.movedim(d, 0).contiguous()): laid out by C into the scratch's
    send area after MPI's `pieces` elements, or, where that walk needs more than LOOPS loops,
    by torch before the call (`permute`)."""
    shape, item = list(t.shape), t.element_size()
    geometry = _geometry(shape, _strides(shape, item), _front_strides(shape, d, item), item)
    if geometry is None:
        return None, pieces, d
    run, loops = geometry
    return dict(pre_run=run, pre_loops=loops), pieces + t.numel(), None


def _leading(shape, d: int) -> bool:
    """Whether the dims before `d` are all 1: blocks along `d` are then MPI's contiguous blocks."""
    return math.prod(shape[:d]) == 1


def _strides(shape, item: int) -> list[int]:
    """Byte strides of a contiguous tensor of `shape`."""
    out, acc = [], item
    for s in reversed(shape):
        out.append(acc)
        acc *= s
    return out[::-1]


def _geometry(block, src, dst, item: int):
    """(run bytes, loops) that walk a block of shape `block` whose dims step `src` bytes in the
    row and `dst` bytes in the output: size-1 dims dropped, adjacent dims that are contiguous
    in both merged, the innermost contiguous dim made the run. None: too many loops."""
    dims = []
    for size, s, d in zip(block, src, dst):
        if size == 1:
            continue
        if dims and dims[-1][1] == size * s and dims[-1][2] == size * d:
            dims[-1] = (dims[-1][0] * size, s, d)
        else:
            dims.append((size, s, d))
    run = item
    if dims and dims[-1][1] == item and dims[-1][2] == item:
        run *= dims.pop()[0]
    return (run, dims) if len(dims) <= LOOPS else None


def _walk(shape, item: int, sd: int, a: int, c: int, gd: int | None, n: int, src=None, nk=None):
    """(fields of _key, output shape): the walk that reads the block `c` long at `a` along `sd`
    of each of `nk` (default n) rows of `shape` (byte strides `src`, default contiguous) into a
    new contiguous output: concatenated along `gd` in rank order, or (gd None) reduced or
    copied. The fields are None when the walk needs more than LOOPS loops."""
    block = list(shape)
    block[sd] = c
    out = list(block)
    if gd is not None:
        out[gd] *= n
    src = _strides(shape, item) if src is None else src
    dst = _strides(out, item)
    geometry = _geometry(block, src, dst, item)
    if geometry is None:
        return None, out
    run, loops = geometry
    if math.prod(block) == 0:
        run, loops = 0, []
    step = 0 if gd is None else block[gd] * dst[gd]
    return dict(nk=n if nk is None else nk, src0=a * src[sd], dst_step=step, run=run, out_bytes=math.prod(out) * item,
                loops=loops), out


def _blocks(info, t, g, kind, sd: int, a: int, c: int, gd: int | None, **kw):
    """(key, template) of _walk over the table's rows, or the payload slots (each t's shape).
    (None, None) when the walk needs more than LOOPS loops."""
    walk, out = _walk(list(t.shape), t.element_size(), sd, a, c, gd, g.size)
    if walk is None:
        return None, None
    return _key(info, kind, nbytes=info.nbytes, **walk, **kw), torch.empty(out, dtype=t.dtype)


def _slot_plan(settings, info, key_template, **kw) -> _Plan:
    """The plan of a call whose data rides in the payload slots: _blocks' (key, template); the
    output recycled where large (mpipar.comm.outputs), as MPI's plans' are."""
    key, template = key_template
    if key is None:  # (the walk's shape is agreed: every rank takes the Python path)
        return _Plan(settings, info)
    return _Plan(settings, info, key, shape=list(template.shape), slots=True, **kw)


def _front_strides(block, d: int, item: int) -> list[int]:
    """Byte strides, in the block's own dim order, of a block laid out as
    block.movedim(d, 0).contiguous() lays it out (an input permuted before MPI)."""
    order = [d] + [i for i in range(len(block)) if i != d]
    laid = _strides([block[i] for i in order], item)
    src = [0] * len(block)
    for pos, i in enumerate(order):
        src[i] = laid[pos]
    return src


def _in_slots(g, info, name: str, payload: int, algorithm="auto", shm_bytes: int | None = None) -> bool:
    """Does this call's data ride in the shared table's payload slots (shm_table.PAYLOAD_BYTES,
    fast.c's KIND_SLOT_*)? Where the group's ranks outnumber cores on one node and every rank has
    the C call (inline.buffers agreed on it), for good arguments that do not ride in the row,
    under "auto" (an algorithm asked for by name is what runs), when `payload` (the bytes each
    rank writes: broadcast's root its tensor, all_gather its piece, reduce_scatter and all_to_all
    their whole input) is within tuning.SLOT_BYTES, and unless the group has a symmetric pool and
    the call is of a size where symmetric tensors take the zero-copy path (`shm_bytes`, as
    tuning.shm_pays_over_slots reads it: whether a rank's tensor is symmetric is its own fact, and
    the agreement's table decides that path; below, symmetric tensors ride in the slots too).
    Agreed facts only: every rank decides alike (a pool is made and freed collectively)."""
    buf = g.__dict__.get("_inline_buffers")
    return (buf is not None and buf.slot_bytes > 0 and not info.bad and not info.fits and algorithm == "auto"
            and 0 < payload <= min(buf.slot_bytes, tuning.SLOT_BYTES.get(name, 0))
            and not (_POOL in g.__dict__ and name in tuning.SHM_CROSSOVER_BYTES
                     and tuning.shm_pays_over_slots(name, payload if shm_bytes is None else shm_bytes)))


def _by_cma(g, info, name: str, payload: int) -> bool:
    """Does this call read its blocks straight out of the peers' inputs (fast.c's KIND_CMA_COPY:
    process_vm_readv, one copy)? Where every rank of a crowded one-node group has the C call and
    can read its peers' memory (inline.buffers: cma.works, agreed), for good arguments past the
    row, when `payload` (the input's bytes) is at least tuning.CMA_BYTES. Agreed facts only, as
    _in_slots."""
    buf = g.__dict__.get("_inline_buffers")
    return (buf is not None and buf.cma and not info.bad and not info.fits
            and payload >= tuning.CMA_BYTES.get(name, tuning.NEVER))


def _kernel(dtype: torch.dtype, op) -> int | None:
    """fast.c's reduction kernel of (dtype, op) (bool sums as max), or None: floats sum only
    (torch.maximum's NaN rules stay in Python)."""
    op = "max" if dtype is torch.bool and op == "sum" else op
    if dtype not in FAST_DTYPES or op not in ("sum", "max", "min") or not (op == "sum" or FAST_DTYPES[dtype] >= 2):
        return None
    return FAST_DTYPES[dtype] * 3 + ("sum", "max", "min").index(op)
