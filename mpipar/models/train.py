"""train_step: one optimizer step of a serial or parallel GPT on a full batch.

    loss = train_step(model, (tokens, targets), optimizer, mesh=None,
                      num_microbatches=1, schedule="1f1b",
                      max_grad_norm=None, bf16=None, activation_checkpointing=None)

`tokens`, `targets`: LongTensor [batch, seq_len], the same full batch on every
rank. Each rank takes its dp rows and its sp part of the sequence; the batch
(per dp rank) is cut into `num_microbatches` microbatches: a pipeline schedule
runs them when pp > 1, plain gradient accumulation otherwise. Then the
gradients are reduced (dp x sp mean in overlapped buckets, tp sum of the
sequence-parallel replicas, tied embedding sum), optionally clipped by their
global norm over all groups, `optimizer.step()` and `optimizer.zero_grad()`
run, and the mean cross-entropy over every token of the batch is returned as a
float that is bit-identical on every rank.

bf16=True runs the forward under torch.autocast(bfloat16);
activation_checkpointing=True recomputes each block in the backward (None:
keep the model's own setting).
"""
from __future__ import annotations

import contextlib
import math

import torch

from .. import comm
from ..errors import MpiparError, require
from ..agree import agree, agree_ints
from .gpt import SerialGPT
from .parallel import ParallelGPT
from .zero.optimizer import check_optimizer


def train_step(model, batch, optimizer, mesh=None, num_microbatches: int = 1, schedule: str = "1f1b", *,
               max_grad_norm: float | None = None, bf16: bool | None = None,
               activation_checkpointing: bool | None = None, tracer=None) -> float:
    """Forward, backward, gradient reduction, [clipping], optimizer step; returns the mean loss."""
    require(isinstance(batch, (tuple, list)) and len(batch) == 2, "train_step: batch must be (tokens, targets)")
    tokens, targets = batch
    check_optimizer(model, optimizer)  # ZeRO: the optimizer must step the model's shards
    require(isinstance(num_microbatches, int) and num_microbatches >= 1,
            f"train_step: num_microbatches must be a positive int, got {num_microbatches!r}")
    with _options(model, bf16, activation_checkpointing):
        if isinstance(model, SerialGPT):
            require(mesh is None, "train_step: the model was built without a mesh; build it with "
                                  "models.GPT(cfg, mesh) to train in parallel")
            _check_batch(tokens, targets, model.cfg, num_microbatches, 1)
            loss = _serial_step(model, tokens, targets, num_microbatches, tracer)
        else:
            require(isinstance(model, ParallelGPT), f"train_step: expected a models.GPT, got {type(model).__name__}")
            require(mesh is None or dict(mesh.shape) == dict(model.mesh.shape),
                    f"train_step: mesh {getattr(mesh, 'shape', mesh)} is not the model's mesh {model.mesh.shape}")
            loss = _parallel_step(model, tokens, targets, num_microbatches, schedule, tracer)
    if max_grad_norm is not None:
        clip_grad_norm(model, max_grad_norm)
    with _span(tracer, "optimizer"):
        optimizer.step()
        optimizer.zero_grad()
    return loss


@contextlib.contextmanager
def _options(model, bf16, activation_checkpointing):
    """Temporarily override the model's autocast and checkpointing settings."""
    saved = (model.autocast_dtype, model.activation_checkpointing)
    if bf16 is not None:
        model.autocast_dtype = torch.bfloat16 if bf16 else None
    if activation_checkpointing is not None:
        model.activation_checkpointing = bool(activation_checkpointing)
    try:
        yield
    finally:
        model.autocast_dtype, model.activation_checkpointing = saved


def _span(tracer, name, **fields):
    return contextlib.nullcontext() if tracer is None else tracer.span(name, **fields)


def _batch_error(tokens, targets, cfg, m: int, dp: int) -> str | None:
    for name, t in (("tokens", tokens), ("targets", targets)):
        if not isinstance(t, torch.Tensor) or t.is_floating_point() or t.dim() != 2:
            return f"train_step: {name} must be an integer tensor [batch, seq_len]"
    if tokens.shape != targets.shape:
        return f"train_step: tokens {tuple(tokens.shape)} and targets {tuple(targets.shape)} differ in shape"
    if tokens.shape[1] != cfg.seq_len:
        return f"train_step: sequence length {tokens.shape[1]} != cfg.seq_len {cfg.seq_len}"
    b = tokens.shape[0]
    if b % (dp * m):
        return (f"train_step: batch size {b} is not divisible by dp * num_microbatches = {dp} * {m}")
    for name, t in (("tokens", tokens), ("targets", targets)):
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= cfg.vocab_size):
            return f"train_step: {name} must be ids in [0, {cfg.vocab_size})"
    return None


