"""The GPT's pipeline chunks really split B from W (mpipar.pipeline.weight_grad).

Every parameter-owning module of a chunk must be called as a module, once per
forward, so that its forward hook records its output: otherwise zb-h1 silently
runs full backwards (correct gradients, no bubble filled). The gradients of the
split path are checked against the serial model in test_gpt_layouts (zb-h1).
"""
from __future__ import annotations

import pytest
import torch

import mpipar
from mpipar import models
from mpipar.pipeline.weight_grad import WeightGradSplit

pytestmark = pytest.mark.mpi


def layouts(n):
    out = [(n, 1, 1, 1)]
    if n % 2 == 0:
        out.append((n // 2, 1, 1, 2))
    return out


def chunk_records(cfg, layout):
    dp, pp, sp, tp = layout
    model = models.GPT(cfg, mpipar.Mesh(tp=tp, pp=pp, sp=sp, dp=dp), dtype=torch.float64)
    tokens = torch.randint(0, cfg.vocab_size, (2, cfg.seq_len), generator=torch.Generator().manual_seed(0))
    out = []
    for chunk in model.chunks:
        split = WeightGradSplit(chunk)
        with split.record() as record:
            chunk(tokens)
        out.append((split, record))
    return out


@pytest.mark.parametrize("which", [0, 1])
def test_gpt_chunks_record_every_owner(which):
    from mpi4py import MPI

    ls = layouts(MPI.COMM_WORLD.Get_size())
    if which >= len(ls):
        pytest.skip("tp=2 needs an even world size")
    cfg = models.GPTConfig(vocab_size=32, seq_len=16, hidden=16, num_heads=4, num_layers=2, seed=3)
    for split, record in chunk_records(cfg, ls[which]):
        assert split.supported and record is not None
        assert record.usable(), f"owners not recorded once: {[c for c in record.calls]}"
        names = {type(split.owners[n][0]).__name__ for n in record.index}
        assert {"ColumnParallelLinear", "RowParallelLinear", "LayerNorm"} <= names, names


def test_tied_head_on_the_embedding_stage_falls_back():
    from mpi4py import MPI

    cfg = models.GPTConfig(vocab_size=32, seq_len=16, hidden=16, num_heads=4, num_layers=2, seed=3, tied=True)
    (split, record), = chunk_records(cfg, (MPI.COMM_WORLD.Get_size(), 1, 1, 1))
    assert not split.supported and record is None  # the head reads tok_emb.weight: no split
