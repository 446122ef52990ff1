"""The argument agreement that carries small tensors along: one collective per small call.

Every validated all_reduce, broadcast, reduce_scatter and all_gather starts with
ONE fixed-size Allgather: each rank sends [hash of its signature, bad-argument
flag, its size along the free dim (all_gather), its symmetric descriptor
(window, offset, nbytes: the shared-memory path's entry exchange, so that needs
no second one)] and a 4 KiB payload slot.
The message size never depends on the arguments, so ranks that disagree
still complete it, see the disagreement and raise the same MpiparError.
When the (agreed) signature says the tensor is small (at most INLINE_BYTES, a
dtype the slot carries, algorithm "auto", "mpi" or "ring"), its data rode in
the payload slot and the call finishes locally (mpipar.comm.agreement.inline_ops):
all-reduce and reduce-scatter reduce the N rows in rank order (bit-identical
on every rank), broadcast copies the root's row, all-gather concatenates the
rows (inline only when EVERY rank's piece fits, which every rank reads from
the same table). Larger tensors go on to their collective after the agreement.

Why: a separate agreement collective before MPI's own would cost a second round
trip per call; riding on it makes a small checked call cost about one collective
(results/TUNING.md). The small collectives also have a C twin of this protocol
(mpipar.comm.agreement.fast: `fast_all_reduce` here, the others in
mpipar.comm.agreement.fast_ops), taken where it builds and applies.
"""
from __future__ import annotations

import ctypes
import functools

import numpy as np
import torch

from ...errors import MpiparError
from .. import tuning
from ..symmetric import entry as shm_entry
from ..symmetric.collectives import PRESTAGED
from ...flight.recorder import described
from ..buffers import memo, staging_forced
from ..symmetric.pool import _ATTR as _POOL
from ...settings import current
from ..backends.mpi import in_place
from . import cma, fast, shm_table
from ..wait import polite_packed
from .fast import FAST_DTYPES
from .protocol import BAD_DIM, _UNKNOWN, check, exchange, signature, validation_enabled

INLINE_BYTES = 4096  # the payload slot; identical on every rank by construction (never from env)
_HEAD = 6  # int64 words: signature hash, bad flag, free size, symmetric descriptor [window, offset, nbytes]
_AGREED = 2  # the words every rank must have equal
_MINE = 3    # the words a call writes into its row's head (hash, bad, free size)
_SLOT = _HEAD * 8 + INLINE_BYTES
_INLINE_ALGORITHMS = ("auto", "mpi", "ring")
CARRIER = {torch.float32: torch.float32, torch.float64: torch.float64, torch.int64: torch.int64,
           torch.int32: torch.int32, torch.int16: torch.int16, torch.int8: torch.int8,
           torch.uint8: torch.uint8, torch.bool: torch.uint8}
_PAIR = {"sum": torch.add, "max": torch.maximum, "min": torch.minimum}
_INFO: dict = {}  # (name, shape, dtype, op, algorithm, dim, root) -> _Call


