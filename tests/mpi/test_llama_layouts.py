"""Llama (RMSNorm, rotary, SwiGLU, grouped-query attention) on every kind of layout equals serial (float64).

Each case trains 3 AdamW steps on the world's ranks and compares the losses
(1e-9) and final parameters (1e-8) with the serial model. The cases cover
grouped K/V heads sharded (tp divides num_kv_heads) and replicated
(num_kv_heads divides tp), rotary positions under ring and Ulysses attention
in the zigzag and contiguous layouts (Ulysses with K/V heads that do and do
not divide sp), Megatron sequence parallelism, pipelines (interleaved and
zb-h1), data parallelism, activation checkpointing and the tied head; each
case runs where its layout fills the world (1-4 ranks). The K/V rule's
errors are MpiparErrors on every rank.
"""
from __future__ import annotations

import pytest
import torch
from mpi4py import MPI

import mpipar
from mpipar import models
from mpipar.errors import MpiparError
from conftest import assert_matches_serial, requires_cuda, serial_run as serial_reference

WORLD = MPI.COMM_WORLD
F64 = torch.float64
STEPS, BATCH = 3, 4


def config(kv=2, layers=4, tied=False):
    return models.GPTConfig(vocab_size=32, seq_len=24, hidden=32, num_heads=4, num_layers=layers, ffn_hidden=48,
                            seed=3, tied=tied, arch="llama", num_kv_heads=kv, rope_theta=500.0, norm_eps=1e-6)


def batches(cfg):
    g = torch.Generator().manual_seed(11)
    return [tuple(torch.randint(0, cfg.vocab_size, (BATCH, cfg.seq_len), generator=g) for _ in range(2))
            for _ in range(STEPS)]


def serial_run(cfg, m, **opts):
    """Losses and final state_dict of the serial model on this file's batches (cached)."""
    return serial_reference(cfg, batches(cfg), m, **opts)


# (id, mesh dims, config kwargs, model options, train options)
CASES = [
    ("serial-layout", {}, {}, {}, {}),
    ("tp2-kv-sharded", {"tp": 2}, {}, {}, {}),
    ("tp2-mqa-replicated", {"tp": 2}, {"kv": 1}, {"sequence_parallel": False}, {}),
    ("sp2-ring-zigzag", {"sp": 2}, {}, {}, {}),
    ("sp2-ulysses-contiguous", {"sp": 2}, {}, {"sp_mode": "ulysses", "sp_layout": "contiguous"}, {}),
    ("pp2-1f1b-tied", {"pp": 2}, {"tied": True}, {}, {}),
    ("dp2-checkpointing", {"dp": 2}, {}, {}, {"activation_checkpointing": True}),
    ("pp3-interleaved", {"pp": 3}, {"layers": 6}, {"num_chunks": 2}, {"schedule": "interleaved-1f1b"}),
    ("sp3-ring-contiguous", {"sp": 3}, {"kv": 1}, {"sp_layout": "contiguous"}, {}),
    ("tp4-kv-replicated", {"tp": 4}, {}, {}, {}),
    ("tp4-mqa-replicated", {"tp": 4}, {"kv": 1}, {}, {}),
    ("sp4-ulysses-kv-repeated", {"sp": 4}, {}, {"sp_mode": "ulysses"}, {}),
    ("sp4-ring-zigzag", {"sp": 4}, {}, {}, {}),
    ("tp2-sp2-ulysses", {"tp": 2, "sp": 2}, {"kv": 4}, {"sp_mode": "ulysses"}, {}),
    ("tp2-sp2-ring", {"tp": 2, "sp": 2}, {}, {}, {}),
    ("pp2-tp2-interleaved", {"pp": 2, "tp": 2}, {}, {"num_chunks": 2}, {"schedule": "interleaved-1f1b"}),
    ("pp2-dp2-zb-h1", {"pp": 2, "dp": 2}, {"kv": 1}, {}, {"schedule": "zb-h1"}),
    ("dp2-sp2-ring-contiguous", {"dp": 2, "sp": 2}, {}, {"sp_layout": "contiguous"}, {}),
]


def _size(dims):
    n = 1
    for v in dims.values():
        n *= v
    return n


@pytest.mark.mpi
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_llama_layout_matches_serial(case):
    _, dims, cfg_kw, model_opts, train_opts = case
    if _size(dims) != WORLD.Get_size():
        pytest.skip(f"the layout needs {_size(dims)} ranks")
    cfg = config(**cfg_kw)
    model_opts, train_opts = dict(model_opts), dict(train_opts)
    chunks = model_opts.pop("num_chunks", 1)
    schedule = train_opts.pop("schedule", "1f1b")
    m = 2
    reference = serial_run(cfg, m, **train_opts)
    mesh = mpipar.Mesh(**dims) if dims else mpipar.Mesh(dp=1)
    model = models.GPT(cfg, mesh, chunks, dtype=F64, bucket_bytes=4096, **model_opts)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    losses = [models.train_step(model, b, opt, mesh, num_microbatches=m, schedule=schedule, **train_opts)
              for b in batches(cfg)]
    assert_matches_serial(WORLD, losses, model.full_state_dict(), reference, loss_tol=1e-9, param_tol=1e-8)


