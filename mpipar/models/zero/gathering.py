"""ZeRO-3: when each transformer block's parameters are materialised on this rank.

Between uses a block (a FlatBucket with keep_full=False) holds only its shard.
- forward pre-hook: all-gather it (waiting for a prefetch if one is in flight)
  and post the gather of the next block of the same chunk (prefetch);
- forward hook: free it, unless a backward of it is pending (zero-bubble's
  weight pass, see below), and hook its output's gradient;
- output gradient arrives: gather it again (`users` counts the backward
  passes of it in progress);
- each of its parameters has accumulated this microbatch's gradient
  (`on_grad`): the backward is done, free it and post the gather of the block
  whose backward comes next (posted any earlier, two blocks would be held at
  the activation peak; on the CPU the gather's copies are this rank's work
  either way, and MPI moves them only inside its calls).
Inside a backward (activation checkpointing recomputes the forward there)
the hooks neither free nor prefetch. The ends (embeddings, final LayerNorm,
head: the "root" buckets) are gathered for the whole step, and by any chunk's
forward outside a step. Every collective is posted in program order, which
is the same on every rank of the data group (same schedule, same model).
With ZeRO's buffers in shared memory (mpipar.models.zero.shared) a gather runs
at once when the block is needed, and a prefetch does nothing.
"""
from __future__ import annotations

import contextlib

import torch

from ...flight.recorder import begin, done
from .nonblocking import post, wait


def _in_backward() -> bool:
    return torch._C._current_graph_task_id() != -1


def _adjacent(model, a, b) -> bool:
    """Blocks a and b run back to back in one chunk (so a's forward may prefetch b)."""
    for chunk in model.chunks:
        blocks = list(chunk.blocks)
        if any(blocks[i] is a and blocks[i + 1] is b for i in range(len(blocks) - 1)):
            return True
    return False


class BlockGathering:
    def __init__(self, model, buckets: list, units: list, comm, shared=None, flight=None):
        """units: (block module, its bucket) in forward order; the other buckets are roots.
        shared: ZeRO's SharedBuffers, or None (MPI); flight: the recorder's channel of the gathers."""
        self.buckets, self.comm, self.shared, self.flight = buckets, comm, shared, flight
        unit_ids = {id(b) for _, b in units}
        self.roots = [b for b in buckets if id(b) not in unit_ids]
        self.hooks = []
        for b in buckets:
            b.unit, b.users, b.forwarding, b.accumulated, b.gather_op, b.prev = False, 0, 0, 0, None, None
        for k, (mod, b) in enumerate(units):
            b.unit = True
            if k > 0 and _adjacent(model, units[k - 1][0], mod):
                b.prev = units[k - 1][1]
            nxt = units[k + 1][1] if k + 1 < len(units) and _adjacent(model, mod, units[k + 1][0]) else None
            self.hooks.append(mod.register_forward_pre_hook(self._pre_forward(b, nxt)))
            self.hooks.append(mod.register_forward_hook(self._post_forward(b)))
        for chunk in model.chunks:
            self.hooks.append(chunk.register_forward_pre_hook(lambda *_: self.gather_roots()))
        for b in buckets:
            b.release_full()

    def gather(self, b, wait_: bool = True) -> None:
        if self.shared is not None:
            if wait_:
                self.gather_now([b])
            return
        if not b.gathered and b.gather_op is None:
            b.allocate_full()
            b.gather_op = post(lambda s, o: self.comm.Iallgather(s, o), b.shard, b.full, (self.flight, "all_gather"))
        if wait_ and b.gather_op is not None:
            wait([b.gather_op])
            b.gather_op, b.gathered = None, True

    def gather_now(self, buckets) -> None:
        """Shared memory: materialise those of `buckets` not held, in one call."""
        todo = [b for b in buckets if not b.gathered]
        if not todo:
            return
        for b in todo:
            b.allocate_full()
        slot = begin(self.flight, "all_gather", None, None, "shm")
        try:
            self.shared.gather(todo, lambda b: b.index)
        finally:
            done(slot)
        for b in todo:
            b.gathered = True

    def gather_all(self, buckets) -> None:
        """Materialise every bucket of `buckets` (all posted before any is waited for)."""
        if self.shared is not None:
            self.gather_now(buckets)
            return
        for b in buckets:
            self.gather(b, wait_=False)
        for b in buckets:
            self.gather(b)

    def gather_roots(self) -> None:
        self.gather_all(self.roots)

    def start_step(self) -> None:
        for b in self.buckets:
            if b.gather_op is not None:
                self.gather(b)
            if b.unit and b.gathered:  # still held by a forward/backward run outside train_step
                b.release_full()
            b.users, b.accumulated = 0, 0
        self.gather_roots()

    def end_step(self) -> None:
        for b in self.buckets:
            if b.gather_op is not None:  # a prefetch nobody used
                self.gather(b)
            if b.gathered:
                b.release_full()
            b.users = 0

    def on_grad(self, b) -> None:
        """One parameter of bucket b accumulated a gradient (during a step)."""
        if not b.unit:
            return
        b.accumulated += 1
        if b.accumulated % len(b.params):
            return
        b.users -= 1  # this microbatch's backward of the block is done
        if b.users <= 0 and b.forwarding == 0:
            b.users = 0
            b.release_full()
        if b.prev is not None:
            self.gather(b.prev, wait_=False)

    def _pre_forward(self, b, nxt):
        def hook(module, args):
            self.gather(b)
            b.forwarding += 1
            if nxt is not None and not _in_backward():
                self.gather(nxt, wait_=False)
        return hook

    def _post_forward(self, b):
        def hook(module, args, output):
            b.forwarding -= 1
            if _in_backward():
                return
            if torch.is_grad_enabled() and isinstance(output, torch.Tensor) and output.requires_grad:
                output.register_hook(self._pre_backward(b))
            if b.users == 0 and b.forwarding == 0:
                b.release_full()
        return hook

    def _pre_backward(self, b):
        def hook(grad):
            self.gather(b)
            b.users += 1
        return hook

    @contextlib.contextmanager
    def gathered(self):
        """Every parameter materialised inside the block. Collective over the data group."""
        held = [b for b in self.buckets if b.gathered or b.gather_op is not None]
        self.gather_all(self.buckets)
        try:
            yield
        finally:
            for b in self.buckets:
                if all(b is not h for h in held):
                    b.release_full()

    def close(self) -> None:
        for h in self.hooks:
            h.remove()
        self.hooks = []
