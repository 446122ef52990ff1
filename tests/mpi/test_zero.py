"""ZeRO 1, 2, 3 (GPT(cfg, mesh, zero=z) + models.optimizer) train exactly like the serial GPT.

Every layout of this world size with dp > 1 (float64, AdamW, clipping by the
global norm): losses to 1e-9 and full_state_dict to 1e-8 of the serial run;
plus pipeline schedules, tied embeddings, activation checkpointing and bf16
(parameters and autocast); the optimizer state a rank holds is 1/d of the
model's (+ padding), ZeRO-3 holds 1/d of the parameters between steps; bad
stages and non-elementwise optimizers raise MpiparError on every rank;
checkpoints written shard by shard resume training exactly across zero stages
(and to the serial model, and from a plain checkpoint) and layouts.
"""
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
N = WORLD.Get_size()
F64 = torch.float64
STEPS, BATCH = 4, 24
LAYOUTS = {1: [(1, 1, 1, 1)], 2: [(2, 1, 1, 1)], 3: [(3, 1, 1, 1)],   # (dp, pp, sp, tp); 1 rank: shards of 1
           4: [(4, 1, 1, 1), (2, 2, 1, 1), (2, 1, 2, 1), (2, 1, 1, 2)]}.get(N, [])


def config(tied=False):
    return models.GPTConfig(vocab_size=32, seq_len=16, hidden=16, num_heads=4, num_layers=4, tied=tied, seed=3)


def batches():
    """STEPS steps on one batch (the loss falls: a run that does not train fails)."""
    g = torch.Generator().manual_seed(11)
    return [(torch.randint(0, 32, (BATCH, 16), generator=g), torch.randint(0, 32, (BATCH, 16), generator=g))] * STEPS


_SERIAL: dict = {}


def serial_run(cfg, m, **opts):
    key = (repr(cfg), m, tuple(sorted(opts.items())))
    if key not in _SERIAL:
        model = models.GPT(cfg, dtype=F64, zero=0)
        opt = models.optimizer(model, torch.optim.AdamW, lr=1e-2, weight_decay=0.1)
        losses = [models.train_step(model, b, opt, num_microbatches=m, max_grad_norm=0.2, **opts) for b in batches()]
        _SERIAL[key] = (losses, model.state_dict())
    return _SERIAL[key]


def parallel(cfg, layout, zero, num_chunks=1, dtype=F64):
    dp, pp, sp, tp = layout
    mesh = mpipar.Mesh(tp=tp, pp=pp, sp=sp, dp=dp)
    model = models.GPT(cfg, mesh, num_chunks, dtype=dtype, bucket_bytes=2048, zero=zero)
    return mesh, model, models.optimizer(model, torch.optim.AdamW, lr=1e-2, weight_decay=0.1)


def check_same(cfg, layout, zero, m=2, schedule="1f1b", num_chunks=1, **opts):
    ref_losses, ref_state = serial_run(cfg, m, **opts)
    mesh, model, opt = parallel(cfg, layout, zero, num_chunks)
    losses = [models.train_step(model, b, opt, mesh, num_microbatches=m, schedule=schedule, max_grad_norm=0.2,
                                **opts) for b in batches()]
    assert all(row == losses for row in WORLD.allgather(losses)), "the loss differs between ranks"
    for step, (a, b) in enumerate(zip(losses, ref_losses)):
        assert abs(a - b) < 1e-9, f"step {step}: loss {a} != serial {b}"
    state = model.full_state_dict()
    assert list(state) == list(ref_state)
    worst = max(float((state[k] - ref_state[k]).abs().max()) for k in ref_state)
    assert worst < 1e-8, f"final parameters differ from the serial model's by {worst}"
    assert ref_losses[-1] < ref_losses[0] - 0.05


needs_dp = pytest.mark.skipif(not LAYOUTS, reason="needs 1-4 ranks")


@pytest.mark.mpi
@needs_dp
@pytest.mark.parametrize("zero", [1, 2, 3])
@pytest.mark.parametrize("layout", LAYOUTS or [None])
def test_every_layout_matches_serial(layout, zero):
    check_same(config(), layout, zero, m=4 if layout[1] > 1 else 2)


