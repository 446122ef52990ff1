"""Agreement on a collective's arguments before any data moves.

Every collective first exchanges a small int signature (op, algorithm,
dtype, shape, ...) with one Allgather. Every rank then runs the same checks
on the same gathered table, so a mismatch (or an unknown op on one rank)
raises the same MpiparError on every rank instead of hanging.
"""
from __future__ import annotations

import numpy as np

from ...errors import MpiparError
from ..buffers import DTYPE_CODES, MAX_NDIM
from .into import BAD_OUT, NO_OUT
from ..backends.mpi import in_place, mpi_op
from ...settings import current
from ..wait import complete

OPS = ("sum", "max", "min")
ALGORITHMS = ("auto", "mpi", "ring", "shm", "hier")
_DTYPES = {code: str(dt) for dt, code in DTYPE_CODES.items()}
_UNKNOWN = -1


BAD_DIM = -99


def norm_dim(dim: int, ndim: int) -> int:
    """dim in [0, ndim), or BAD_DIM (checked after the exchange, so every rank raises)."""
    if not isinstance(dim, int) or not -max(ndim, 1) <= dim < max(ndim, 1):
        return BAD_DIM
    return dim % max(ndim, 1)


def code(value, known) -> int:
    return known.index(value) if value in known else _UNKNOWN


def signature(t, op=None, algorithm=None, dim: int = 0, root: int = 0) -> tuple:
    """[op, algorithm, dtype, ndim, dim, root, shape (padded to MAX_NDIM)]."""
    shape = list(t.shape)
    if len(shape) > MAX_NDIM:  # fold trailing dims so the row keeps its length (ranks still agree)
        shape = shape[: MAX_NDIM - 1] + [int(np.prod(shape[MAX_NDIM - 1:]))]
    head = [
        _UNKNOWN if op is None else code(op, OPS),
        _UNKNOWN if algorithm is None else code(algorithm, ALGORITHMS),
        DTYPE_CODES.get(t.dtype, _UNKNOWN), t.dim(), dim, root,
    ]
    return tuple(head + shape + [0] * (MAX_NDIM - len(shape)))


def agree(name: str, g, sig: np.ndarray, need_op: bool, need_algorithm: bool, free_dim: bool = False,
          root_name: str = "root"):
    """Collective: check `sig` is consistent across the group; raise on every rank if not.

    Fast path: one tiny collective on a hash of the signature (a few microseconds).
    Only on a mismatch do ranks exchange full signatures to name the culprit.
    `free_dim` (one rank only; all_gather over more ranks agrees, sizes included, in
    mpipar.comm.agreement.inline_ops): returns [the size along the free dim], else None.
    `root_name`: what the signature's root slot holds, for error messages ("out": all_gather's
    out= code, mpipar.comm.agreement.into).
    """
    bad = int((need_op and sig[0] == _UNKNOWN) or (need_algorithm and sig[1] == _UNKNOWN)
              or sig[2] == _UNKNOWN or sig[4] == BAD_DIM)
    if g.size == 1:
        if bad:
            check(name, np.array([sig], dtype=np.int64), need_op, need_algorithm, free_dim, root_name)
        return [int(sig[6 + int(sig[4])])] if free_dim else None
    if free_dim:
        raise AssertionError("validate.agree: free_dim over several ranks is mpipar.comm.agreement.inline_ops' job")
    if not bad and not validation_enabled():
        return None  # MPIPAR_VALIDATE=0: trust the caller, skip the agreement collective
    h = hash(sig)  # (hash(-1) == hash(-2): no slot may hold both; codes are -1 for "none", <= -3 else)
    # (the checks run on Python lists: numpy's per-call overhead on a few elements costs more
    # than the collective itself)
    both = np.array([h, -h, bad], dtype=np.int64)
    complete(g, "Allreduce", in_place(), both, op=mpi_op("max"))
    v = both.tolist()
    if v[0] != -v[1] or v[2]:
        check(name, exchange(g, np.array(sig, dtype=np.int64)), need_op, need_algorithm, free_dim, root_name)
        raise MpiparError(f"{name}: arguments differ across ranks")  # pragma: no cover (hash collision)
    return None


def validation_enabled() -> bool:
    """MPIPAR_VALIDATE=0 skips the cross-rank agreement of arguments (one tiny collective
    per call). Local checks still run; a mismatch across ranks may then hang."""
    return current().validate != "0"


def exchange(g, sig: np.ndarray) -> np.ndarray:
    """Allgather the signatures: a (size, len) table, row r from rank r."""
    table = np.empty((g.size, sig.size), dtype=np.int64)
    if g.size == 1:
        table[0] = sig
    else:
        g.comm.Allgather(sig, table)
    return table


def check(name: str, table: np.ndarray, need_op: bool, need_algorithm: bool, free_dim: bool = False,
          root_name: str = "root") -> None:
    """Raise MpiparError (same text on every rank) if the table is not consistent."""
    for col, what, known, needed in ((0, "op", OPS, need_op), (1, "algorithm", ALGORITHMS, need_algorithm)):
        if needed and (table[:, col] == _UNKNOWN).any():
            bad = int(np.argmax(table[:, col] == _UNKNOWN))
            raise MpiparError(f"{name}: unknown {what} on rank {bad}; expected one of {list(known)}")
    if (table[:, 4] == BAD_DIM).any():
        r = int(np.argmax(table[:, 4] == BAD_DIM))
        raise MpiparError(f"{name}: dim (or root) out of range for a {int(table[r, 3])}-d tensor "
                          f"on rank {r} (group size {table.shape[0]})")
    if (table[:, 2] == _UNKNOWN).any():
        raise MpiparError(f"{name}: unsupported dtype on rank {int(np.argmax(table[:, 2] == _UNKNOWN))}")
    ref = table[0].copy()
    cmp = table.copy()
    if free_dim:
        d = 6 + int(ref[4])
        cmp[:, d] = ref[d]
    diff = np.nonzero((cmp != ref).any(axis=1))[0]
    if diff.size:
        r = int(diff[0])
        raise MpiparError(f"{name}: arguments differ across ranks: rank 0 has {_describe(table[0], root_name)}, "
                          f"rank {r} has {_describe(table[r], root_name)}")


_OUT_CODES = {NO_OUT: "none", BAD_OUT: "unusable"}


def _describe(row, root_name: str = "root") -> str:
    ndim = int(row[3])
    return (f"op={_name(row[0], OPS)} algorithm={_name(row[1], ALGORITHMS)} dtype={_DTYPES.get(int(row[2]), '?')} "
            f"shape={tuple(int(x) for x in row[6:6 + ndim])} dim={int(row[4])} "
            f"{root_name}={_OUT_CODES.get(int(row[5]), int(row[5])) if root_name == 'out' else int(row[5])}")


def _name(c, known) -> str:
    return known[int(c)] if 0 <= c < len(known) else "?"
