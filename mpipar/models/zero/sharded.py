"""ShardedBuckets: ZeRO 1, 2 and 3 over the data-parallel group (what `GPT(cfg, mesh, zero=z)` uses).

Same protocol as GradBuckets (`start(m)`, backward(s), `finish()`), then the
optimizer steps `masters()` (one flat shard per bucket) and `after_step()`
writes the new values back into the parameters.

- zero=1: every bucket's gradients accumulate in one persistent flat buffer
  (each `.grad` is a view into it); when the bucket's last gradient of the step
  has arrived it is reduce-scattered (MPI Ireduce_scatter_block, overlapped
  with the rest of the backward) into this rank's shard. After the step the
  shards are all-gathered in place into the flat parameter buffer.
- zero=2: no persistent gradient buffer: a bucket is packed and
  reduce-scattered as soon as each microbatch's gradients of it are complete
  (accumulating into the shard), and the parameters' `.grad` are dropped.
- zero=3: parameters are sharded too. Every transformer block is its own
  bucket, materialised only around its forward and its backward (see
  gathering.py); the ends (embeddings, final LayerNorm, head) are one bucket
  gathered for the whole step.

On one node the flat buffers live in shared memory and these collectives run
there instead of on MPI (mpipar.models.zero.shared: zero=1 reduces every
bucket in `finish`, zero 2/3 each bucket at once in the hook).

Buckets and collectives are launched in one fixed order (bucket index, then
microbatch round) on every rank, as in GradBuckets; every collective is
non-blocking on a private duplicate of the data group. Gradients are averaged
over the group (dp x sp) and reduced in float32 for bf16/fp16. Then the
parameters that Megatron sequence parallelism leaves partial over tp get their
shard elements summed over tp, and the tied embedding's shard is summed over
the first and last stage (it sits alone in a bucket on both, so the shards
line up).
"""
from __future__ import annotations

import contextlib

import torch

from ... import comm
from ...errors import MpiparError
from ..data_parallel import _pack
from .flat import FlatBucket
from .gathering import BlockGathering
from .nonblocking import post, wait
from .shared import SharedBuffers, use_shared
from ...flight.recorder import Channel, begin, done, recorded


_instances = [0]  # the number of the last ShardedBuckets this process built (agreed over its group)


