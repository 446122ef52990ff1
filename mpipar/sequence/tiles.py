"""Which (query chunk, key chunk) pairs a rank attends at each ring step (pure, no MPI).

A rank's queries and the K/V block in hand are lists of global chunk indices
(one chunk for "contiguous", two for "zigzag"). Under a causal mask a pair of
chunks is "full" (query chunk after key chunk), "diag" (same chunk: causal
inside) or "skip" (key chunk in the future). `plan_tiles` turns the pairs
into as few kernel calls as possible, each a rectangle of local chunks that is
either fully visible or a square causal diagonal.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import require
from .layout import num_chunks, rank_chunks

FULL, DIAG, SKIP = "full", "diag", "skip"


@dataclass(frozen=True)
class Tile:
    """One kernel call: local query chunks [q0, q1) x local key chunks [k0, k1)."""

    q0: int
    q1: int
    k0: int
    k1: int
    causal: bool


def pair_kind(q_chunk: int, k_chunk: int, causal: bool) -> str:
    """full / diag / skip for one pair of global chunk indices."""
    if not causal or q_chunk > k_chunk:
        return FULL
    return DIAG if q_chunk == k_chunk else SKIP


def plan_tiles(q_chunks: list[int], k_chunks: list[int], causal: bool) -> list[Tile]:
    """Kernel calls covering exactly the visible pairs of q_chunks x k_chunks.

    Identical ascending chunk lists under a causal mask are one causal call
    (top-left causal on the concatenation is exact there). Otherwise each query
    chunk gets one call per run of consecutive full key chunks and one causal
    call per diagonal pair; vertically adjacent identical full calls merge.
    """
    n_q, n_k = len(q_chunks), len(k_chunks)
    if causal and q_chunks == k_chunks and q_chunks == sorted(set(q_chunks)):
        return [Tile(0, n_q, 0, n_k, True)]
    rows: list[Tile] = []
    for i, qc in enumerate(q_chunks):
        kinds = [pair_kind(qc, kc, causal) for kc in k_chunks]
        j = 0
        while j < n_k:
            if kinds[j] == DIAG:
                rows.append(Tile(i, i + 1, j, j + 1, True))
                j += 1
            elif kinds[j] == FULL:
                start = j
                while j < n_k and kinds[j] == FULL:
                    j += 1
                rows.append(Tile(i, i + 1, start, j, False))
            else:
                j += 1
    return _merge_rows(rows)


def _merge_rows(rows: list[Tile]) -> list[Tile]:
    merged: list[Tile] = []
    for b in rows:
        last = merged[-1] if merged else None
        if (last is not None and not b.causal and not last.causal and last.q1 == b.q0
                and (last.k0, last.k1) == (b.k0, b.k1)):
            merged[-1] = Tile(last.q0, b.q1, b.k0, b.k1, False)
        else:
            merged.append(b)
    return merged


def ring_source(rank: int, step: int, size: int) -> int:
    """The rank whose K/V block this rank holds at ring step `step` (blocks move r -> r+1)."""
    return (rank - step) % size


def step_plan(rank: int, step: int, size: int, layout: str, causal: bool) -> list[Tile]:
    """The kernel calls of `rank` at ring step `step`."""
    src = ring_source(rank, step, size)
    return plan_tiles(rank_chunks(rank, size, layout), rank_chunks(src, size, layout), causal)


def col_span(tiles: list[Tile]) -> tuple[int, int] | None:
    """Hull [k0, k1) of the local key chunks `tiles` touch, or None for no tiles."""
    if not tiles:
        return None
    return min(t.k0 for t in tiles), max(t.k1 for t in tiles)


def hull(a: tuple[int, int] | None, b: tuple[int, int] | None) -> tuple[int, int] | None:
    """Smallest span holding spans a and b (None: empty)."""
    if a is None or b is None:
        return a if b is None else b
    return min(a[0], b[0]), max(a[1], b[1])


def travel_span(owner: int, hops: int, size: int, layout: str, causal: bool) -> tuple[int, int] | None:
    """Key chunks of `owner`'s block whose gradient the ranks owner+1 .. owner+hops have touched
    (rank owner+j holds that block at ring step j): the part of the travelling dK/dV that is
    not zero after `hops` hops, None while it is all zero."""
    span = None
    for j in range(1, hops + 1):
        span = hull(span, col_span(step_plan((owner + j) % size, j, size, layout, causal)))
    return span


def block_pairs(block: Tile, chunk: int) -> int:
    """Number of (query, key) token pairs one kernel call attends (chunk = tokens per chunk)."""
    nq, nk = (block.q1 - block.q0) * chunk, (block.k1 - block.k0) * chunk
    if not block.causal:
        return nq * nk
    return nq * (nq + 1) // 2  # square causal block


def attended_pairs(seq_len: int, size: int, layout: str, causal: bool = True) -> list[int]:
    """Per rank: how many (query, key) token pairs its ring attention computes."""
    n = num_chunks(size, layout)
    require(seq_len % n == 0, f"seq_len {seq_len} is not divisible by {n} chunks")
    chunk = seq_len // n
    return [sum(block_pairs(b, chunk) for s in range(size) for b in step_plan(r, s, size, layout, causal))
            for r in range(size)]
