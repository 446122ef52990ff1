"""GPT on every dp x pp x sp x tp layout of 4 ranks trains exactly like the serial GPT (float64).

For each layout (dp, pp, sp, tp) of the issue and each pipeline schedule:
5 AdamW steps give the serial model's loss to 1e-9 (on every rank, equal on
every rank) and its final parameters to 1e-8. Plus tied embeddings, Ulysses,
gradient clipping, activation checkpointing, bf16 autocast, and the layout
errors (MpiparError on every rank before any work).
"""
from __future__ import annotations

import pytest
import torch
from mpi4py import MPI

import mpipar
from mpipar import models
from mpipar.errors import MpiparError
from conftest import assert_matches_serial, serial_run as serial_reference

WORLD = MPI.COMM_WORLD
F64 = torch.float64
LAYOUTS = [(1, 1, 1, 4), (1, 4, 1, 1), (1, 1, 4, 1), (4, 1, 1, 1),
           (1, 2, 1, 2), (2, 1, 1, 2), (1, 2, 2, 1), (2, 2, 1, 1)]   # (dp, pp, sp, tp)
SCHEDULES = ["naive", "gpipe", "1f1b", "interleaved-1f1b", "zb-h1"]
STEPS, BATCH = 5, 8
four_ranks = pytest.mark.skipif(WORLD.Get_size() != 4, reason="the layouts need exactly 4 ranks")


def config(layers=4, tied=False):
    return models.GPTConfig(vocab_size=32, seq_len=16, hidden=16, num_heads=4, num_layers=layers, tied=tied, seed=3)


def batches(vocab=32, seq=16):
    g = torch.Generator().manual_seed(11)
    return [(torch.randint(0, vocab, (BATCH, seq), generator=g), torch.randint(0, vocab, (BATCH, seq), generator=g))
            for _ in range(STEPS)]


def serial_run(cfg, m, **opts):
    """Losses and final state_dict of the serial model on this file's batches (cached)."""
    return serial_reference(cfg, batches(), m, **opts)


def parallel_run(cfg, layout, m, schedule="1f1b", num_chunks=1, model_opts=None, **opts):
    dp, pp, sp, tp = layout
    mesh = mpipar.Mesh(tp=tp, pp=pp, sp=sp, dp=dp)
    model = models.GPT(cfg, mesh, num_chunks, dtype=F64, bucket_bytes=4096, **(model_opts or {}))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    losses = [models.train_step(model, b, opt, mesh, num_microbatches=m, schedule=schedule, **opts)
              for b in batches()]
    return losses, model.full_state_dict()


def check_same(cfg, layout, m, schedule="1f1b", num_chunks=1, model_opts=None, loss_tol=1e-9,
               param_tol=1e-8, **opts):
    reference = serial_run(cfg, m, **opts)
    losses, state = parallel_run(cfg, layout, m, schedule, num_chunks, model_opts, **opts)
    assert_matches_serial(WORLD, losses, state, reference, loss_tol, param_tol)


def cases():
    out = []
    for layout in LAYOUTS:
        if layout[1] == 1:
            out.append((layout, "1f1b", 1, 2))
            continue
        for sched in SCHEDULES:
            chunks = 2 if sched == "interleaved-1f1b" else 1
            out.append((layout, sched, chunks, layout[1]))  # m = pp microbatches
    return out


@pytest.mark.mpi
@four_ranks
@pytest.mark.parametrize("layout,schedule,num_chunks,m", cases(),
                         ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else str(v))
def test_layout_matches_serial(layout, schedule, num_chunks, m):
    layers = 8 if layout[1] * num_chunks > 4 else 4
    check_same(config(layers), layout, m, schedule, num_chunks)


@pytest.mark.mpi
@four_ranks
@pytest.mark.parametrize("layout,schedule", [((1, 2, 1, 2), "1f1b"), ((2, 1, 2, 1), "1f1b"),
                                             ((1, 4, 1, 1), "gpipe"), ((1, 2, 1, 2), "zb-h1"),
                                             ((2, 1, 2, 1), "zb-h1")])
def test_tied_embeddings(layout, schedule):
    """zb-h1 with pp > 1: the last stage's head holds its own copy of the embedding's shard and
    its chunk splits B from W. (pp = 1 trains without a pipeline; a one-stage PipelineRunner,
    where the head reads the embedding's weight: tests/unit/test_tied_head_weight_grad.py.)"""
    check_same(config(tied=True), layout, 2, schedule)


@pytest.mark.mpi
@four_ranks
@pytest.mark.parametrize("layout", [(1, 2, 2, 1), (1, 1, 2, 2)])
def test_ulysses(layout):
    check_same(config(), layout, 2, model_opts={"sp_mode": "ulysses"})