@pytest.mark.mpi
@pytest.mark.skipif(N != 4, reason="pipeline schedules with dp = 2 need 4 ranks")
@pytest.mark.parametrize("zero,schedule,chunks", [(3, "zb-h1", 1), (3, "interleaved-1f1b", 2), (2, "gpipe", 1),
                                                  (1, "zb-h1", 1)])
def test_pipeline_schedules(zero, schedule, chunks):
    check_same(config(), (2, 2, 1, 1), zero, m=4, schedule=schedule, num_chunks=chunks)


@pytest.mark.mpi
@needs_dp
@pytest.mark.parametrize("zero", [1, 3])
def test_tied_embeddings(zero):
    layout = (2, 2, 1, 1) if N == 4 else LAYOUTS[0]
    check_same(config(tied=True), layout, zero, m=4 if layout[1] > 1 else 2)


@pytest.mark.mpi
@needs_dp
@pytest.mark.parametrize("zero", [1, 3])
def test_llama_with_grouped_kv_heads(zero):
    """RoPE, SwiGLU, RMSNorm and one K/V head (replicated over tp at 4 ranks: counted once in the norm)."""
    cfg = models.GPTConfig(vocab_size=32, seq_len=16, hidden=16, num_heads=4, num_layers=4, ffn_hidden=32, seed=3,
                           arch="llama", num_kv_heads=1)
    check_same(cfg, (2, 1, 1, 2) if N == 4 else LAYOUTS[0], zero)


@pytest.mark.mpi
@needs_dp
def test_activation_checkpointing_zero3():
    check_same(config(), LAYOUTS[-1], 3, m=2 if LAYOUTS[-1][1] == 1 else 4, activation_checkpointing=True)


@pytest.mark.mpi
@needs_dp
@pytest.mark.parametrize("zero", [1, 2, 3])
def test_optimizer_state_is_one_dth(zero):
    layout = LAYOUTS[0]
    d = layout[0] * layout[2]
    mesh, model, opt = parallel(config(), layout, zero)
    models.train_step(model, batches()[0], opt, mesh, num_microbatches=2)
    local = sum(p.numel() for p in model.parameters())
    state = sum(t.numel() for s in opt.state.values() for t in s.values() if torch.is_tensor(t) and t.dim() > 0)
    buckets = len(model.buckets.buckets)
    assert 2 * local / d <= state <= 2 * (local / d + buckets), (state, local, d)
    plain = models.optimizer(models.GPT(config(), dtype=F64), torch.optim.AdamW)
    assert isinstance(plain, torch.optim.AdamW) and len(plain.param_groups[0]["params"]) == 4 * 12 + 5


@pytest.mark.mpi
@needs_dp
@pytest.mark.parametrize("zero", [1, 2])
def test_a_parameter_without_gradient_contributes_zeros(zero):
    """zero=1 copies each parameter's first gradient of a step into the persistent buffer, which
    still holds the last step's: a parameter that got none this step must count as zeros."""
    mesh, model, opt = parallel(config(), LAYOUTS[0], zero)
    models.train_step(model, batches()[0], opt, mesh, num_microbatches=1)
    model.start_grad_sync(1)
    model.finish_grad_sync()  # a step whose backward reached no parameter
    grads = [m.grad for m in model.buckets.masters()]
    assert all(g is not None and not g.any() for g in grads)


@pytest.mark.mpi
@needs_dp
def test_zero3_holds_one_dth_of_the_parameters_between_steps():
    layout = LAYOUTS[0]
    d = layout[0] * layout[2]
    mesh, model, opt = parallel(config(), layout, 3)
    local = sum(p.numel() * p.element_size() for p in model.parameters())
    for b in batches()[:2]:
        models.train_step(model, b, opt, mesh, num_microbatches=2)
        held = model.buckets.held_bytes()
        materialised = sum(p.untyped_storage().nbytes() for p in model.parameters())
        assert materialised == 0
        assert local / d <= held["params"] <= local / d + 8 * len(model.buckets.buckets)
        assert held["masters"] == 0  # float64 parameters are their own master copies


