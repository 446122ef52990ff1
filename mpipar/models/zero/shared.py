"""ZeRO's flat buffers in node shared memory: reduce-scatter and all-gather without MPI.

When the data group lives on one node (and MPIPAR_SYMMETRIC_BUCKETS is not 0;
1 forces it where it applies), ShardedBuckets keeps its flat buffers in
symmetric tensors (comm.symmetric_empty: one per dtype, allocated once) and
moves them with mpipar.comm.symmetric.blocks instead of MPI's
Ireduce_scatter_block / Iallgather, which copy through MPICH's own buffers:
- zero=1: the flat gradient buffers (every `.grad` a view into them) and the
  flat parameters: `finish` reduce-scatters every bucket in one call (two
  node barriers), `after_step` pushes this rank's stepped shards into every
  peer's parameters in one call;
- zero=2: the flat parameters as zero=1, and a staging buffer (the largest
  bucket) into which a bucket's gradients are packed and reduce-scattered at
  once, in the backward hook, accumulating into the shard;
- zero=3: the parameter shards; a block is materialised by pulling every
  rank's shard into its own full buffer (plain memory, freed after use) when
  it is needed: no prefetch, since on the CPU the copies are this rank's work
  either way; gradients as zero=2.
A reduction is this rank's CPU work in shared memory as in MPI (no engine
progresses either in the background), so the overlap given up costs nothing
on the CPU. zero 2 and 3 reduce and gather synchronously inside the forward
and backward: a rank blocked there does not progress the MPI messages that
a pipeline peer may wait for, so they take this path only when pp == 1
(zero=1 reduces in `finish` and gathers after the step: any layout).
The numbers are those of the MPI path (sums in rank order: bit for bit at 2
ranks, in the last bit at more, where MPI's order may differ).
"""
from __future__ import annotations

import torch

from ...agree import agree_ints
from ...comm.symmetric import blocks
from ...comm.symmetric.pool import free_symmetric, pool_of, symmetric_empty
from ..symmetric_buckets import resolve

ALIGN = 64  # bytes: every bucket's buffer starts on its own cache line


def use_shared(group, zero: int, pp: int, device) -> bool:
    """Collective over `group`: do ZeRO's buffers live in shared memory (see the module doc)?"""
    if group.size == 1:
        return False
    mode = resolve(None)
    code = {None: 0, False: 1, True: 2}[mode]
    applies = int(device.type == "cpu" and (zero == 1 or pp == 1))
    agree_ints(group.comm, [code, applies],
               lambda lo, hi: f"ZeRO: [shared-memory mode, applies] differ across the data group "
                              f"({lo.tolist()} vs {hi.tolist()})")
    if mode is False or not applies:
        return False
    return pool_of(group, create=True).one_node  # collective; the same answer on every rank


