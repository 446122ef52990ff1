"""Checks shared by the tensor-parallel layers: constructor arguments and forward inputs.

Forward checks are collective over the group: every rank's local verdict and
the shapes of its inputs go through ONE small integer all-reduce, so a bad
input on any rank (or inputs whose shapes differ between ranks) raises the same
MpiparError on every rank before any data moves. Set a layer's
`check_inputs = False` to skip it (then only local checks remain).
"""
from __future__ import annotations

import zlib

import numpy as np
import torch

from ..comm.buffers import DTYPE_CODES, MAX_NDIM
from ..comm.wait import wait_all
from ..errors import MpiparError, require
from ..agree import agree, agree_ints
from ..mesh import as_group


def group_of(group, what: str):
    """`as_group` with a message naming the layer."""
    require(group is not None, f"{what}: a process group is required (an mpipar.Group or mpi4py communicator)")
    return as_group(group)


def positive(n: int, what: str, name: str) -> int:
    """n, or MpiparError unless n is a positive int (constructor arguments: same on every rank)."""
    require(isinstance(n, int) and not isinstance(n, bool) and n > 0,
            f"{what}: {name} must be a positive int, got {n!r}")
    return n


def divisible(n: int, g, what: str, name: str) -> int:
    """n // g.size, or MpiparError (same on every rank: constructor arguments)."""
    positive(n, what, name)
    require(n % g.size == 0, f"{what}: {name} = {n} is not divisible by the tensor-parallel size {g.size}")
    return n // g.size


def _as_int(v) -> int:
    """An int standing for a constructor argument (bad types map to a fixed sentinel)."""
    if isinstance(v, (bool, int)):
        return int(v)
    return -(2**62) + zlib.crc32(repr(v).encode())  # deterministic on every rank (unlike hash())


def agree_config(g, what: str, values) -> None:
    """Collective: constructor arguments must be equal on every rank of the group.

    Called FIRST in every constructor, before the checks of the arguments
    themselves: ranks that got different arguments could otherwise fail
    different local checks, and some would wait here alone.
    """
    if g.size == 1:
        return
    vals = [_as_int(v) for v in values]

    def describe(lo, hi):
        return f"{what}: constructor arguments differ across the ranks of the group (min {list(lo)}, max {list(hi)})"

    agree_ints(g.comm, vals, describe)


def _shape_code(t) -> list[int]:
    if not isinstance(t, torch.Tensor):
        return [-2] * (2 + MAX_NDIM)
    shape = list(t.shape)[:MAX_NDIM]
    return [DTYPE_CODES.get(t.dtype, -1), t.dim()] + shape + [0] * (MAX_NDIM - len(shape))


def agree_input(g, what: str, local_error: str | None, tensors=()) -> None:
    """Collective: raise on every rank if any rank's input is bad or shapes differ across ranks.

    `local_error` is this rank's verdict (None: fine). `tensors` are the inputs
    whose dtype and shape must be equal on every rank. One Iallreduce(MAX) of a
    few int64 when all is well; an extra allgather of the messages otherwise.
    """
    if g.size == 1:
        if local_error is not None:
            raise MpiparError(local_error)
        return
    from mpi4py import MPI

    codes = np.array([c for t in tensors for c in _shape_code(t)], dtype=np.int64)
    buf = np.concatenate([[1 if local_error is not None else 0], codes, -codes]).astype(np.int64)
    wait_all([g.comm.Iallreduce(MPI.IN_PLACE, buf, op=MPI.MAX)])
    if buf[0]:
        agree(g.comm, local_error)
    hi, lo = buf[1:1 + codes.size], -buf[1 + codes.size:]
    if not np.array_equal(hi, lo):
        raise MpiparError(f"{what}: input dtypes or shapes differ across the ranks of the group")


def last_dim_error(x: torch.Tensor, expected: int, what: str, min_dim: int = 2) -> str | None:
    """Message if x is not a floating tensor of >= min_dim dims with last dim `expected`."""
    if not isinstance(x, torch.Tensor):
        return f"{what}: expected a torch.Tensor input, got {type(x).__name__}"
    if not x.is_floating_point():
        return f"{what}: expected a floating-point input, got {x.dtype}"
    if x.dim() < min_dim:
        return f"{what}: expected an input of at least {min_dim} dims, got shape {tuple(x.shape)}"
    if x.shape[-1] != expected:
        return f"{what}: expected last dim {expected}, got input of shape {tuple(x.shape)}"
    return None


def seq_error(x: torch.Tensor, g, what: str) -> str | None:
    """Message if the sequence dim (-2) of a full-sequence tensor does not divide by the group."""
    if x.shape[-2] % g.size:
        return (f"{what}: sequence length {x.shape[-2]} (dim -2) is not divisible by the "
                f"tensor-parallel size {g.size} (sequence_parallel=True)")
    return None


def attention_input(layer, x: torch.Tensor) -> None:
    """The input checks of a tensor-parallel attention layer (hidden size; a [batch, seq, hidden]
    input under sequence parallelism), agreed over its tp group and, if any, its sp group."""
    err = last_dim_error(x, layer.hidden, layer._what)
    if err is None and layer.sp_mode is not None and x.dim() != 3:
        err = f"{layer._what}: sp_mode={layer.sp_mode!r} needs a [batch, seq, hidden] input, got {tuple(x.shape)}"
    if layer.check_inputs:
        agree_input(layer.group, layer._what, err, [x])
        if layer.sp_group is not None:
            agree_input(layer.sp_group, layer._what, err, [x])
    else:
        require(err is None, err or "")

