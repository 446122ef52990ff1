"""Sharded checkpoints: saved in one layout, loaded in another (or serial), bad shards refused."""
from __future__ import annotations

import os
import shutil
import tempfile

import pytest
import torch
from mpi4py import MPI

import mpipar
from mpipar import models
from mpipar.errors import MpiparError

WORLD = MPI.COMM_WORLD
F64 = torch.float64
SERIAL = None
# (world size, layout saved, layout loaded, tied); layouts are (dp, pp, sp, tp), SERIAL = no mesh
PAIRS = [
    (1, (1, 1, 1, 1), SERIAL, False),
    (2, (1, 2, 1, 1), (1, 1, 1, 2), True),
    (2, (1, 1, 2, 1), SERIAL, False),
    (3, (1, 3, 1, 1), (3, 1, 1, 1), False),
    (4, (1, 2, 1, 2), (1, 4, 1, 1), False),
    (4, (2, 1, 2, 1), (1, 1, 1, 4), True),
    (4, (1, 1, 1, 4), (1, 2, 2, 1), False),
    (4, (2, 2, 1, 1), SERIAL, True),
]


@pytest.fixture
def ckpt_dir():
    path = WORLD.bcast(tempfile.mkdtemp(prefix="mpipar-ckpt-") if WORLD.rank == 0 else None)
    yield path
    WORLD.Barrier()
    if WORLD.rank == 0:
        shutil.rmtree(path, ignore_errors=True)


def config(tied):
    return models.GPTConfig(vocab_size=32, seq_len=16, hidden=16, num_heads=4, num_layers=4, tied=tied, seed=7)


def batches():
    g = torch.Generator().manual_seed(5)
    return [tuple(torch.randint(0, 32, (12, 16), generator=g) for _ in range(2)) for _ in range(4)]


def build(cfg, layout):
    if layout is SERIAL:
        model, mesh = models.GPT(cfg, dtype=F64), None
    else:
        dp, pp, sp, tp = layout
        mesh = mpipar.Mesh(tp=tp, pp=pp, sp=sp, dp=dp)
        model = models.GPT(cfg, mesh, dtype=F64)
    return model, mesh, torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)


def step(model, mesh, opt, b):
    return models.train_step(model, b, opt, mesh, num_microbatches=2)


@pytest.mark.mpi
@pytest.mark.parametrize("size,saved,loaded,tied", PAIRS)
def test_resume_in_another_layout(size, saved, loaded, tied, ckpt_dir):
    if WORLD.Get_size() != size:
        pytest.skip(f"pair for {size} ranks")
    cfg, data = config(tied), batches()
    model, mesh, opt = build(cfg, saved)
    for b in data[:2]:
        step(model, mesh, opt, b)
    models.save(model, opt, ckpt_dir, extra={"step": 2})
    at_save = model.full_state_dict()
    expected = [step(model, mesh, opt, b) for b in data[2:]]
    final = model.full_state_dict()

    other, mesh2, opt2 = build(models.GPTConfig(**{**cfg.to_dict(), "seed": 99}), loaded)
    assert models.load(other, opt2, ckpt_dir) == {"step": 2}
    restored = other.full_state_dict()
    for k, v in at_save.items():
        assert torch.equal(restored[k], v), k
    got = [step(other, mesh2, opt2, b) for b in data[2:]]
    assert max(abs(a - b) for a, b in zip(got, expected)) < 1e-12, (got, expected)
    after = other.full_state_dict()
    assert max(float((after[k] - final[k]).abs().max()) for k in final) < 1e-12


def _damage(path, name, how):
    if WORLD.rank == 0:
        file = os.path.join(path, name)
        data = open(file, "rb").read()
        data = data[: len(data) // 3] if how == "truncate" else data[:100] + bytes([data[100] ^ 0xFF]) + data[101:]
        with open(file, "wb") as f:
            f.write(data)
    WORLD.Barrier()


@pytest.mark.mpi
@pytest.mark.parametrize("how", ["truncate", "flip"])
def test_damaged_shard_refused_on_every_rank(how, ckpt_dir):
    n = WORLD.Get_size()
    layout = (1, 1, 1, n) if n in (1, 2, 4) else (1, n, 1, 1)
    model, mesh, opt = build(config(False), layout)
    step(model, mesh, opt, batches()[0])
    models.save(model, opt, ckpt_dir)
    before = [p.detach().clone() for p in model.parameters()]
    bad = f"shard-pp{n - 1 if layout[1] > 1 else 0}-tp{n - 1 if layout[3] > 1 else 0}.pt"
    _damage(ckpt_dir, bad, how)
    word = "truncated" if how == "truncate" else "corrupt"
    with pytest.raises(MpiparError, match=f"shard {bad} is {word}"):
        models.load(model, opt, ckpt_dir)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))  # nothing changed
    serial, _, _ = build(config(False), SERIAL)
    with pytest.raises(MpiparError, match=bad):
        models.load(serial, None, ckpt_dir)


@pytest.mark.mpi
def test_incomplete_or_mismatched_checkpoint(ckpt_dir):
    n = WORLD.Get_size()
    model, mesh, opt = build(config(False), (n, 1, 1, 1))
    with pytest.raises(MpiparError, match="incomplete"):
        models.load(model, opt, ckpt_dir)
    models.save(model, opt, ckpt_dir)
    tied, mesh2, _ = build(config(True), (n, 1, 1, 1))
    with pytest.raises(MpiparError, match="model shape differs: tied"):
        models.load(tied, None, ckpt_dir)
    models.load(model, None, ckpt_dir)  # an intact checkpoint still loads, optimizer optional