class Arena:
    """Flat buffers of given sizes back to back (64-byte aligned) in one symmetric tensor per
    dtype. Collective creation, in the same order on every rank."""

    def __init__(self, group, sizes: list):
        self.group, self.starts, ends = group, [], {}
        for numel, dtype in sizes:
            unit = max(1, ALIGN // dtype.itemsize)
            start = -(-ends.get(dtype, 0) // unit) * unit
            self.starts.append(start)
            ends[dtype] = start + numel
        self.sizes = list(sizes)
        self.tensors = {dt: symmetric_empty((n,), dt, group) for dt, n in ends.items()}

    def view(self, i: int) -> torch.Tensor:
        numel, dtype = self.sizes[i]
        return self.tensors[dtype][self.starts[i]:self.starts[i] + numel]

    def by_dtype(self, indices):
        """{dtype: [index, ...]} of these buffers (calls go one per dtype, in a fixed order)."""
        out: dict = {}
        for i in indices:
            out.setdefault(self.sizes[i][1], []).append(i)
        return out


class SharedBuffers:
    """The symmetric buffers of one ShardedBuckets (see the module doc). Build with
    `layout(groups)` before the FlatBuckets, then `attach(buckets)`."""

    def __init__(self, group, zero: int, groups: list, device):
        self.group, self.zero = group, zero
        d = group.size
        padded = []
        for ps in groups:
            numel = sum(p.numel() for p in ps)
            padded.append((-(-numel // d)) * d)
        dtypes = [ps[0].dtype for ps in groups]
        self.params = self.grads = self.shards = None
        self.staging = {}
        if zero < 3:
            self.params = Arena(group, [(n, dt) for n, dt in zip(padded, dtypes)])
        else:
            self.shards = Arena(group, [(n // d, dt) for n, dt in zip(padded, dtypes)])
        if zero == 1:
            self.grads = Arena(group, [(n, dt) for n, dt in zip(padded, dtypes)])
        else:
            for n, dt in zip(padded, dtypes):
                self.staging[dt] = max(self.staging.get(dt, 0), n)
            self.staging = {dt: symmetric_empty((n,), dt, group) for dt, n in self.staging.items()}

    def full(self, i: int):
        return None if self.params is None else self.params.view(i)

    def shard(self, i: int):
        return None if self.shards is None else self.shards.view(i)

    def grad_full(self, i: int) -> torch.Tensor:
        return self.grads.view(i).zero_()

    # ---- collectives (in the same order on every rank of the group) ---------------------------
    def reduce_scatter_all(self, buckets) -> None:
        """zero=1: every bucket's reduced gradient shard into a new b.acc (reduce dtype)."""
        for dtype, idx in self.grads.by_dtype(range(len(buckets))).items():
            segs = []
            for i in idx:
                b = buckets[i]
                b.acc = torch.empty(b.shard_numel, dtype=b.reduce_dtype)
                segs.append((self.grads.starts[i], b.acc))
            blocks.reduce_scatter_blocks(self.grads.tensors[dtype], self.group, segs)

    def reduce_scatter_packed(self, b) -> None:
        """zero 2/3: pack bucket b's gradients (dropping them) and reduce-scatter them into b.acc."""
        stage = self.staging[b.dtype][:b.padded]
        stage[b.numel:].zero_()
        for p, part in b.param_views(stage):
            if p.grad is None:
                part.zero_()
            else:
                part.copy_(p.grad.reshape(-1))
                p.grad = None
        first = b.acc is None
        if first:
            b.acc = torch.empty(b.shard_numel, dtype=b.reduce_dtype)
        blocks.reduce_scatter_blocks(self.staging[b.dtype], self.group, [(0, b.acc)], accumulate=not first)

    def all_gather_all(self, buckets) -> None:
        """zero 1/2: this rank's shards into every peer's flat parameters (in place)."""
        for dtype, idx in self.params.by_dtype(range(len(buckets))).items():
            blocks.all_gather_blocks(self.params.tensors[dtype], self.group,
                                     [(self.params.starts[i], buckets[i].shard_numel) for i in idx])

    def gather(self, buckets, index_of) -> None:
        """zero=3: materialise these buckets' full parameters (already allocated) from the shards."""
        for dtype, idx in self.shards.by_dtype(index_of(b) for b in buckets).items():
            by_index = {index_of(b): b for b in buckets}
            blocks.gather_pieces(self.shards.tensors[dtype], self.group,
                                 [(self.shards.starts[i], by_index[i].full) for i in idx])

    # ---- teardown ----------------------------------------------------------------------------
    def close(self, buckets) -> None:
        """Collective: move the buckets' tensors out of shared memory (the model stays usable),
        then free the windows."""
        with torch.no_grad():
            for b in buckets:
                if self.params is not None:
                    full = b.full.clone()
                    b.full = full
                    for p, part in b.param_views(full):
                        p.data = part.view(p.shape)
                    b.shard = full[b.lo:b.hi]
                if self.shards is not None:
                    b.shard = b.shard.clone()
                if not b.separate_master:
                    b.master.data = b.shard
                if self.grads is not None:
                    b.grad_full = None
                    for p in b.params:
                        p.grad = None
        self.params = self.grads = self.shards = None
        self.staging = {}
        free_symmetric(self.group)