class _Call:
    """What a signature implies, computed once per distinct call shape."""

    __slots__ = ("name", "sig", "head", "head_bytes", "bad", "free", "numel", "nbytes", "combine", "fits",
                 "need_op", "need_algorithm", "root_name", "dtype", "shape", "fast", "fast_mpi", "fast_settings",
                 "fast_ok")

    def __init__(self, name, t: torch.Tensor, op, algorithm, dim, root, free_dim, root_name):
        self.name, self.root_name = name, root_name
        self.need_op, self.need_algorithm = op is not None, algorithm is not None
        self.sig = signature(t, op, algorithm, dim, root)
        self.bad = int((self.need_op and self.sig[0] == _UNKNOWN) or (self.need_algorithm and self.sig[1] == _UNKNOWN)
                       or self.sig[2] == _UNKNOWN or self.sig[4] == BAD_DIM)
        free = 6 + int(self.sig[4]) if free_dim and not self.bad else None
        self.free = None if free is None else int(self.sig[free])
        agreed = self.sig if free is None else self.sig[:free] + (0,) + self.sig[free + 1:]
        self.head = np.array([hash(agreed), self.bad, self.free or 0], dtype=np.int64)
        self.head_bytes = self.head[:_AGREED].tobytes()
        self.numel, self.nbytes = t.numel(), t.numel() * t.element_size()
        self.dtype, self.shape = t.dtype, t.shape  # for the flight recorder (mpipar.flight)
        # this rank's data rides along (all_gather: whether it is USED is decided on the table)
        self.fits = (not self.bad and t.dtype in CARRIER and self.nbytes <= INLINE_BYTES
                     and (algorithm is None or algorithm in _INLINE_ALGORITHMS))
        op = "max" if t.dtype is torch.bool and op == "sum" else op
        self.combine = _PAIR.get(op) if self.fits and op is not None else None
        # fast.c's key: this call's head, its bytes, its kernel, whether MPI_Allreduce moves the data.
        # Riding in the table: floats sum only (torch.maximum's NaN rules stay in Python);
        # larger: the dtypes MPI reduces natively (collectives._NATIVE), not bool
        mpi = None
        if self.combine is not None and t.dtype in FAST_DTYPES and (op == "sum" or FAST_DTYPES[t.dtype] >= 2):
            mpi = 0
        elif (not self.fits and not self.bad and name == "all_reduce" and op in ("sum", "max", "min")
              and t.dtype in FAST_DTYPES and t.dtype is not torch.bool and algorithm in ("auto", "mpi")
              and 0 < self.numel < 2 ** 31):  # MPI's int count
            mpi = 1
        self.fast = None
        if mpi is not None:
            kernel = FAST_DTYPES[t.dtype] * 3 + ("sum", "max", "min").index(op)
            self.fast = np.array([*self.head, self.nbytes, kernel, mpi], dtype=np.int64).tobytes()
        self.fast_mpi = mpi == 1
        self.fast_settings = self.fast_ok = None  # fast_all_reduce's verdict under these settings


def _call(name, t: torch.Tensor, op=None, algorithm=None, dim=0, root=0, free_dim=False, root_name="root") -> _Call:
    try:
        key = (name, t.shape, t.dtype, op, algorithm, dim, root)
        info = _INFO.get(key)
    except TypeError:  # an unhashable op/algorithm: no cache (and certainly unknown)
        return _Call(name, t, op, algorithm, dim, root, free_dim, root_name)
    if info is None:
        if len(_INFO) > 4096:
            _INFO.clear()
        info = _INFO[key] = _Call(name, t, op, algorithm, dim, root, free_dim, root_name)
    return info


class _Buffers:
    """A group's reused (N, slot) table: row r is rank r's slot (gathered in place)."""

    def __init__(self, size: int, rank: int):
        self.table = np.zeros((size, _SLOT), dtype=np.uint8)
        self.heads = self.table[:, : _HEAD * 8].view(np.int64)
        self.agreed = self.heads[:, :_AGREED]
        self.descriptors = self.heads[:, _MINE:]
        self.my_head = self.heads[rank, :_MINE]
        self.my_descriptor = self.heads[rank, _MINE:]
        self.my_addr = self.table[rank].ctypes.data + _HEAD * 8
        self.rank = rank
        self.rows: dict = {}
        self.last, self.expect = None, b""  # the _Call whose head is in this rank's row
        self.gather = None  # the in-place Allgather of `table` (set by buffers())
        self.shm = None  # ... made through this ShmTable (mpipar.comm.agreement.shm_table), or MPI
        self.fast = None  # the small all-reduce in one C call over `table` (mpipar.comm.agreement.fast)
        self.run = None  # the other small collectives in one C call (its `run`: mpipar.comm.agreement.fast_ops)
        self.plans: dict = {}  # _Call -> (settings, fast_ops' plan of that call on this group)
        self.slot_bytes = 0  # the shared table's payload slots, where every rank has the C call (fast_plan._in_slots)
        self.cma = False  # ... and every rank reads its peers' memory (mpipar.comm.agreement.cma, fast_plan._by_cma)
        self.spare = None  # fast_ops' scratch for MPI's pieces (uint8, grown as needed up to its cap)

    @property
    def shared(self) -> bool:
        """Whether the table is exchanged through shared memory."""
        return self.shm is not None

    def typed_rows(self, dtype: torch.dtype, shape) -> tuple:
        """The N payloads (row r: rank r's), shaped `shape` and typed `dtype`."""
        # (dtype, shape) fix the views; the caller's tensor does not
        return self.cached((dtype, shape), lambda: tuple(self.row(k, dtype, shape) for k in range(len(self.table))))

    def cached(self, key, build):
        """Views over the table built once per key (the table never moves)."""
        return memo(self.rows, key, build, 256)

    def row(self, k: int, dtype: torch.dtype, shape) -> torch.Tensor:
        """Row k's payload as one tensor of `shape` (all_gather: each rank's own shape)."""
        n = int(np.prod(shape, dtype=np.int64))
        slot = torch.from_numpy(self.table[k, _HEAD * 8:])
        return slot.view(CARRIER[dtype])[:n].view(dtype).view(shape)

    def free_sizes(self) -> list[int]:
        return self.heads[:, 2].tolist()


