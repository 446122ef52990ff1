"""PipelineRunner: run one stage's schedule with tagged non-blocking MPI point-to-point.

    runner = PipelineRunner(stage_module, mesh.pp, schedule="1f1b",
                            num_microbatches=m, loss_fn=loss_fn, tracer=None)
    loss = runner.step(inputs, targets)   # mean loss over microbatches, on every stage

Per step: split the batch into m microbatches, walk this stage's action list
(`schedules.schedule`), receive activations before F and gradients before B,
send outputs after F and input gradients after B (virtual stage k talks to
k-1 and k+1; chunk c on stage s is virtual stage c*p + s), and free each
microbatch's activations as soon as its last backward pass is done. Each
microbatch loss is scaled by 1/m, so the accumulated `.grad` equals the
gradient of the mean loss over the whole batch (gradients accumulate across
steps, like `loss.backward()`: zero them yourself). Any exception on one
stage is raised as MpiparError on every stage (see `transport.py`).
"""
from __future__ import annotations

import contextlib

import numpy as np
import torch

from ..errors import MpiparError
from ..agree import agree, agree_ints
from ..flight.recorder import begin, done
from ..mesh import as_group
from .schedules import SCHEDULES, check_args, schedule as make_schedule, stage_of, virtual_stage
from .transport import PeerFailed, Transport
from .validate import ACT, GRAD, messages
from .weight_grad import WeightGradSplit


