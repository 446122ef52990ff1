"""Textbook ring collectives on point-to-point (one Sendrecv-like step per round).

All functions work on a flat contiguous tensor split into `group.size`
chunks with the given element counts (chunk r belongs to rank r).
- reduce-scatter: N-1 steps; at step k rank r sends chunk (r-k-1) to the right
  and adds chunk (r-k-2) from the left; at the end chunk r holds the full sum.
- all-gather: N-1 steps; rank r starts with chunk r and forwards what it got.
- all-reduce = reduce-scatter + all-gather: 2(N-1) steps, 2(N-1)/N of the
  bytes per rank. Every rank ends with bit-identical results (each chunk is
  reduced once, by its owner, then copied).
Traffic uses the group's private communicator `group.p2p`, tag RING_TAG.
"""
from __future__ import annotations

import torch

from .buffers import mpi_buffer, offsets
from .wait import wait_all

RING_TAG = 1 << 14

_COMBINE = {
    "sum": lambda acc, x: acc.add_(x),
    "max": lambda acc, x: torch.maximum(acc, x, out=acc),
    "min": lambda acc, x: torch.minimum(acc, x, out=acc),
}


def _exchange(g, send_t, recv_t):
    comm = g.p2p
    right, left = (g.rank + 1) % g.size, (g.rank - 1) % g.size
    reqs = [comm.Irecv(mpi_buffer(recv_t), source=left, tag=RING_TAG),
            comm.Isend(mpi_buffer(send_t), dest=right, tag=RING_TAG)]
    wait_all(reqs)


def reduce_scatter_(flat: torch.Tensor, g, counts: list[int], op: str = "sum") -> torch.Tensor:
    """In place on `flat`; afterwards chunk g.rank holds the reduction. Returns that chunk."""
    n, r = g.size, g.rank
    offs = offsets(counts)
    chunk = lambda i: flat.narrow(0, offs[i % n], counts[i % n])
    if n == 1:
        return chunk(0)
    scratch = torch.empty(max(counts), dtype=flat.dtype, device=flat.device)
    combine = _COMBINE[op]
    for k in range(n - 1):
        send_i, recv_i = r - k - 1, r - k - 2
        incoming = scratch[: counts[recv_i % n]]
        _exchange(g, chunk(send_i), incoming)
        combine(chunk(recv_i), incoming)
    return chunk(r)


def reduce_scatter_into(src: torch.Tensor, g, counts: list[int], op: str = "sum") -> torch.Tensor:
    """Like reduce_scatter_ but leaves `src` untouched: only two chunk-sized buffers are
    allocated (no full-size copy, whose fresh pages cost more than the ring itself).
    Returns this rank's reduced chunk."""
    n, r = g.size, g.rank
    offs = offsets(counts)
    chunk = lambda i: src.narrow(0, offs[i % n], counts[i % n])
    if n == 1:
        return chunk(0).clone()
    incoming = torch.empty(max(counts), dtype=src.dtype, device=src.device)
    acc = torch.empty(max(counts), dtype=src.dtype, device=src.device)
    send = chunk(r - 1)
    for k in range(n - 1):
        i = (r - k - 2) % n
        _exchange(g, send, incoming[: counts[i]])
        partial = acc[: counts[i]]
        partial.copy_(chunk(i))
        _COMBINE[op](partial, incoming[: counts[i]])
        send = partial
    return send


def all_gather_(flat: torch.Tensor, g, counts: list[int]) -> torch.Tensor:
    """In place: chunk g.rank of `flat` is this rank's part; fills the other chunks."""
    n, r = g.size, g.rank
    offs = offsets(counts)
    chunk = lambda i: flat.narrow(0, offs[i % n], counts[i % n])
    for k in range(n - 1):
        _exchange(g, chunk(r - k), chunk(r - k - 1))
    return flat


def all_reduce_(flat: torch.Tensor, g, counts: list[int], op: str = "sum") -> torch.Tensor:
    reduce_scatter_(flat, g, counts, op)
    return all_gather_(flat, g, counts)