def buffers(g) -> _Buffers:
    b = getattr(g, "_inline_buffers", None)
    if b is None:
        b = g._inline_buffers = _Buffers(g.size, g.rank)
        b.gather, b.shm = _allgather_of(g, b.table)
        b.fast = fast.context(g, b.table, b.shm)
        b.run = None if b.fast is None else b.fast.run
        if b.shm is not None:  # payload slots only where EVERY rank's C call can read them (agreed)
            b.slot_bytes = _agreed_min(g, shm_table.PAYLOAD_BYTES if b.run is not None else 0)
        if b.slot_bytes:  # (agreed) and cross-memory attach where every rank can read every peer
            if b.shm.cma is None:  # the same processes as every group of this table: asked once
                b.shm.cma = cma.works(g)
            b.fast.cma = b.cma = b.shm.cma
        if b.shm is not None and b.fast is not None:  # the exchange every other call makes, in C too
            exchange = b.fast.exchange
            b.gather = lambda: exchange(polite_packed())
        g.at_close(lambda: g.__dict__.pop("_inline_buffers", None))  # its C context names the comm Mesh.close frees
    return b


def _agreed_min(g, value: int) -> int:
    """Collective: the smallest of every rank's `value` (a polite wait: the group is crowded)."""
    from mpi4py import MPI

    from ..wait import wait_all

    v = np.array([value], dtype=np.int64)
    wait_all([g.comm.Iallreduce(MPI.IN_PLACE, v, op=MPI.MIN)])
    return int(v[0])


def gathers_in_shared_memory(g) -> bool:
    """Local, the same on every rank: has g's agreement been gathering through shared memory
    (all ranks oversubscribed on one node; decided collectively at its first agreement)?"""
    b = getattr(g, "_inline_buffers", None)
    return b is not None and b.shared


def exchange_args(g, info: _Call, t: torch.Tensor, payload: bool, shared_of=None, prestaged=False) -> tuple:
    """Collective over g (size > 1): the one Allgather. Sends this rank's head, and either
    its data (`payload`) or the symmetric descriptor of `shared_of` (when the group has a
    one-node pool). Raises MpiparError on every rank if the arguments differ or are bad.
    Returns (the group's buffers, the (N, 3) descriptor table or None)."""
    buf = buffers(g)
    _load_head(buf, info, g.size)
    descriptor = None
    if shared_of is not None:
        descriptor = shm_entry.local_descriptor(g, shared_of)
        if prestaged and descriptor is not None:  # `t` sits in the scratch window (symmetric.collectives.prestage)
            descriptor = [PRESTAGED, 0, info.nbytes]
        buf.my_descriptor[:] = descriptor if descriptor is not None else -1
    if payload:
        if t.is_cpu and t.is_contiguous():
            _MEMMOVE(buf.my_addr, t.data_ptr(), info.nbytes)
        else:
            buf.typed_rows(t.dtype, t.shape)[buf.rank].copy_(t.detach())
    _gather_checked(g, buf, info)
    return buf, (buf.descriptors.copy() if descriptor is not None else None)


