"""Sharded data parallelism (ZeRO 1, 2, 3) for the parallel GPT.

    model = models.GPT(cfg, mesh, zero=2)
    opt = models.optimizer(model, torch.optim.AdamW, lr=1e-3)   # steps this rank's shards only
    models.train_step(model, batch, opt, mesh, ...)

`attach` builds the model's gradient machinery (GradBuckets for zero=0,
ShardedBuckets otherwise); `optimizer` builds the optimizer over what the
rank owns. See sharded.py for what each stage shards and when it communicates.
"""
from .attach import STAGES, attach, check_stage
from .optimizer import ELEMENTWISE, optimizer
from .sharded import ShardedBuckets

__all__ = ["attach", "check_stage", "optimizer", "ELEMENTWISE", "STAGES", "ShardedBuckets"]