@pytest.mark.mpi
@needs_dp
@pytest.mark.parametrize("zero", [1, 3])
def test_bf16_parameters_keep_float32_masters(zero):
    cfg = config()
    mesh, model, opt = parallel(cfg, LAYOUTS[0], zero, dtype=torch.bfloat16)
    ref_mesh, ref_model, ref_opt = parallel(cfg, LAYOUTS[0], 0, dtype=torch.bfloat16)
    ref_opt = torch.optim.AdamW(ref_model.parameters(), lr=1e-2, weight_decay=0.1)
    assert all(m.dtype == torch.float32 for m in model.buckets.masters())
    losses, ref = [], []
    for b in batches():
        losses.append(models.train_step(model, b, opt, mesh, num_microbatches=2, max_grad_norm=0.2))
        ref.append(models.train_step(ref_model, b, ref_opt, mesh, num_microbatches=2, max_grad_norm=0.2))
    assert losses[-1] < losses[0] - 0.1
    assert max(abs(a - b) for a, b in zip(losses, ref)) < 0.05   # bf16 updates lose precision without masters
    for bucket in model.buckets.buckets:
        assert torch.equal(bucket.shard, bucket.master.detach().to(torch.bfloat16))


@pytest.mark.mpi
@needs_dp
def test_bf16_autocast_close_to_replicated():
    cfg = config()
    out = []
    for zero in (0, 3):
        mesh, model, opt = parallel(cfg, LAYOUTS[0], zero, dtype=torch.float32)
        if zero == 0:
            opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
        out.append([models.train_step(model, b, opt, mesh, num_microbatches=2, bf16=True) for b in batches()])
    assert max(abs(a - b) for a, b in zip(*out)) < 1e-4


@pytest.mark.mpi
def test_bad_stage_raises_everywhere():
    mesh = mpipar.Mesh(dp=N)
    for bad in (4, -1, True, "1"):
        with pytest.raises(MpiparError, match="zero must be one of"):
            models.GPT(config(), mesh, zero=bad)
    if N > 1:
        with pytest.raises(MpiparError, match="zero differs across ranks"):
            models.GPT(config(), mesh, zero=1 if WORLD.rank == 0 else 2)
    with pytest.raises(MpiparError, match="zero must be 0"):
        models.GPT(config(), zero=1)


@pytest.mark.mpi
def test_non_elementwise_optimizer_raises_everywhere():
    mesh = mpipar.Mesh(dp=N)
    model = models.GPT(config(), mesh, dtype=F64, zero=2)
    with pytest.raises(MpiparError, match="elementwise optimizer"):
        models.optimizer(model, torch.optim.LBFGS if WORLD.rank == 0 else torch.optim.AdamW, lr=1e-2)
    with pytest.raises(MpiparError, match="torch.optim.Optimizer class"):
        models.optimizer(model, "AdamW")

    class MyElementwise(torch.optim.SGD):
        elementwise = True

    assert isinstance(models.optimizer(model, MyElementwise, lr=0.1), MyElementwise)
    replicated = models.GPT(config(), mesh, dtype=F64, zero=0)
    assert isinstance(models.optimizer(replicated, torch.optim.LBFGS), torch.optim.LBFGS)


@pytest.fixture
def ckpt_dir():
    path = WORLD.bcast(tempfile.mkdtemp(prefix="mpipar-zero-") if WORLD.rank == 0 else None)
    yield os.path.join(path, "ckpt")
    WORLD.Barrier()
    if WORLD.rank == 0:
        shutil.rmtree(path, ignore_errors=True)


def _resume_case(path, saved_by, loaded_into):
    """Train 2 steps under `saved_by` = (layout, zero), save, load into `loaded_into` (None: serial),
    train 2 more: the losses continue the uninterrupted serial run's."""
    cfg = config()
    ref_losses, ref_state = serial_run(cfg, 2)
    mesh, model, opt = parallel(cfg, *saved_by)
    for b in batches()[:2]:
        models.train_step(model, b, opt, mesh, num_microbatches=2, max_grad_norm=0.2)
    models.save(model, opt, path, extra={"step": 2})
    if loaded_into is None:
        mesh, model = None, models.GPT(cfg, dtype=F64)
        opt = models.optimizer(model, torch.optim.AdamW, lr=1e-2, weight_decay=0.1)
    else:
        mesh, model, opt = parallel(cfg, *loaded_into)
    assert models.load(model, opt, path) == {"step": 2}
    losses = [models.train_step(model, b, opt, mesh, num_microbatches=2, max_grad_norm=0.2) for b in batches()[2:]]
    for a, b in zip(losses, ref_losses[2:]):
        assert abs(a - b) < 1e-9, (losses, ref_losses[2:])
    state = model.full_state_dict()
    assert max(float((state[k] - ref_state[k]).abs().max()) for k in ref_state) < 1e-8


