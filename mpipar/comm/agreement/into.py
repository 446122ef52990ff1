"""The `out=` argument of all_gather: checks every rank agrees on, and in-place detection.

`code(t, out, dim)` is what a rank puts in its argument agreement (the signature's
root slot, mpipar.comm.agreement.protocol): NO_OUT without `out`, BAD_OUT when `out` cannot
hold the result whatever the other ranks send (dtype, device, layout, or a size
other than t's off `dim`), else out's size along `dim`. The agreement makes every
rank hold the same code, so `check` raises the same MpiparError on every rank.
"""
from __future__ import annotations

import torch

from ...errors import MpiparError
from ..buffers import offsets

NO_OUT = -1
BAD_OUT = -3  # not -2: the agreement hashes the signature and in CPython hash(-1) == hash(-2)


def _fits(t: torch.Tensor, out, dim: int) -> bool:
    return (isinstance(out, torch.Tensor) and out.dtype == t.dtype and out.device == t.device
            and out.dim() == t.dim() and out.is_contiguous()
            and all(out.shape[i] == t.shape[i] for i in range(t.dim()) if i != dim))


def code(t: torch.Tensor, out, dim: int) -> int:
    if out is None:
        return NO_OUT
    if not 0 <= dim < t.dim() or not _fits(t, out, dim):
        return BAD_OUT
    return int(out.shape[dim])


def check(t: torch.Tensor, out, dim: int, total: int) -> None:
    """Raise unless `out` holds the gathered result (`total` along `dim`); same verdict and text
    on every rank once the agreement passed."""
    if code(t, out, dim) != total:
        shape = list(t.shape)
        shape[dim] = total
        raise MpiparError(f"all_gather: out must be a contiguous {t.dtype} tensor on t's device of shape "
                          f"{tuple(shape)} (the concatenation along dim {dim})")


def own_slice(out: torch.Tensor, dim: int, sizes: list[int], rank: int) -> torch.Tensor:
    return out.narrow(dim, offsets(sizes)[rank], sizes[rank])


def is_own_slice(t: torch.Tensor, out: torch.Tensor, dim: int, sizes: list[int], rank: int) -> bool:
    """Is `t` exactly this rank's slice of `out` (an in-place gather: nothing to copy in)?"""
    mine = own_slice(out, dim, sizes, rank)
    return (t.data_ptr() == mine.data_ptr() and t.shape == mine.shape
            and (t.stride() == mine.stride() or t.numel() <= 1))
