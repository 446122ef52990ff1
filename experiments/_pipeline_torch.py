"""torch.distributed.pipelining on gloo, the baseline of experiments/pipeline.py.

The same layers, split the same way (`mpipar.pipeline.partition`, chunk c of
rank r = virtual stage c*p + r), run by torch's ScheduleGPipe, Schedule1F1B,
ScheduleInterleaved1F1B and ScheduleInterleavedZeroBubble (next to mpipar's
zb-h1) over a gloo process group on 127.0.0.1 (port chosen by rank 0).
"""
from __future__ import annotations

import copy

import torch
from mpi4py import MPI
from torch import nn

from mpipar.pipeline import partition
from mpipar.trace import ActivationMeter

from _common import init_gloo

LOSS = nn.functional.mse_loss
TORCH = {"gpipe": "ScheduleGPipe", "1f1b": "Schedule1F1B", "interleaved-1f1b": "ScheduleInterleaved1F1B",
         "zb-h1": "ScheduleInterleavedZeroBubble"}


def init_torch(world, sizes) -> dict:
    """gloo on 127.0.0.1 (port from rank 0) and a process group over the first p ranks per p."""
    import torch.distributed as dist

    init_gloo(world, timeout_s=300)
    return {p: dist.new_group(list(range(p)), backend="gloo") for p in sizes}  # collective over the world


def run_torch(cfg, name, m, g, layers, pg, batch, timed) -> dict | None:
    """torch.distributed.pipelining on gloo; None where torch refuses the point."""
    from torch.distributed import pipelining

    v = cfg.chunks if name in ("interleaved-1f1b", "zb-h1") else 1
    n = g.size * v
    if cfg.layers < n:
        return None
    mine = [part for k, part in enumerate(partition(copy.deepcopy(layers), n)) if k % g.size == g.rank]
    stages = [pipelining.PipelineStage(mod, c * g.size + g.rank, n, torch.device("cpu"), group=pg)
              for c, mod in enumerate(mine)]
    cls = getattr(pipelining, TORCH[name])
    error = None
    try:
        sched = cls(stages[0] if v == 1 else stages, m, loss_fn=LOSS)
    except Exception as exc:  # torch's own limits (e.g. 1F1B needs m >= p)
        error = f"{type(exc).__name__}: {exc}"
    if g.comm.allreduce(error is not None, op=MPI.LOR):
        return None
    x, y = batch(cfg)
    meter = ActivationMeter(exclude=mine)

    def run():
        if g.rank == 0:
            sched.step(x, target=y if g.size == 1 else None)
        elif g.rank == g.size - 1:
            sched.step(target=y)
        else:
            sched.step()
        for c in mine:
            c.zero_grad(set_to_none=True)

    def metered():
        with meter:
            run()

    times = timed(run, g.comm, cfg)  # the meter's hooks only in steps after these, as mpipar's tracer
    timed(metered, g.comm, cfg, warmup=0)
    return {"times": times, "act": meter.peak, "chunks": v}