class ShardedBuckets:
    """The ZeRO stage `zero` of a ParallelGPT's parameters over its data group (collective
    construction; the model's parameters become views into the buckets)."""

    def __init__(self, model, zero: int, bucket_bytes: int):
        self.zero, self.model = zero, model
        self.group = model.data_group.dup("zero")
        # the flight recorder's names of ZeRO's reduce-scatters and all-gathers (see nonblocking.py);
        # the verdict lines calls up by group name: one name per instance, agreed over the group
        from mpi4py import MPI

        _instances[0] = recorded(self.group, "zero agree", self.group.comm.allreduce, _instances[0] + 1, op=MPI.MAX)
        name = f"{model.data_group.name} zero#{_instances[0]}"
        self.flight_rs = Channel(self.group.comm, f"{name} reduce_scatter")
        self.flight_ag = Channel(self.group.comm, f"{name} all_gather")
        d, r = self.group.size, self.group.rank
        self.tp = model.mesh.tp
        self.tied_group = model.tied_group
        specs = {id(s.param): s for s in model.specs()}
        params = [p for p in dict.fromkeys(model.parameters()) if p.requires_grad]
        tied = [p for p in params if self.tied_group is not None and specs[id(p)].name == "tok_emb.weight"]
        blocks = [model.blocks[key] for key in model.blocks] if zero == 3 else []
        block_params = [[p for p in m.parameters() if p.requires_grad] for m in blocks]
        if zero == 3:  # one bucket per block (backward order), then the tied embedding, then the ends
            in_blocks = {id(p) for ps in block_params for p in ps}
            rest = [p for p in params if id(p) not in in_blocks and all(p is not t for t in tied)]
            groups = [ps for ps in reversed(block_params) if ps] + [g for g in (tied, rest) if g]
        else:
            untied = [p for p in params if all(p is not t for t in tied)]
            groups = [b.params for b in _pack(list(reversed(untied)), bucket_bytes)] + ([tied] if tied else [])
        device = params[0].device if params else torch.device("cpu")
        self.shared = SharedBuffers(self.group, zero, groups, device) \
            if use_shared(self.group, zero, model.mesh.pp.size, device) else None
        self.buckets = [FlatBucket(g, i, d, r, keep_full=zero < 3, full=self.shared and self.shared.full(i),
                                   shard=self.shared and self.shared.shard(i)) for i, g in enumerate(groups)]
        self._bucket_of = {id(p): b for b in self.buckets for p in b.params}
        self._tied_bucket = self._bucket_of[id(tied[0])] if tied else None
        self._hooks, self.gathering = [], None
        if zero == 3:
            units = [(m, self._bucket_of[id(ps[0])]) for m, ps in zip(blocks, block_params) if ps]
            self.gathering = BlockGathering(model, self.buckets, units, self.group.comm, self.shared, self.flight_ag)
        self._norm_spans, self._tp_spans = self._spans(specs)
        if zero == 1:
            for b in self.buckets:
                b.grad_full = torch.zeros(b.padded, dtype=b.dtype, device=b.device) if self.shared is None \
                    else self.shared.grad_full(b.index)
        self._grad_views = {id(p): g for b in self.buckets if zero == 1 for p, g in b.param_views(b.grad_full)}
        self._hooks += [p.register_post_accumulate_grad_hook(self._on_grad) for b in self.buckets for p in b.params]
        self._armed, self._overrun = False, None
        self._pending: list = []   # (Pending, bucket, recv) in launch order
        self.closed = False

    # ---- layout facts ------------------------------------------------------------------------
    def _spans(self, specs):
        """Per bucket: shard spans counted by the global norm, spans summed over tp (sequence parallel)."""
        norm, tp_sum = [], []
        for b in self.buckets:
            nb, tb = [], []
            for f in b.fragments:
                s = specs[id(b.params[f.index])]
                counted = s.sharded or self.tp.rank == 0
                if s.primary and counted and not (s.sharded and self.tp.rank % s.replicas):  # one K/V copy
                    nb.append((f.shard_lo, f.shard_hi))
                if s.sp_reduce:
                    tb.append((f.shard_lo, f.shard_hi))
            norm.append(nb)
            tp_sum.append(tb)
        return norm, tp_sum

    def masters(self) -> list:
        """The tensors the optimizer steps: this rank's flat shard of every bucket."""
        return [b.master for b in self.buckets]

    # ---- one step ----------------------------------------------------------------------------
    def start(self, expected: int = 1) -> None:
        if self._armed:
            raise MpiparError("ZeRO: the previous step was not finished")
        self._expected = int(expected)
        self._rounds = 1 if self.zero == 1 else self._expected
        self._count = {id(p): 0 for b in self.buckets for p in b.params}
        self._cursor = (0, 0)
        self._overrun = None
        for b in self.buckets:
            b.acc = None
            b.master.grad = None
        for b in self.buckets:  # zero=1: each .grad becomes its view of grad_full at its first gradient
            for p in b.params:
                p.grad = None
        if self.gathering is not None:
            self.gathering.start_step()
        self._armed = True

    def _on_grad(self, p) -> None:
        if not self._armed:
            return
        n = self._count[id(p)] + 1
        self._count[id(p)] = n
        b = self._bucket_of[id(p)]
        if self.zero == 1 and n == 1:
            self._into_grad_full(p)
        if n > self._expected:
            self._overrun = f"a parameter of shape {tuple(p.shape)} accumulated more gradients than expected"
        if self.gathering is not None:
            self.gathering.on_grad(b)
        self._launch_ready()
        self._reap()

    def _into_grad_full(self, p) -> None:
        """zero=1, p's first gradient of the step: copied into its view of the bucket's persistent
        buffer, which becomes p.grad (later microbatches accumulate there in place). One pass
        over the gradients, where zeroing the buffer at `start` and accumulating into it took
        three."""
        view = self._grad_views[id(p)]
        if p.grad is None:
            view.zero_()
        else:
            view.copy_(p.grad.reshape(-1))
        p.grad = view.view(p.shape)

    def _ready(self, b, rnd: int) -> bool:
        need = self._expected if self._rounds == 1 else rnd + 1
        return min(self._count[id(p)] for p in b.params) >= need

    def _launch_ready(self, force: bool = False) -> None:
        rnd, i = self._cursor
        while rnd < self._rounds and (force or self._ready(self.buckets[i], rnd)):
            self._reduce_scatter(self.buckets[i])
            i += 1
            if i == len(self.buckets):
                rnd, i = rnd + 1, 0
        self._cursor = (rnd, i)

    def _reduce_scatter(self, b) -> None:
        from mpi4py import MPI

        if self.shared is not None:
            if self.zero > 1:  # at once, in shared memory (zero=1: every bucket in `finish`)
                slot = begin(self.flight_rs, "reduce_scatter", b.dtype, (b.padded,), "shm")
                try:
                    self.shared.reduce_scatter_packed(b)
                finally:
                    done(slot)
            return
        if self.zero == 1:
            send = b.grad_full if b.grad_full.dtype == b.reduce_dtype else b.grad_full.to(b.reduce_dtype)
        else:
            send = torch.empty(b.padded, dtype=b.reduce_dtype, device=b.device)
            send[b.numel:].zero_()
            for p, part in b.param_views(send):
                if p.grad is None:
                    part.zero_()
                else:
                    part.copy_(p.grad.reshape(-1))
                    p.grad = None
        recv = torch.empty(b.shard_numel, dtype=b.reduce_dtype, device=b.device)
        op = post(lambda s, o: self.group.comm.Ireduce_scatter_block(s, o, op=MPI.SUM), send, recv,
                  (self.flight_rs, "reduce_scatter"))
        self._pending.append((op, b, recv))

    def _reap(self, block: bool = False) -> None:
        """Fold completed reduce-scatters (in launch order) into the buckets' gradient shards."""
        from mpi4py import MPI

        done = 0
        if block:
            wait(op for op, _, _ in self._pending)
            done = len(self._pending)
        else:
            while done < len(self._pending) and MPI.Request.Test(self._pending[done][0].request):
                done += 1
        for op, b, recv in self._pending[:done]:
            op.complete()
            if b.acc is None:
                b.acc = recv
            else:
                b.acc += recv
        del self._pending[:done]

    def finish(self) -> None:
        """Launch what is left, wait, and leave each master's .grad = its shard of the mean gradient."""
        if not self._armed:
            return
        self._armed = False
        if self.zero == 1:  # a parameter without a gradient this step contributes zeros
            for b in self.buckets:
                for p in b.params:
                    if self._count[id(p)] == 0:
                        self._into_grad_full(p)
        self._launch_ready(force=True)
        self._reap(block=True)
        if self.shared is not None and self.zero == 1:
            slot = begin(self.flight_rs, "reduce_scatter", None, None, "shm")
            try:
                self.shared.reduce_scatter_all(self.buckets)
            finally:
                done(slot)
        scale = 1.0 / self.group.size
        with torch.no_grad():
            for b in self.buckets:
                b.master.grad = b.acc.mul_(scale)
                b.acc = None
        self._tp_sum()
        if self._tied_bucket is not None:
            comm.all_reduce(self._tied_bucket.master.grad, self.tied_group)
        if self.gathering is not None:
            self.gathering.end_step()
        if self._overrun:
            raise MpiparError(f"ZeRO: {self._overrun} (gradients were reduced too early)")

    def _tp_sum(self) -> None:
        """Sum the sequence-parallel partial gradients over tp (their shard elements only)."""
        if self.tp.size == 1:
            return
        parts = [(b, lo, hi) for b, spans in zip(self.buckets, self._tp_spans) for lo, hi in spans]
        if not parts:
            return
        flat = torch.cat([b.master.grad[lo:hi] for b, lo, hi in parts])
        comm.all_reduce(flat, self.tp)
        pos = 0
        for b, lo, hi in parts:
            b.master.grad[lo:hi].copy_(flat[pos:pos + hi - lo])
            pos += hi - lo

    def after_step(self) -> None:
        """The optimizer has stepped the masters: write them into the parameters (all-gather)."""
        with torch.no_grad():
            for b in self.buckets:
                if b.separate_master:
                    b.shard.copy_(b.master)
        if self.zero == 3:
            return
        if self.shared is not None:
            slot = begin(self.flight_ag, "all_gather", None, None, "shm")
            try:
                self.shared.all_gather_all(self.buckets)
            finally:
                done(slot)
            return
        wait([post(lambda s, o: self.group.comm.Iallgather(s, o), None, b.full, (self.flight_ag, "all_gather"))
              for b in self.buckets])

    @torch.no_grad()
    def params_written(self) -> None:
        """The parameters were set from outside (inside `gathered()` for ZeRO-3): refresh this
        rank's shards and master weights from them."""
        for b in self.buckets:
            if self.zero == 3:
                b.shard.copy_(b.full[b.lo:b.hi])
            if b.separate_master:
                b.master.copy_(b.shard)

    # ---- gradient norm -----------------------------------------------------------------------
    def grad_sq_sum(self) -> torch.Tensor:
        """This rank's sum of squares of the distinct gradient elements its shards hold (float64)."""
        total = torch.zeros(1, dtype=torch.float64)
        for b, spans in zip(self.buckets, self._norm_spans):
            if b.master.grad is None:
                continue
            g = b.master.grad.detach()
            for lo, hi in spans:
                total += g[lo:hi].double().pow(2).sum().cpu()
        comm.all_reduce(total, self.group)
        return total

    def scale_grads(self, coef: float) -> None:
        with torch.no_grad():
            for b in self.buckets:
                if b.master.grad is not None:
                    b.master.grad.mul_(coef)

    @contextlib.contextmanager
    def gathered(self):
        """Every parameter materialised inside the block (ZeRO-3; a no-op otherwise). Collective."""
        if self.gathering is None:
            yield
        else:
            with self.gathering.gathered():
                yield

    # ---- accounting --------------------------------------------------------------------------
    def held_bytes(self) -> dict:
        """Bytes this rank holds now: parameters, gradients, optimizer master copies."""
        if self.zero < 3:  # (a view into shared memory when self.shared: count the view)
            params = sum(b.full.numel() * b.full.element_size() for b in self.buckets)
        else:
            params = sum(b.full.untyped_storage().nbytes() for b in self.buckets)
        if self.zero == 3:
            params += sum(b.shard.numel() * b.shard.element_size() for b in self.buckets)
        grads = sum(b.grad_full.numel() * b.grad_full.element_size() for b in self.buckets) if self.zero == 1 else 0
        grads += sum(b.master.grad.numel() * b.master.grad.element_size() for b in self.buckets
                     if b.master.grad is not None)
        masters = sum(b.master.numel() * b.master.element_size() for b in self.buckets if b.separate_master)
        return {"params": params, "grads": grads, "masters": masters}

    def close(self) -> None:
        """Remove the hooks and free the private communicator (collective)."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
        if self.gathering is not None:
            self.gathering.close()
        if not self.closed:
            if self.shared is not None:
                self.shared.close(self.buckets)
                self.shared = None
            self._grad_views = {}  # (views of the freed window, zero=1)
            self.group.comm.Free()
            self.closed = True