@pytest.mark.mpi
@needs_dp
@pytest.mark.parametrize("saved_zero,loaded_zero", [(3, 1), (2, None), (0, 2), (1, 0)])
def test_checkpoint_across_stages(ckpt_dir, saved_zero, loaded_zero):
    layout = LAYOUTS[0]
    _resume_case(ckpt_dir, (layout, saved_zero), None if loaded_zero is None else (layout, loaded_zero))


@pytest.mark.mpi
@pytest.mark.skipif(N != 4, reason="two layouts of 4 ranks")
def test_checkpoint_across_layouts(ckpt_dir):
    _resume_case(ckpt_dir, ((2, 1, 1, 2), 3), ((2, 2, 1, 1), 2))


@pytest.mark.mpi
@needs_dp
def test_checkpoint_missing_shard_raises_everywhere(ckpt_dir):
    path = ckpt_dir
    mesh, model, opt = parallel(config(), LAYOUTS[0], 2)
    models.save(model, opt, path)
    WORLD.Barrier()
    if WORLD.rank == 0:
        os.remove(os.path.join(path, sorted(f for f in os.listdir(path) if f.startswith("zero-"))[-1]))
    WORLD.Barrier()
    with pytest.raises(MpiparError, match="missing"):
        models.load(model, opt, path)