@pytest.mark.mpi
def test_kv_heads_that_fit_neither_way_raise_everywhere():
    """3 K/V heads on tp = 2: neither divides the other (Megatron's rule), on every rank."""
    if WORLD.Get_size() != 2:
        pytest.skip("needs 2 ranks")
    cfg = models.GPTConfig(32, 24, 48, 6, 2, ffn_hidden=48, arch="llama", num_kv_heads=3)
    with pytest.raises(MpiparError, match="num_kv_heads = 3 and tp = 2"):
        models.GPT(cfg, mpipar.Mesh(tp=2))


@pytest.mark.mpi
def test_load_full_state_dict_on_a_layout():
    """Each rank keeps its shard of a full state: full_state_dict gives it back, logits equal serial."""
    n = WORLD.Get_size()
    dims = {1: {"dp": 1}, 2: {"tp": 2}, 3: {"pp": 3}, 4: {"tp": 4}}[n]
    cfg = config(kv=1, layers=3 if n == 3 else 2)
    serial = models.GPT(models.GPTConfig(**{**cfg.to_dict(), "seed": 9}), dtype=F64)
    model = models.GPT(cfg, mpipar.Mesh(**dims), dtype=F64)
    model.load_full_state_dict(serial.full_state_dict())
    state = model.full_state_dict()
    assert all(torch.equal(state[k], v) for k, v in serial.state_dict().items())
    bad = dict(serial.full_state_dict())
    bad.pop("ln_f.weight")
    if WORLD.Get_rank() == 0:
        bad = serial.full_state_dict()  # only some ranks hold a bad state: every rank still raises
    with pytest.raises(MpiparError, match="missing"):
        model.load_full_state_dict(bad if n > 1 else {})


@pytest.mark.mpi
def test_checkpoint_across_layouts(tmp_path_factory):
    """Saved with K/V heads replicated over tp (or sharded), loaded on pp x dp and by the serial model."""
    n = WORLD.Get_size()
    cfg = config(kv={2: 1}.get(n, 2))  # tp = 2: one K/V head on both ranks; tp = 4: 2 heads, each on 2 ranks
    path = WORLD.bcast(str(tmp_path_factory.mktemp("llama_ckpt")) if WORLD.Get_rank() == 0 else None)
    model = models.GPT(cfg, mpipar.Mesh(**({"pp": 3} if n == 3 else {"tp": n})), dtype=F64)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    models.train_step(model, batches(cfg)[0], opt, model.mesh)
    models.save(model, opt, path)
    saved = model.full_state_dict()
    other = models.GPT(cfg, mpipar.Mesh(pp=2 if n % 2 == 0 else 1, dp=n // 2 if n % 2 == 0 else n), dtype=F64)
    models.load(other, torch.optim.AdamW(other.parameters(), lr=1e-2), path)
    state = other.full_state_dict()
    assert all(torch.equal(state[k], v) for k, v in saved.items())
    serial = models.GPT(cfg, dtype=F64)
    models.load(serial, None, path)
    assert all(torch.equal(serial.state_dict()[k], v) for k, v in saved.items())


@pytest.mark.mpi
def test_bf16_autocast_close_to_serial():
    n = WORLD.Get_size()
    if n not in (2, 4):
        pytest.skip("tp = 2 with dp filling 2 or 4 ranks")
    cfg = config()
    ref, _ = serial_run(cfg, 2, bf16=True)
    mesh = mpipar.Mesh(tp=2, dp=n // 2)
    model = models.GPT(cfg, mesh, dtype=F64, sp_mode="ring")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    losses = [models.train_step(model, b, opt, mesh, num_microbatches=2, bf16=True) for b in batches(cfg)]
    assert all(abs(a - b) < 3e-2 for a, b in zip(losses, ref)), (losses, ref)


@requires_cuda
@pytest.mark.mpi
@pytest.mark.parametrize("dims,opts", [({"tp": 0}, {}), ({"sp": 0}, {}), ({"sp": 0}, {"sp_mode": "ulysses"})],
                         ids=["tp", "sp-ring", "sp-ulysses"])
def test_llama_on_cuda_close_to_serial_cpu(dims, opts):
    """float32 on the GPU (mesh.device) against the float64 serial model on the CPU."""
    n = WORLD.Get_size()
    if 4 % n:
        pytest.skip("4 heads over the ranks")
    cfg = config()
    ref, _ = serial_run(cfg, 2)
    mesh = mpipar.Mesh(**{k: n for k in dims})
    model = models.GPT(cfg, mesh, dtype=torch.float32, **opts)
    assert next(model.parameters()).device.type == "cuda"
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    losses = [models.train_step(model, b, opt, mesh, num_microbatches=2) for b in batches(cfg)]
    assert all(abs(a - b) < 1e-4 for a, b in zip(losses, ref)), (losses, ref)
