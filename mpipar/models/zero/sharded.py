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
  bucket ("unit"): a forward pre-hook all-gathers it (and posts the next
  block's gather: prefetch), it is freed after the forward, gathered again
  when its output's gradient arrives (prefetching the previous block) and freed
  once each of its parameters has accumulated that microbatch's gradient.
  The ends (embeddings, final LayerNorm, head) are one unit gathered for the
  whole step. Works under any pipeline schedule (the zero-bubble weight pass
  runs while the unit is still held), activation checkpointing and TP/SP.

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
import math

import torch

from ... import comm
from ...comm.buffers import address_buffer, mpi_buffer, needs_staging
from ...comm.wait import wait_all
from ...errors import MpiparError
from ...mesh import Group
from ..data_parallel import _pack
from .flat import FlatBucket


def _in_backward() -> bool:
    return torch._C._current_graph_task_id() != -1


class _Op:
    """A pending non-blocking collective; `done()` copies staged results back."""

    def __init__(self, request, after=None, keep=()):
        self.request, self.after, self.keep = request, after, keep  # keep: buffers MPI is using

    def complete(self) -> None:
        if self.after is not None:
            self.after()
            self.after = None


class ShardedBuckets:
    def __init__(self, model, zero: int, bucket_bytes: int):
        self.zero, self.model = zero, model
        self.group = Group(model.data_group.comm.Dup(), "zero")
        d, r = self.group.size, self.group.rank
        self.tp, self.pp = model.mesh.tp, model.mesh.pp
        self.tied_group = model.tied_group
        specs = {id(s.param): s for s in model.specs()}
        params = [p for p in dict.fromkeys(model.parameters()) if p.requires_grad]
        tied = [p for p in params if self.tied_group is not None and specs[id(p)].name == "tok_emb.weight"]
        self.units = []          # ZeRO-3: (module, bucket) of every transformer block, forward order
        if zero == 3:
            in_blocks = set()
            groups = []
            for key in model.blocks:
                ps = [p for p in model.blocks[key].parameters() if p.requires_grad]
                in_blocks.update(id(p) for p in ps)
                groups.append(ps)
            groups = groups[::-1]
            rest = [p for p in params if id(p) not in in_blocks and all(p is not t for t in tied)]
            groups += [g for g in (tied, rest) if g]
        else:
            untied = [p for p in params if all(p is not t for t in tied)]
            groups = [b.params for b in _pack(list(reversed(untied)), bucket_bytes)] + ([tied] if tied else [])
        self.buckets = [FlatBucket(g, i, d, r, keep_full=zero < 3) for i, g in enumerate(groups)]
        self._bucket_of = {id(p): b for b in self.buckets for p in b.params}
        self._tied_bucket = self._bucket_of[id(tied[0])] if tied else None
        self._roots, self._hooks = [], []
        if zero == 3:
            by_first = {id(b.params[0]): b for b in self.buckets}
            for key in model.blocks:
                mod = model.blocks[key]
                first = next((p for p in mod.parameters() if p.requires_grad), None)
                if first is not None:
                    self.units.append((mod, by_first[id(first)]))
            block_buckets = {id(b) for _, b in self.units}
            self._roots = [b for b in self.buckets if id(b) not in block_buckets]
            self._init_units(model)
        self._norm_spans, self._tp_spans = self._spans(specs)
        if zero == 1:
            for b in self.buckets:
                b.grad_full = torch.zeros(b.padded, dtype=b.dtype, device=b.device)
        self._hooks += [p.register_post_accumulate_grad_hook(self._on_grad) for b in self.buckets for p in b.params]
        self._armed, self._overrun = False, None
        self._pending: list = []   # (_Op, bucket, recv) in launch order
        if zero == 3:
            for b in self.buckets:
                b.release_full()
        self.closed = False

    # ---- layout facts ------------------------------------------------------------------------
    def _spans(self, specs):
        """Per bucket: shard spans counted by the global norm, spans summed over tp (sequence parallel)."""
        norm, tp_sum = [], []
        for b in self.buckets:
            nb, tb = [], []
            for f in b.fragments:
                s = specs[id(b.params[f.index])]
                if s.primary and (s.sharded or self.tp.rank == 0):
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
        if self.zero == 1:
            for b in self.buckets:
                b.grad_full.zero_()
                for p, g in b.param_views(b.grad_full):
                    p.grad = g.view(p.shape)
        else:
            for b in self.buckets:
                for p in b.params:
                    p.grad = None
        if self.zero == 3:
            for b in self.buckets:
                b.users, b.accumulated, b.grad_flat = 0, 0, None
            self._gather_roots()
        self._armed = True

    def _on_grad(self, p) -> None:
        if not self._armed:
            return
        n = self._count[id(p)] + 1
        self._count[id(p)] = n
        b = self._bucket_of[id(p)]
        if n > self._expected:
            self._overrun = f"a parameter of shape {tuple(p.shape)} accumulated more gradients than expected"
        if self.zero == 3 and b.unit:
            b.accumulated += 1
            if b.accumulated % len(b.params) == 0:
                b.users -= 1
                if b.users <= 0 and b.forwarding == 0:
                    b.users = 0
                    b.release_full()
        self._launch_ready()
        self._reap()

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

        if self.zero == 1:
            send = b.grad_full if b.grad_full.dtype == b.reduce_dtype else b.grad_full.to(b.reduce_dtype)
        elif self.zero == 3 and b.grad_flat is not None:  # a ZeRO-3 block's gradients accumulated in place
            send = b.grad_flat if b.dtype == b.reduce_dtype else b.grad_flat.to(b.reduce_dtype)
            b.grad_flat = None
            for p in b.params:
                p.grad = None
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
        op = self._start(lambda s, o: self.group.comm.Ireduce_scatter_block(s, o, op=MPI.SUM), send, recv)
        self._pending.append((op, b, recv))

    def _start(self, post, send, recv) -> _Op:
        """Post a collective; device tensors go through host copies when MPI cannot read them."""
        if not ((send is not None and needs_staging(send)) or needs_staging(recv)):
            return _Op(post(_buffer(send) if send is not None else _in_place(), _buffer(recv)), keep=(send, recv))
        hs = send.cpu() if send is not None else None
        hr = recv.cpu()
        return _Op(post(_buffer(hs) if hs is not None else _in_place(), _buffer(hr)),
                   lambda: recv.copy_(hr), keep=(hs, hr))

    def _reap(self, wait: bool = False) -> None:
        """Fold completed reduce-scatters (in launch order) into the buckets' gradient shards."""
        from mpi4py import MPI

        done = 0
        if wait:
            wait_all([op.request for op, _, _ in self._pending])
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
        self._launch_ready(force=True)
        self._reap(wait=True)
        scale = 1.0 / self.group.size
        with torch.no_grad():
            for b in self.buckets:
                b.master.grad = b.acc.mul_(scale)
                b.acc = None
        self._tp_sum()
        if self._tied_bucket is not None:
            comm.all_reduce(self._tied_bucket.master.grad, self.tied_group)
        if self.zero == 3:
            for b in self.buckets:
                if b.gather_op is not None:  # a prefetch nobody used
                    self._gather(b)
                if b.gathered:
                    b.release_full()
                b.users = 0
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
        ops = [self._start(lambda s, o: self.group.comm.Iallgather(s, o), None, b.full) for b in self.buckets]
        wait_all([op.request for op in ops])
        for op in ops:
            op.complete()

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

    # ---- ZeRO-3 parameter gathering ----------------------------------------------------------
    def _init_units(self, model) -> None:
        for b in self.buckets:
            b.unit, b.users, b.forwarding, b.accumulated, b.gather_op, b.grad_flat = False, 0, 0, 0, None, None
        for k, (mod, b) in enumerate(self.units):
            b.unit = True
            prev = self.units[k - 1][1] if k > 0 and _adjacent(model, self.units[k - 1][0], mod) else None
            nxt = self.units[k + 1][1] if k + 1 < len(self.units) and _adjacent(model, mod, self.units[k + 1][0]) \
                else None
            self._hooks.append(mod.register_forward_pre_hook(self._pre_forward(b, nxt)))
            self._hooks.append(mod.register_forward_hook(self._post_forward(b, prev)))
        for chunk in model.chunks:
            self._hooks.append(chunk.register_forward_pre_hook(lambda *_: self._gather_roots()))

    def _gather(self, b, wait: bool = True) -> None:
        if not b.gathered and b.gather_op is None:
            b.allocate_full()
            b.gather_op = self._start(lambda s, o: self.group.comm.Iallgather(s, o), b.shard, b.full)
        if wait and b.gather_op is not None:
            wait_all([b.gather_op.request])
            b.gather_op.complete()
            b.gather_op, b.gathered = None, True

    def _gather_roots(self) -> None:
        for b in self._roots:
            self._gather(b, wait=False)
        for b in self._roots:
            self._gather(b)

    def _pre_forward(self, b, nxt):
        def hook(module, args):
            self._gather(b)
            b.forwarding += 1
            if nxt is not None and not _in_backward():
                self._gather(nxt, wait=False)
        return hook

    def _post_forward(self, b, prev):
        def hook(module, args, output):
            b.forwarding -= 1
            if _in_backward():
                return
            if torch.is_grad_enabled() and isinstance(output, torch.Tensor) and output.requires_grad:
                output.register_hook(self._pre_backward(b, prev))
            if b.users == 0 and b.forwarding == 0:
                b.release_full()
        return hook

    def _pre_backward(self, b, prev):
        def hook(grad):
            self._gather(b)
            b.users += 1
            if self._armed and b.grad_flat is None and b.dtype == b.reduce_dtype:
                # the block's gradients accumulate straight into the flat buffer its reduce-scatter
                # sends (no packing copy, no second copy of them alive while packing)
                b.grad_flat = torch.zeros(b.padded, dtype=b.dtype, device=b.device)
                for p, g in b.param_views(b.grad_flat):
                    p.grad = g.view(p.shape)
            if prev is not None:
                self._gather(prev, wait=False)
        return hook

    @contextlib.contextmanager
    def gathered(self):
        """Every parameter materialised inside the block (ZeRO-3; a no-op otherwise). Collective."""
        if self.zero < 3:
            yield
            return
        held = [b for b in self.buckets if b.gathered or b.gather_op is not None]
        for b in self.buckets:
            self._gather(b, wait=False)
        for b in self.buckets:
            self._gather(b)
        try:
            yield
        finally:
            for b in self.buckets:
                if all(b is not h for h in held):
                    b.release_full()

    # ---- accounting --------------------------------------------------------------------------
    def held_bytes(self) -> dict:
        """Bytes this rank holds now: parameters, gradients, optimizer master copies."""
        params = sum(b.full.untyped_storage().nbytes() for b in self.buckets)
        if self.zero == 3:
            params += sum(b.shard.numel() * b.shard.element_size() for b in self.buckets)
        grads = sum(b.grad_full.numel() * b.grad_full.element_size() for b in self.buckets) if self.zero == 1 else 0
        grads += sum(b.master.grad.numel() * b.master.grad.element_size() for b in self.buckets
                     if b.master.grad is not None)
        masters = sum(b.master.numel() * b.master.element_size() for b in self.buckets if b.separate_master)
        return {"params": params, "grads": grads, "masters": masters}

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
        if not self.closed:
            self.group.comm.Free()
            self.closed = True


def _buffer(t: torch.Tensor):
    """MPI buffer by address for CPU tensors: a numpy view would pin the storage's size, and
    ZeRO-3 frees and re-allocates the full parameter storage (the _Op keeps `t` alive)."""
    return address_buffer(t) if t.is_cpu else mpi_buffer(t)


def _in_place():
    from mpi4py import MPI

    return MPI.IN_PLACE


def _adjacent(model, a, b) -> bool:
    """Blocks a and b run back to back in one chunk (so a's forward may prefetch b)."""
    for chunk in model.chunks:
        blocks = list(chunk.blocks)
        for i in range(len(blocks) - 1):
            if blocks[i] is a and blocks[i + 1] is b:
                return True
    return False