def _load_head(buf: _Buffers, info: _Call, size: int) -> None:
    """This rank's head in its row (the in-place Allgather leaves the row alone, so only
    when the call shape changed) and the heads every rank must then send."""
    if buf.last is not info:
        buf.my_head[:] = info.head
        buf.last, buf.expect = info, info.head_bytes * size


def _gather_checked(g, buf: _Buffers, info: _Call) -> None:
    """The Allgather of the table; MpiparError on every rank when the heads differ or flag bad
    arguments."""
    buf.gather()
    if info.bad or buf.agreed.tobytes() != buf.expect:
        _disagreement(g, info)


def _disagreement(g, info: _Call):
    """Collective: after a table whose heads differ or flag bad arguments, exchange the full
    signatures and raise the MpiparError that says what differs (on every rank)."""
    check(info.name, exchange(g, np.array(info.sig, dtype=np.int64)), info.need_op, info.need_algorithm,
          info.free is not None, info.root_name)
    raise MpiparError(f"{info.name}: arguments differ across ranks")  # pragma: no cover (hash collision)


def fast_all_reduce(t: torch.Tensor, g, op, algorithm, staged) -> bool:
    """Collective over g (size > 1): the all-reduce in one C call (mpipar.comm.agreement.fast),
    recorded there, when it applies: a small tensor riding in the table, or a larger one that
    would go to MPI's all-reduce anyway. True when `t` is reduced in place. False: nothing
    was communicated, take the Python path. MpiparError on every rank when the arguments
    differ. The conditions are ones all ranks share (agreed settings, the agreed signature,
    the group's pool), except the tensor's layout (CPU, contiguous): a rank whose tensor
    takes the Python path makes the same exchange (the table's blocking Allgather, or the
    same shared-memory exchange, counted in the same ShmTable), then the rank-order
    reduction or MPI's blocking all-reduce, so they meet. `staged`: crowded.staged (whether
    "auto" stages a plain tensor through shared memory instead). A single call after compute
    pays each Python layer on its path several times over (cold caches), so the settings'
    verdict is kept on the call's info, per settings object."""
    buf = g.__dict__.get("_inline_buffers")
    if buf is None or buf.fast is None:
        return False
    info = _call("all_reduce", t, op, algorithm)
    settings = current()
    if info.fast_settings is not settings:
        info.fast_settings, info.fast_ok = settings, _fast_ok(info, algorithm)
    if (not info.fast_ok or not t.is_cpu or not t.is_contiguous()
            or (info.fast_mpi and _elsewhere(g, buf, t, algorithm, staged))):
        return False
    buf.last = None  # the C call writes this rank's head: inline's cached one is stale
    try:
        if buf.shared:  # the exchange waits in C, under the policy in force (mpipar.comm.wait)
            agreed = buf.fast(g, info, algorithm, t.data_ptr(), info.fast, polite_packed())
        else:
            agreed = buf.fast(g, info, algorithm, t.data_ptr(), info.fast)
    except RuntimeError as e:  # an MPI error code
        raise MpiparError(f"all_reduce: {e}") from e
    if not agreed:
        _disagreement(g, info)
    _increment_version((t,))  # an in-place write, as autograd must see it (C wrote the memory)
    return True


def _elsewhere(g, buf, t: torch.Tensor, algorithm, staged) -> bool:
    """Would collectives.py move this all-reduce's data other than by MPI's blocking all-reduce
    after the agreement? A symmetric tensor of the group's one-node pool (the agreement is then
    its entry exchange: its descriptor rides in the table), or a plain one that "auto" stages
    through shared memory where ranks outnumber cores (`staged`: crowded.staged, passed in
    because crowded imports this module)."""
    pool = g.__dict__.get(_POOL)
    if pool is not None and (not pool.one_node or pool.locate(t) is not None):
        return True
    if not buf.shared:  # (staging needs the shared table: ranks with own cores skip the lookups)
        return False
    return staged(g, t, algorithm, "all_reduce", t.numel() * t.element_size()) == "shm"