class PipelineRunner:
    """Executes a pipeline schedule for this rank's stage of `pp_group`."""

    def __init__(self, stage_module, pp_group, schedule: str = "1f1b", num_microbatches: int = 1,
                 loss_fn=None, tracer=None):
        group = as_group(pp_group)
        self.group, self.tracer = group, tracer
        self.stage, self.num_stages = group.rank, group.size
        self.modules, module_error = _as_chunks(stage_module)
        self.num_chunks, self.num_microbatches = len(self.modules), num_microbatches
        self.schedule_name = schedule
        p, v = self.num_stages, self.num_chunks
        agree(group.comm, module_error or self._local_error(schedule, num_microbatches, loss_fn))
        agree_ints(group.comm, [num_microbatches, v, sorted(SCHEDULES).index(schedule)],
                   lambda lo, hi: "PipelineRunner: num_microbatches, num_chunks and schedule must be "
                                  f"equal on every stage (got from {lo.tolist()} to {hi.tolist()})")
        self.loss_fn = loss_fn
        self.actions = make_schedule(schedule, p, num_microbatches, self.stage, v)
        self.plan = list(messages(self.actions, self.stage, p, v))
        self._with_w = {(a.microbatch, a.chunk) for a in self.actions if a.op == "W"}
        self.device = _device_of(self.modules)
        self._comm = group.comm.Dup()
        self.transport = Transport(self._comm, p * v, self.device)
        if self.transport.max_tag(num_microbatches) > self.transport.tag_ub:
            raise MpiparError(f"PipelineRunner: {num_microbatches} microbatches x {p * v} virtual "
                              f"stages exceed the MPI tag range ({self.transport.tag_ub})")
        self.splitters = [WeightGradSplit(mod) for mod in self.modules]
        self._broken = None

    def _local_error(self, schedule, m, loss_fn):
        try:
            check_args(schedule, self.num_stages, m, self.num_chunks)
        except MpiparError as exc:
            return f"PipelineRunner: {exc}"
        if self.stage == self.num_stages - 1 and loss_fn is None:
            return "PipelineRunner: the last stage needs a loss_fn"
        return None

    # ---- one training step -----------------------------------------------------------------
    def step(self, inputs, targets) -> float:
        """Forward and backward of the whole batch through the pipeline; returns the mean loss."""
        if self._broken is not None:
            raise MpiparError(f"PipelineRunner is unusable after an earlier failure: {self._broken}")
        _agree_fast(self._comm, self._batch_error(inputs, targets), self.transport.flight)
        m = self.num_microbatches
        last = self.num_stages * self.num_chunks - 1
        self._inputs = torch.tensor_split(inputs, m) if self.stage == 0 else None
        self._targets = torch.tensor_split(targets, m) if stage_of(last, self.num_stages)[0] == self.stage else None
        self._state, self._losses = {}, []
        receives = [(key, peer) for kind, _, peer, _, key in self.plan if kind == "recv" and peer != self.stage]
        try:
            with self._span("step"):
                self.transport.begin(receives)
                for action in self.actions:
                    self._run(action)
                self.transport.finish()
                return self._mean_loss()
        except PeerFailed as exc:
            self._broken = str(exc)
            raise PeerFailed(str(exc)) from None
        except Exception as exc:
            msg = f"pipeline stage {self.stage} failed: {type(exc).__name__}: {exc}"
            self._broken = msg
            self.transport.fail(msg)
            raise MpiparError(msg) from exc
        finally:
            self._state, self._inputs, self._targets = {}, None, None

    def _batch_error(self, inputs, targets):
        m = self.num_microbatches
        last_stage = self.stage == self.num_stages - 1
        for name, t, needed in (("inputs", inputs, self.stage == 0), ("targets", targets, last_stage)):
            if t is None and not needed:
                continue
            if not isinstance(t, torch.Tensor) or t.dim() == 0:
                return f"PipelineRunner.step: {name} must be a tensor with a batch dimension"
            if t.shape[0] % m:
                return (f"PipelineRunner.step: batch size {t.shape[0]} of {name} is not divisible "
                        f"by num_microbatches={m}")
        return None

    def _run(self, action) -> None:
        """Receive what the action needs (span "recv"), then compute and send (span F/B/W)."""
        k = virtual_stage(self.stage, action.chunk, self.num_stages)
        last = self.num_stages * self.num_chunks - 1
        if action.op == "F":
            x = self._receive(ACT, action, k) if k > 0 else None
            with self._span("F", action):
                self._forward(action, k, x)
        elif action.op == "B":
            grad = self._receive(GRAD, action, k) if k < last else None
            with self._span("B", action):
                self._backward(action, k, grad)
        else:
            with self._span("W", action):
                self._weight(action)
        if self._traced(memory=True):
            self.tracer.sample_memory(str(action), stage=self.stage, microbatch=action.microbatch)

    def _forward(self, a, k, x) -> None:
        i, c = a.microbatch, a.chunk
        last = k == self.num_stages * self.num_chunks - 1
        if k == 0:
            x = self._inputs[i].to(self.device, copy=True)  # its own storage: freed with this microbatch
        else:
            if not x.is_floating_point():
                raise MpiparError(f"activation into virtual stage {k} has dtype {x.dtype}; "
                                  f"tensors between stages must be floating point")
            x.requires_grad_(True)
        meter = self.tracer.activations if self._traced(memory=True) else contextlib.nullcontext()
        with meter, self.splitters[c].record() as record:
            out = self.modules[c](x)
            if not isinstance(out, torch.Tensor):
                raise MpiparError(f"chunk {c} returned {type(out).__name__}; a stage must return one tensor")
            if last:
                loss = self.loss_fn(out, self._targets[i].to(self.device, copy=True))
                self._losses.append(loss.detach())
                out = loss / self.num_microbatches
        if not last:
            self._send(out, ACT, a, k + 1)
        self._state[(i, c)] = [x if k > 0 else None, out, record, None]

    def _backward(self, a, k, grad) -> None:
        i, c = a.microbatch, a.chunk
        x, out, record, _ = state = self._state[(i, c)]
        if grad is not None:
            if grad.shape != out.shape or grad.dtype != out.dtype:
                raise MpiparError(f"gradient for virtual stage {k} has shape {tuple(grad.shape)} "
                                  f"{grad.dtype}, its output has {tuple(out.shape)} {out.dtype}")
        split = (i, c) in self._with_w
        dx, pending = None, None
        if out.requires_grad:
            dx, pending = self.splitters[c].input_grads(out, grad, x, record if split else None)
        if k > 0:
            self._send(dx if dx is not None else torch.zeros_like(x), GRAD, a, k - 1)
        if pending is None:
            del self._state[(i, c)]
        else:
            state[:] = [None, None, None, pending]

    def _weight(self, a) -> None:
        state = self._state.pop((a.microbatch, a.chunk), None)
        if state is not None:
            WeightGradSplit.weight_grads(state[3])

    # ---- communication -------------------------------------------------------------------------
    def _peer(self, virtual: int) -> int:
        return stage_of(virtual, self.num_stages)[0]

    def _receive(self, direction, a, k):
        peer = self._peer(k - 1 if direction == ACT else k + 1)
        with self._span("recv", a, peer=peer, direction=direction, virtual=k):
            return self.transport.recv((direction, a.microbatch, k))

    def _send(self, t, direction, a, k_dst) -> None:
        peer = self._peer(k_dst)
        with self._span("send", a, peer=peer, direction=direction, virtual=k_dst):
            self.transport.send(t, (direction, a.microbatch, k_dst), peer)

    def _mean_loss(self) -> float:
        from mpi4py import MPI

        local = np.array([float(sum(self._losses)) if self._losses else 0.0], dtype=np.float64)
        total = np.zeros(1, dtype=np.float64)
        if self.num_stages == 1:
            return float(local[0]) / self.num_microbatches
        req = self._comm.Iallreduce(local, total, op=MPI.SUM)
        self.transport.wait(req, local, total)
        return float(total[0]) / self.num_microbatches

    def _traced(self, memory: bool = False) -> bool:
        """Whether this step is traced (with memory: its memory too). A disabled tracer costs
        nothing: a memory sample reads /proc, and the activation meter hooks every saved tensor."""
        return self.tracer is not None and self.tracer.enabled and (not memory or self.tracer.memory_enabled)

    def _span(self, name, action=None, **fields):
        if not self._traced():
            return contextlib.nullcontext()
        if action is not None:
            fields.update(microbatch=action.microbatch, chunk=action.chunk)
        return self.tracer.span(name, stage=self.stage, **fields)

    def close(self) -> None:
        """Release the runner's private communicator (collective over the pipeline group).

        A runner broken by a failure keeps it instead: messages of the failed step may
        still sit unreceived in MPI's queues under its context, and a freed context
        is recycled by the next Dup, whose receives would match those stale messages.
        """
        if self._comm is not None and self._broken is None:
            self._comm.Free()
        self._comm = None


def _agree_fast(comm, local_error, flight=None) -> None:
    """`agree` with a one-int Allreduce on the good path (it runs every step)."""
    from mpi4py import MPI

    flag = np.array([0 if local_error is None else 1], dtype=np.int32)
    slot = begin(flight, "pipeline agree") if flight is not None else -1
    try:
        comm.Allreduce(MPI.IN_PLACE, flag, op=MPI.MAX)
    finally:
        done(slot)
    if flag[0]:
        agree(comm, local_error)


def _as_chunks(stage_module):
    """(list of chunk modules, error message or None)."""
    if isinstance(stage_module, (list, tuple, torch.nn.ModuleList)):
        mods = list(stage_module)
    else:
        mods = [stage_module]
    if not mods or not all(isinstance(m, torch.nn.Module) for m in mods):
        return [torch.nn.Identity()], "PipelineRunner: stage_module must be an nn.Module or a non-empty list of them"
    return mods, None


def _device_of(modules) -> torch.device:
    for mod in modules:
        for t in list(mod.parameters()) + list(mod.buffers()):
            return t.device
    return torch.device("cpu")