@pytest.mark.mpi
@four_ranks
def test_without_megatron_sequence_parallel():
    check_same(config(), (2, 1, 1, 2), 2, model_opts={"sequence_parallel": False})


@pytest.mark.mpi
@four_ranks
@pytest.mark.parametrize("layout", [(2, 1, 1, 2), (1, 2, 2, 1)])
def test_global_norm_clipping(layout):
    cfg = config(tied=True)
    model = models.GPT(cfg, dtype=F64)
    model.loss(*batches()[0]).backward()
    assert models.global_grad_norm(model) > 0.05  # so the clipping below is active
    check_same(cfg, layout, 2, max_grad_norm=0.05)


@pytest.mark.mpi
@four_ranks
def test_activation_checkpointing():
    check_same(config(), (1, 2, 1, 2), 2, "gpipe", activation_checkpointing=True)


@pytest.mark.mpi
@four_ranks
def test_bf16_autocast_close_to_serial():
    ref, _ = serial_run(config(), 2, bf16=True)
    losses, _ = parallel_run(config(), (2, 2, 1, 1), 2, bf16=True)
    assert all(abs(a - b) < 3e-2 for a, b in zip(losses, ref)), (losses, ref)


# ---- layout errors: MpiparError on every rank, before any work ------------------------------------

def _mesh_or_skip(**dims):
    """Mesh with the given dims and dp filling the rest of the world (skip where it cannot)."""
    size = 1
    for v in dims.values():
        size *= v
    if WORLD.Get_size() % size:
        pytest.skip(f"needs a multiple of {size} ranks")
    return mpipar.Mesh(**dims)


@pytest.mark.mpi
@pytest.mark.parametrize("cfg_kw,dims,chunks,match", [
    ({"num_heads": 3, "hidden": 12}, {"tp": 2}, 1, "num_heads = 3 is not divisible by tp = 2"),
    ({"num_layers": 1}, {"pp": 2}, 1, "num_layers = 1 cannot fill"),
    ({"num_layers": 3}, {"pp": 2}, 2, "num_layers = 3 cannot fill"),
    ({"seq_len": 12}, {"sp": 4}, 1, "seq_len = 12 is not divisible by 8"),
    ({"seq_len": 6}, {"sp": 2}, 1, "seq_len = 6 is not divisible by 4"),
    ({"vocab_size": 33}, {"tp": 2}, 1, "vocab_size = 33 is not divisible by tp = 2"),
])
def test_layout_errors(cfg_kw, dims, chunks, match):
    kw = dict(vocab_size=32, seq_len=16, hidden=16, num_heads=4, num_layers=4)
    kw.update(cfg_kw)
    mesh = _mesh_or_skip(**dims)
    with pytest.raises(MpiparError, match=match):
        models.GPT(models.GPTConfig(**kw), mesh, chunks)


@pytest.mark.mpi
def test_world_size_mismatch():
    n = WORLD.Get_size()
    with pytest.raises(MpiparError, match="world size"):
        mpipar.Mesh(tp=n + 1)


@pytest.mark.mpi
def test_config_differs_across_ranks():
    if WORLD.Get_size() < 2:
        pytest.skip("needs 2 ranks")
    mesh = mpipar.Mesh(dp=WORLD.Get_size())
    cfg = models.GPTConfig(32, 16, 16, 4, 2, seed=WORLD.Get_rank())
    with pytest.raises(MpiparError, match="config differs"):
        models.GPT(cfg, mesh)


@pytest.mark.mpi
def test_bad_batch_raises_everywhere():
    n = WORLD.Get_size()
    mesh = mpipar.Mesh(dp=n)
    model = models.GPT(models.GPTConfig(32, 16, 16, 4, 2), mesh, dtype=F64)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tokens = torch.zeros(n * 2 + 1, 16, dtype=torch.long)
    with pytest.raises(MpiparError, match="not divisible by dp"):
        models.train_step(model, (tokens, tokens), opt, mesh, num_microbatches=2)
    bad = torch.zeros(n * 2, 16, dtype=torch.long)
    if WORLD.Get_rank() == n - 1:
        bad[0, 0] = 99  # only one rank has out-of-range ids
    with pytest.raises(MpiparError, match=r"ids in \[0, 32\)"):
        models.train_step(model, (bad, bad), opt, mesh)
    tokens = torch.zeros(n * 2, 16, dtype=torch.long)
    assert models.train_step(model, (tokens, tokens), opt, mesh) > 0  # still usable afterwards