def _fast_ok(info: _Call, algorithm) -> bool:
    """Whether the settings let `info`'s all-reduce take the C call: validation on; riding in
    the table unless the shared-memory crossover was lowered below it (as agree_all_reduce);
    MPI's all-reduce chosen for a larger one (not the ring), and no test-forced staging."""
    if info.fast is None or not validation_enabled():
        return False
    if info.fast_mpi:
        return tuning.choose("all_reduce", algorithm, info.nbytes, 2) == "mpi" and not staging_forced()
    return not (algorithm == "auto" and tuning.shm_pays("all_reduce", info.nbytes))


def agree_all_reduce(t: torch.Tensor, g, op, algorithm, prestaged=False):
    """Collective over g (size > 1): agree on the arguments (raise MpiparError on every rank
    if they differ or are bad). Returns True when `t` was small and is now reduced in place;
    else the (N, 3) table of every rank's symmetric descriptor [window, offset, nbytes] when
    the group has a one-node symmetric pool (mpipar.comm.symmetric.collectives then needs no entry exchange:
    this Allgather was it), else None. `prestaged`: this rank copied `t` into the pool's scratch
    window before the call (its descriptor then says so: symmetric.collectives.prestage)."""
    info = _call("all_reduce", t, op, algorithm)
    described.info = info  # all_reduce's flight record takes dtype and shape from this cached description
    combine = info.combine
    if combine is not None and algorithm == "auto" and tuning.shm_pays("all_reduce", info.nbytes):
        combine = None  # the crossover lowered below INLINE_BYTES (a setting shared by all ranks)
    if combine is not None and t.is_cpu and t.is_contiguous():
        _small_all_reduce(g, info, t)
        return True
    buf, entry = exchange_args(g, info, t, combine is not None, t if combine is None else None, prestaged)
    if combine is None:
        return entry
    (t.detach() if t.requires_grad else t).copy_(reduce_rows(combine, buf.typed_rows(t.dtype, t.shape)))
    return True


def _small_all_reduce(g, info: _Call, t: torch.Tensor) -> None:
    """exchange_args and the reduction for a contiguous CPU `t` whose data rides in the slot,
    flattened: the hot path of small all-reduces, where each call layer costs a few percent.
    The N rows are reduced in rank order, so every rank gets the same bits."""
    buf = buffers(g)
    _load_head(buf, info, g.size)
    if info.nbytes:
        _MEMMOVE(buf.my_addr, t.data_ptr(), info.nbytes)
    _gather_checked(g, buf, info)
    rows = buf.rows.get(info)
    if rows is None:
        rows = buf.cached(info, lambda: buf.typed_rows(t.dtype, t.shape))
    out = t.detach() if t.requires_grad else t
    info.combine(rows[0], rows[1], out=out)
    for k in range(2, len(rows)):
        info.combine(out, rows[k], out=out)


def reduce_rows(combine, rows) -> torch.Tensor:
    """rows[0] op rows[1] op ... in rank order, as a new tensor."""
    acc = combine(rows[0], rows[1])
    for k in range(2, len(rows)):
        combine(acc, rows[k], out=acc)
    return acc


_MEMMOVE = ctypes.memmove
_increment_version = torch._C._increment_version


def _allgather_of(g, table):
    """(the group's in-place Allgather of its table as a no-argument call, the ShmTable it goes
    through or None); collective (it decides how). Ranks outnumbering cores on one
    node gather through shared memory (mpipar.comm.agreement.shm_table: one round); on
    several nodes, a polite wait (mpipar.comm.wait) on MPI's; ranks with their own cores,
    MPI's blocking Allgather."""
    shared = shm_table.for_group(g, table.shape[1])
    if shared is not None:
        return functools.partial(shared.gather, table), shared
    if g.oversubscribed:
        from ..wait import wait_all

        return (lambda: wait_all([g.comm.Iallgather(in_place(), table)])), None
    return functools.partial(g.comm.Allgather, in_place(), table), None
