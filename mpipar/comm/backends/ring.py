"""Textbook ring collectives on point-to-point, pipelined in cache-sized pieces.

All functions work on a flat contiguous tensor split into `group.size`
chunks with the given element counts (chunk r belongs to rank r).
- reduce-scatter: N-1 steps; at step k rank r sends chunk (r-k-1) to the right
  and adds chunk (r-k-2) from the left; at the end chunk r holds the full sum.
- all-gather: N-1 steps; rank r starts with chunk r and forwards what it got.
- all-reduce = reduce-scatter + all-gather: 2(N-1) steps, 2(N-1)/N of the
  bytes per rank. Every rank ends with bit-identical results (each chunk is
  reduced once, by its owner, then copied).
A reduce step moves its chunk in pieces of MPIPAR_RING_PIECE_BYTES (default
1 MiB): piece j+1 is in flight while piece j, just received into one of two
reused scratch buffers, is combined while it is still in cache. Reused scratch matters:
a chunk-sized fresh receive buffer's page faults cost more than the ring
(results/TUNING.md).
Traffic is a `Channel` (mpipar.comm.channel) on the group's private communicator
`group.p2p`, tag RING_TAG; its waits are not recorded apart (the collective is).
"""
from __future__ import annotations

import torch

from ...settings import current
from .. import outputs
from ..buffers import offsets
from ..channel import Channel

RING_TAG = 1 << 14
PIECE_BYTES = 1 << 20

_COMBINE = {
    "sum": lambda out, base, x: torch.add(base, x, out=out),
    "max": lambda out, base, x: torch.maximum(base, x, out=out),
    "min": lambda out, base, x: torch.minimum(base, x, out=out),
}

_SCRATCH: dict = {}  # (dtype, device, slot) -> reused receive buffer (no fresh pages per call)


def piece_elements(itemsize: int) -> int:
    return max(1, (current().ring_piece_bytes or PIECE_BYTES) // itemsize)


def _scratch(like: torch.Tensor, numel: int, slot: int) -> torch.Tensor:
    key = (like.dtype, like.device, slot)
    buf = _SCRATCH.get(key)
    if buf is None or buf.numel() < numel:
        buf = _SCRATCH[key] = torch.empty(max(numel, 1), dtype=like.dtype, device=like.device)
    return buf[:numel]


def _pieces(numel: int, size: int) -> list[tuple[int, int]]:
    return [(lo, min(size, numel - lo)) for lo in range(0, numel, size)]


def _reduce_step(g, send: torch.Tensor, base: torch.Tensor, out: torch.Tensor, op: str) -> None:
    """Send `send` to the right; out = op(base, what the left sends), piece by piece.

    `out` may alias `send` (the running partial of reduce_scatter_into): piece j
    of `out` is written only after piece j of `send` has left.
    """
    ch, right, left = Channel(g.p2p), (g.rank + 1) % g.size, (g.rank - 1) % g.size
    size = piece_elements(base.element_size())
    sp, rp = _pieces(send.numel(), size), _pieces(base.numel(), size)
    bufs = [_scratch(base, min(size, base.numel()), s) for s in (0, 1)]

    def post(j):
        reqs = []
        if j < len(rp):
            reqs.append(ch.post_recv(bufs[j % 2][: rp[j][1]], left, RING_TAG))
        if j < len(sp):
            reqs.append(ch.post_send(send.narrow(0, *sp[j]), right, RING_TAG))
        return reqs

    pending = post(0)
    for j in range(max(len(sp), len(rp))):
        ahead = post(j + 1)
        ch.wait(pending)
        if j < len(rp):
            lo, n = rp[j]
            _COMBINE[op](out.narrow(0, lo, n), base.narrow(0, lo, n), bufs[j % 2][:n])
        pending = ahead


def reduce_scatter_(flat: torch.Tensor, g, counts: list[int], op: str = "sum") -> torch.Tensor:
    """In place on `flat`; afterwards chunk g.rank holds the reduction. Returns that chunk."""
    n, r = g.size, g.rank
    offs = offsets(counts)
    chunk = lambda i: flat.narrow(0, offs[i % n], counts[i % n])
    for k in range(n - 1):
        dst = chunk(r - k - 2)
        _reduce_step(g, chunk(r - k - 1), dst, dst, op)
    return chunk(r)


def reduce_scatter_into(src: torch.Tensor, g, counts: list[int], op: str = "sum") -> torch.Tensor:
    """Like reduce_scatter_ but leaves `src` untouched; the running partial lives in one
    chunk-sized tensor, which is returned (this rank's reduced chunk)."""
    n, r = g.size, g.rank
    offs = offsets(counts)
    chunk = lambda i: src.narrow(0, offs[i % n], counts[i % n])
    if n == 1:
        return chunk(0).clone()
    acc = outputs.empty([max(counts)], src.dtype, src.device)  # returned: recycled when freed
    send = chunk(r - 1)
    for k in range(n - 1):
        i = (r - k - 2) % n
        partial = acc[: counts[i]]
        _reduce_step(g, send, chunk(i), partial, op)
        send = partial
    return send


def all_gather_(flat: torch.Tensor, g, counts: list[int]) -> torch.Tensor:
    """In place: chunk g.rank of `flat` is this rank's part; fills the other chunks."""
    n, r = g.size, g.rank
    offs = offsets(counts)
    chunk = lambda i: flat.narrow(0, offs[i % n], counts[i % n])
    ch, right, left = Channel(g.p2p), (r + 1) % n, (r - 1) % n
    for k in range(n - 1):
        ch.wait([ch.post_recv(chunk(r - k - 1), left, RING_TAG), ch.post_send(chunk(r - k), right, RING_TAG)])
    return flat


def all_reduce_(flat: torch.Tensor, g, counts: list[int], op: str = "sum") -> torch.Tensor:
    reduce_scatter_(flat, g, counts, op)
    return all_gather_(flat, g, counts)
