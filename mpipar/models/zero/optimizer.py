"""models.optimizer(model, cls, **kw): the optimizer of a model, sharded when the model is.

zero=0 (and the serial model): `cls(model.parameters(), **kw)`. zero >= 1:
`cls` over this rank's flat shards (`ShardedBuckets.masters()`, float32 master
weights under bf16/fp16 parameters), with a step post-hook that writes the
stepped shards back into the model (all-gathered for zero 1 and 2). A flat
shard mixes pieces of many parameters, so only optimizers whose update is
elementwise give the same numbers as unsharded: ELEMENTWISE lists torch's;
a class of your own qualifies with a class attribute `elementwise = True`.
Anything else raises MpiparError on every rank. The returned object is a real
instance of `cls` (LR schedulers, state_dict work as usual; its state is the
shards').
"""
from __future__ import annotations

import torch

from ...errors import MpiparError
from ...agree import agree

ELEMENTWISE = tuple(getattr(torch.optim, n) for n in
                    ("SGD", "Adam", "AdamW", "Adamax", "NAdam", "RAdam", "RMSprop", "Rprop", "Adagrad", "ASGD")
                    if hasattr(torch.optim, n))


def _elementwise(cls) -> bool:
    return isinstance(cls, type) and (cls in ELEMENTWISE or getattr(cls, "elementwise", False) is True)


def optimizer(model, cls, **kwargs):
    """An optimizer `cls(..., **kwargs)` for `model` (see the module doc). Collective when zero >= 1."""
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        err = f"models.optimizer: expected a torch.optim.Optimizer class, got {cls!r}"
    else:
        err = None
    zero = getattr(model, "zero", 0)
    if not zero:
        if err:
            raise MpiparError(err)
        return cls(model.parameters(), **kwargs)
    if err is None and not _elementwise(cls):
        err = (f"models.optimizer: ZeRO-{zero} steps flat shards, which needs an elementwise optimizer "
               f"({', '.join(c.__name__ for c in ELEMENTWISE)}, or a class with elementwise = True); "
               f"got {cls.__name__}")
    agree(model.mesh.world.comm, err)
    buckets = model.buckets
    opt = cls(buckets.masters(), **kwargs)
    opt.register_step_post_hook(lambda *_: buckets.after_step())
    opt.mpipar_zero_buckets = buckets  # train_step checks that the optimizer steps this model's shards
    return opt


def check_optimizer(model, optimizer) -> None:
    """MpiparError unless `optimizer` came from models.optimizer(model, ...) (ZeRO models only)."""
    if getattr(model, "zero", 0) and getattr(optimizer, "mpipar_zero_buckets", None) is not model.buckets:
        raise MpiparError(f"train_step: a ZeRO-{model.zero} model needs its optimizer from "
                          f"models.optimizer(model, cls, ...) (the gradients live in shards it steps)")