def _check_batch(tokens, targets, cfg, m: int, dp: int) -> None:
    err = _batch_error(tokens, targets, cfg, m, dp)
    require(err is None, err or "")


def _serial_step(model, tokens, targets, m: int, tracer) -> float:
    device = model.tok_emb.weight.device
    tokens, targets = tokens.to(device), targets.to(device)
    total = 0.0
    for i, (x, y) in enumerate(zip(tokens.tensor_split(m), targets.tensor_split(m))):
        with _span(tracer, "forward", microbatch=i):
            loss = model.loss(x, y)
        with _span(tracer, "backward", microbatch=i):
            (loss / m).backward()
        total += float(loss.detach())
    return total / m


def _parallel_step(model, tokens, targets, m: int, schedule: str, tracer) -> float:
    mesh = model.mesh
    err = _batch_error(tokens, targets, model.cfg, m, mesh.dp.size)
    agree(mesh.world.comm, err)
    agree_ints(mesh.world.comm, list(tokens.shape), lambda lo, hi: "train_step: the batch shape differs "
                                                                   f"across ranks ({lo.tolist()} .. {hi.tolist()})")
    x, y = model.local_batch(tokens, targets)
    model.start_grad_sync(m)
    if mesh.pp.size == 1:
        loss = 0.0
        for i, (xm, ym) in enumerate(zip(x.tensor_split(m), y.tensor_split(m))):
            with _span(tracer, "forward", microbatch=i):
                mb_loss = model.loss_fn(model(xm), ym)
            with _span(tracer, "backward", microbatch=i):
                (mb_loss / m).backward()
            loss += float(mb_loss.detach())
        loss /= m
    else:
        runner = model.runner(schedule, m)
        runner.tracer = tracer
        loss = runner.step(x, y)
    with _span(tracer, "grad_sync"):
        model.finish_grad_sync()
    return _global_mean(model, loss)


def _global_mean(model, local_loss: float) -> float:
    """Mean over the dp x sp shares (equal token counts), then rank 0's value everywhere."""
    group = model.data_group
    t = torch.tensor([local_loss], dtype=torch.float64)
    if group.size > 1:
        comm.all_reduce(t, group)
        t /= group.size
    comm.broadcast(t, model.mesh.world, root=0)
    return float(t[0])


def global_grad_norm(model) -> float:
    """sqrt of the sum of squares of every distinct gradient element of the whole model.

    Shards are summed over tp, replicated parameters counted once (on tp rank 0),
    the tied head copy not at all, stages summed over pp. Equal on every rank.
    """
    if isinstance(model, SerialGPT):
        sq = sum(float(p.grad.detach().double().pow(2).sum()) for p in model.parameters() if p.grad is not None)
        return math.sqrt(sq)
    mesh = model.mesh
    if getattr(model, "zero", 0):
        total = model.buckets.grad_sq_sum()  # ZeRO: the gradients live in shards over the data group
    else:
        total = _replica_sq_sum(model)
    comm.all_reduce(total, mesh.tp)
    comm.all_reduce(total, mesh.pp)
    comm.broadcast(total, mesh.world, root=0)
    return math.sqrt(float(total[0]))


def _replica_sq_sum(model) -> torch.Tensor:
    mesh = model.mesh
    total = torch.zeros(1, dtype=torch.float64)
    for s in model.specs():
        if s.param.grad is None or not s.primary or (not s.sharded and mesh.tp.rank != 0):
            continue
        if s.sharded and mesh.tp.rank % s.replicas:  # a second copy of a grouped K/V part
            continue
        total += s.param.grad.detach().double().pow(2).sum().cpu()
    return total


def clip_grad_norm(model, max_norm: float) -> float:
    """Scale every gradient by min(1, max_norm / (norm + 1e-6)) (torch's rule); returns the norm."""
    if not (isinstance(max_norm, (int, float)) and max_norm > 0):
        raise MpiparError(f"max_grad_norm must be a positive number, got {max_norm!r}")
    norm = global_grad_norm(model)
    coef = min(1.0, max_norm / (norm + 1e-6))
    if coef < 1.0 and getattr(model, "zero", 0):
        model.buckets.scale_grads(coef)
    elif coef < 1.0:
        with torch.no_grad():
            for p in model.parameters():
                if p.grad is not None:
                    p.grad.mul_(coef)
    return norm
