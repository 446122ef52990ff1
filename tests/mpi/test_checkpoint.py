"""Sharded checkpoints: saved in one layout, loaded in another (or serial), bad shards refused."""
from __future__ import annotations

import os
import shutil
import tempfile
import warnings

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


def _rewrite(path, name, data):
    """Rank 0: replace file `name` of checkpoint `path` by `data` and make the manifest match it."""
    import hashlib
    import json

    if WORLD.rank == 0:
        with open(os.path.join(path, name), "wb") as f:
            f.write(data)
        with open(os.path.join(path, "manifest.json")) as f:
            manifest = json.load(f)
        manifest["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
        with open(os.path.join(path, "manifest.json"), "w") as f:
            json.dump(manifest, f)
    WORLD.Barrier()


def _layout(n):
    return (1, 1, 1, n) if n in (1, 2, 4) else (1, n, 1, 1)


@pytest.mark.mpi
def test_save_step_keeps_newest_and_latest_skips_half_saves(ckpt_dir):
    n = WORLD.Get_size()
    model, mesh, opt = build(config(False), _layout(n))
    for s in range(1, 5):
        step(model, mesh, opt, batches()[s - 1])
        path = models.save_step(model, opt, ckpt_dir, s * 10, extra={"lr": 0.5}, keep=2)
        assert path == os.path.join(ckpt_dir, f"step-{s * 10:06d}")
    WORLD.Barrier()
    assert sorted(os.listdir(ckpt_dir)) == ["step-000030", "step-000040"]
    WORLD.Barrier()
    if WORLD.rank == 0:  # what a killed save leaves: a hidden temp folder, and a step folder without manifest
        os.makedirs(os.path.join(ckpt_dir, ".step-000050.tmp-somehost-1"))
        os.makedirs(os.path.join(ckpt_dir, "step-000060"))
    WORLD.Barrier()
    assert models.latest(ckpt_dir) == os.path.join(ckpt_dir, "step-000040")
    other, mesh2, opt2 = build(config(False), _layout(n))
    loaded = models.load_full(other, opt2, ckpt_dir)
    assert loaded.extra == {"lr": 0.5, "step": 40} and loaded.path.endswith("step-000040")
    assert all(torch.equal(a, b) for a, b in zip(other.parameters(), model.parameters()))


@pytest.mark.mpi
def test_damaged_newest_falls_back_to_older_with_warning(ckpt_dir):
    n = WORLD.Get_size()
    model, mesh, opt = build(config(False), _layout(n))
    step(model, mesh, opt, batches()[0])
    models.save_step(model, opt, ckpt_dir, 1)
    at_1 = [p.detach().clone() for p in model.parameters()]
    step(model, mesh, opt, batches()[1])
    newest = models.save_step(model, opt, ckpt_dir, 2)
    bad = f"shard-pp{n - 1 if n == 3 else 0}-tp{0 if n == 3 else n - 1}.pt"
    _damage(newest, bad, "flip")
    with pytest.raises(MpiparError, match=f"shard {bad} is corrupt"):  # a step folder itself: refused
        models.load(model, opt, newest)
    other, _, opt2 = build(config(False), _layout(n))
    if WORLD.rank == 0:
        with pytest.warns(UserWarning, match=f"{bad} is corrupt.*falling back"):
            extra = models.load(other, opt2, ckpt_dir)
    else:
        extra = models.load(other, opt2, ckpt_dir)
    assert extra == {"step": 2 - 1}
    assert all(torch.equal(a, b) for a, b in zip(other.parameters(), at_1))
    _damage(os.path.join(ckpt_dir, "step-000001"), "meta.json", "truncate")
    with pytest.raises(MpiparError, match="none of its 2 step folders loads"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fallback from step 2 to step 1, which fails too
        models.load(other, opt2, ckpt_dir)


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch PAYLOAD_RAN",))


@pytest.mark.mpi
@pytest.mark.parametrize("target", ["shard", "meta", "rank"])
def test_pickle_payload_is_refused_naming_the_file(target, ckpt_dir, tmp_path, monkeypatch):
    import io
    import json

    monkeypatch.chdir(WORLD.bcast(str(tmp_path)))
    n = WORLD.Get_size()
    model, mesh, opt = build(config(False), _layout(n))
    step(model, mesh, opt, batches()[0])
    models.save(model, opt, ckpt_dir, extra={"step": 1}, rank_state={"seed": torch.arange(3)})
    if target == "meta":  # a JSON file cannot hold a payload; a meta.pt of the old format can: read as weights
        name = "meta.pt"
        if WORLD.rank == 0:
            manifest_file = os.path.join(ckpt_dir, "manifest.json")
            manifest = json.load(open(manifest_file))
            manifest["version"] = 1
            json.dump(manifest, open(manifest_file, "w"))
            os.remove(os.path.join(ckpt_dir, "meta.json"))
    else:
        name = "shard-pp0-tp0.pt" if target == "shard" else f"rank{n - 1}.pt"
    buf = io.BytesIO()
    torch.save({"params": _Payload(), "optim": {}, "param_groups": [], "extra": None}, buf)
    _rewrite(ckpt_dir, name, buf.getvalue())
    with pytest.raises(MpiparError, match=f"file {name} holds objects other than tensors"):
        models.load_full(model, opt, ckpt_dir)
    assert not os.path.exists("PAYLOAD_RAN")


@pytest.mark.mpi
def test_rank_state_returns_on_the_same_layout_only(ckpt_dir):
    n = WORLD.Get_size()
    model, mesh, opt = build(config(False), _layout(n))
    mine = {"rank": WORLD.rank, "state": torch.full((3,), WORLD.rank, dtype=torch.uint8), "t": (1, 2.5)}
    models.save(model, opt, ckpt_dir, rank_state=mine)
    got = models.load_full(model, opt, ckpt_dir).rank_state
    assert got["rank"] == WORLD.rank and torch.equal(got["state"], mine["state"]) and tuple(got["t"]) == (1, 2.5)
    serial, _, _ = build(config(False), SERIAL)
    if n > 1:
        assert models.load_full(serial, None, ckpt_dir).rank_state is None


@pytest.mark.mpi
def test_extra_must_be_json_and_save_failure_keeps_old(ckpt_dir):
    n = WORLD.Get_size()
    model, mesh, opt = build(config(False), _layout(n))
    models.save_step(model, opt, ckpt_dir, 1)
    with pytest.raises(MpiparError, match="must be JSON"):
        models.save_step(model, opt, ckpt_dir, 2, extra={"bad": object()})
    WORLD.Barrier()
    assert sorted(os.listdir(ckpt_dir)) == ["step-000001"]
    assert models.load(model, opt, ckpt_dir) == {"step": 1}


@pytest.mark.mpi
def test_zero_checkpoint_is_atomic_and_refuses_a_payload(ckpt_dir, tmp_path, monkeypatch):
    import io

    n = WORLD.Get_size()
    if n == 1:
        pytest.skip("ZeRO shards over dp > 1")
    monkeypatch.chdir(WORLD.bcast(str(tmp_path)))
    dp = 2 if n == 4 else n  # the batch of 12 splits over dp x 2 microbatches
    mesh = mpipar.Mesh(tp=n // dp, pp=1, sp=1, dp=dp)
    model = models.GPT(config(False), mesh, dtype=F64, zero=2)
    opt = models.optimizer(model, torch.optim.AdamW, lr=1e-2)
    step(model, mesh, opt, batches()[0])
    path = models.save_step(model, opt, ckpt_dir, 1)
    WORLD.Barrier()
    assert sorted(os.listdir(ckpt_dir)) == ["step-000001"] and models.latest(ckpt_dir) == path  # no leftovers
    assert models.load(model, opt, ckpt_dir) == {"step": 1}
    assert os.path.isfile(os.path.join(path, "meta.json"))  # metadata is JSON, as for plain checkpoints
    buf = io.BytesIO()
    torch.save({"fragments": _Payload()}, buf)
    shard = "zero-pp0-tp0-d0.pt"  # a shard file: read with weights_only=True
    _rewrite(path, shard, buf.getvalue())
    with pytest.raises(MpiparError, match=f"file {shard} holds objects other than tensors"):
        models.load(model, opt, path)
    assert not os.path.exists("PAYLOAD_RAN")