@pytest.mark.mpi
def test_plain_optimizer_on_a_zero_model_raises_everywhere():
    mesh = mpipar.Mesh(dp=N)
    model = models.GPT(config(), mesh, dtype=F64, zero=1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    with pytest.raises(MpiparError, match="models.optimizer"):
        models.train_step(model, batches()[0], opt, mesh, num_microbatches=2)


@pytest.mark.mpi
@needs_dp
@pytest.mark.parametrize("zero", [1, 3])
def test_load_full_state_dict_reaches_shards_and_masters(zero):
    """Weights set from a serial state (e.g. models.from_hf) are what the optimizer steps from."""
    other = models.GPT(models.GPTConfig(vocab_size=32, seq_len=16, hidden=16, num_heads=4, num_layers=4, seed=9),
                       dtype=torch.bfloat16).state_dict()
    mesh, model, opt = parallel(config(), LAYOUTS[0], zero, dtype=torch.bfloat16)
    model.load_full_state_dict(other)
    state = model.full_state_dict()
    assert all(torch.equal(state[k], other[k]) for k in other)
    for b in model.buckets.buckets:
        assert torch.equal(b.master.detach().to(torch.bfloat16), b.shard)
    if zero == 3:
        assert sum(p.untyped_storage().nbytes() for p in model.parameters()) == 0


@pytest.mark.mpi
@needs_dp
def test_save_step_atomic_with_rank_state(ckpt_dir):
    """ZeRO checkpoints go through the atomic writer's steps: run folders, keep, latest, rank_state."""
    from mpipar.models import checkpoint

    mesh, model, opt = parallel(config(), LAYOUTS[0], 2)
    models.train_step(model, batches()[0], opt, mesh, num_microbatches=2)
    first = checkpoint.save_step(model, opt, ckpt_dir, 1, keep=1, rank_state={"rank": WORLD.rank})
    second = checkpoint.save_step(model, opt, ckpt_dir, 2, keep=1, rank_state={"rank": WORLD.rank})
    WORLD.Barrier()
    assert second.endswith("step-000002") and checkpoint.latest(ckpt_dir) == second
    assert sorted(os.listdir(ckpt_dir)) == ["step-000002"] and not os.path.exists(first)
    assert "meta.json" in os.listdir(second)
    loaded = checkpoint.load_full(model, opt, ckpt_dir)
    assert loaded.path == second and loaded.extra == {"step": 2} and loaded.rank_state == {"rank": WORLD.rank}


@pytest.mark.mpi
@needs_dp
@pytest.mark.parametrize("zero,dtype", [(1, F64), (2, F64), (3, F64), (1, torch.bfloat16), (3, torch.bfloat16)])
def test_shared_memory_path_equals_mpi(zero, dtype, monkeypatch, shm_counts):
    """ZeRO's buffers in node shared memory (mpipar.models.zero.shared; MPIPAR_SYMMETRIC_BUCKETS=1)
    give the numbers of the MPI path (=0): bit for bit at dp <= 2, to the last bits beyond
    (MPI's order of summation may differ). The model stays usable after close()."""
    layout = LAYOUTS[0]
    d = layout[0] * layout[2]
    runs = {}
    for mode in ("0", "1"):
        with monkeypatch.context() as env:  # (Mesh() reads the environment)
            env.setenv("MPIPAR_SYMMETRIC_BUCKETS", mode)
            env.delenv("MPIPAR_FAKE_RANKS_PER_NODE", raising=False)
            mesh, model, opt = parallel(config(), layout, zero, dtype=dtype)
            shared = model.buckets.shared
            losses = [models.train_step(model, b, opt, mesh, num_microbatches=2, max_grad_norm=0.2)
                      for b in batches()]
            calls = {op: shm_counts.calls(model.buckets.group, op) if shared is not None else 0
                     for op in ("reduce_scatter_blocks", "all_gather_blocks", "gather_pieces")}
            shm_counts.reset()
            state = model.full_state_dict()
            model.buckets.close()
            after = model.full_state_dict() if zero < 3 else state
            runs[mode] = (shared is not None, calls, losses, state)
        assert all(torch.equal(after[k], state[k]) for k in state)
    assert runs["0"][0] is False and runs["1"][0] is (d > 1)
    if d > 1:
        assert runs["1"][1]["reduce_scatter_blocks"] >= STEPS
        gather = "gather_pieces" if zero == 3 else "all_gather_blocks"
        assert runs["1"][1][gather] >= STEPS
    for k, want in runs["0"][3].items():
        got = runs["1"][3][k]
        if d <= 2:
            assert torch.equal(got, want), k
        else:
            assert torch.allclose(got, want, rtol=1e-12, atol=1e-14), k
    if d <= 2:
        assert runs["1"][2] == runs["0"][2]


@pytest.mark.mpi
@pytest.mark.skipif(N < 2, reason="a wait needs a peer")
@pytest.mark.parametrize("zero", [1, 3])
@pytest.mark.parametrize("shm", ["0", "1"])
def test_flight_verdict_names_the_zero_group_of_a_wait(zero, shm, monkeypatch):
    """Rank 1 stalls inside its forward; the others end up waiting in one of ZeRO's reduce-scatters
    or all-gathers. Every rank's flight record, taken mid-wait, gives a verdict that names the
    operation and ZeRO's group (not 'group not known')."""
    import threading
    import time

    from mpipar.flight.dump import record
    from mpipar.flight.verdict import analyse

    monkeypatch.setenv("MPIPAR_SYMMETRIC_BUCKETS", shm)
    monkeypatch.delenv("MPIPAR_FAKE_RANKS_PER_NODE", raising=False)
    mesh, model, opt = parallel(config(), (N, 1, 1, 1), zero)
    models.train_step(model, batches()[0], opt, mesh, num_microbatches=1)  # a step that completes
    if WORLD.rank == 1:
        model.blocks[list(model.blocks)[-1]].register_forward_hook(lambda *_: time.sleep(2.0))
    taken = {}
    timer = threading.Timer(1.0, lambda: taken.update(record=record("watchdog")))
    WORLD.Barrier()
    timer.start()
    models.train_step(model, batches()[1], opt, mesh, num_microbatches=1)
    timer.join()
    model.buckets.close()
    records = dict(enumerate(WORLD.allgather(taken["record"])))
    verdict = analyse(records)
    first = verdict.findings[0] if verdict.findings else None
    assert first is not None and first.kind == "hang", str(verdict)
    assert first.op in ("reduce_scatter", "all_gather") and "zero" in first.group, str(verdict)
    assert 1 in first.missing and 0 in first.waiting, str(verdict)
    assert "group not known" not in str(verdict)
