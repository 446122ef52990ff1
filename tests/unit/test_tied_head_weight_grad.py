"""A tied head on the embedding's stage keeps its share of the embedding's gradient under zb-h1.

The head reads the token embedding's weight (mpipar.models.parallel_head.TiedProjection with a
source), which the input/weight-gradient split cannot attribute to an owner; the chunk
says so (`uses_foreign_parameters`) and runs full backwards. Without that, zb-h1's
gradients of tok_emb.weight differ from 1f1b's (by 0.097 here, checked by mutation).
One rank, a one-stage pipeline driven by PipelineRunner directly.
"""
from __future__ import annotations

import torch

import mpipar
from mpipar import models
from mpipar.pipeline import PipelineRunner


def grads(schedule: str):
    cfg = models.GPTConfig(vocab_size=32, seq_len=16, hidden=16, num_heads=4, num_layers=2, seed=3, tied=True)
    mesh = mpipar.Mesh(tp=1, pp=1, sp=1, dp=1)
    model = models.GPT(cfg, mesh, dtype=torch.float64)
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randint(0, 32, (4, 16), generator=gen), torch.randint(0, 32, (4, 16), generator=gen)
    runner = PipelineRunner(model.chunks[0], mesh.pp, schedule=schedule, num_microbatches=2, loss_fn=model.loss_fn)
    loss = runner.step(x, y)
    return loss, {n: p.grad.clone() for n, p in model.named_parameters()}


def test_zb_h1_equals_1f1b_with_a_tied_head_on_one_stage():
    loss_a, a = grads("1f1b")
    loss_b, b = grads("zb-h1")
    assert loss_a == loss_b
    assert set(a) == set(b) and "tok_emb.weight" in a
    for name in a:
        assert torch.equal(a[name], b[name]), name
