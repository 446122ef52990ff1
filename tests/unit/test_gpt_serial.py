"""The serial GPT, its training step, checkpoints, data and shard geometry: no MPI."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from mpipar import models
from mpipar.errors import MpiparError
from mpipar.models.gpt import Block, param_names
from mpipar.models.shards import assemble, take_shard

F64 = torch.float64


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: one intra-op thread is fastest (and immune to a loaded machine)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def cfg(**kw):
    base = dict(vocab_size=32, seq_len=16, hidden=16, num_heads=4, num_layers=2)
    base.update(kw)
    return models.GPTConfig(**base)


def batch(n=4, seq=16, vocab=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, seq), generator=g), torch.randint(0, vocab, (n, seq), generator=g)


def test_config_defaults_and_errors():
    assert cfg().ffn_hidden == 64
    for bad in (dict(hidden=18), dict(num_layers=0), dict(vocab_size=-1), dict(seq_len=2.5), dict(tied=1)):
        with pytest.raises(MpiparError):
            cfg(**bad)


@pytest.mark.parametrize("tied", [False, True])
def test_names_count_and_factory(tied):
    c = cfg(tied=tied)
    model = models.GPT(c)
    assert isinstance(model, models.SerialGPT) and isinstance(model, models.GPT)
    assert list(model.state_dict()) == param_names(c)
    assert sum(p.numel() for p in model.parameters()) == c.num_params()
    assert (model.head is None) == tied
    with pytest.raises(MpiparError):
        models.SerialGPT(c, mesh=object())


def test_init_is_deterministic_and_per_component():
    a, b = models.GPT(cfg(seed=5)), models.GPT(cfg(seed=5))
    other = models.GPT(cfg(seed=6))
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k])
    assert not torch.equal(a.blocks[1].attn.qkv.weight, other.blocks[1].attn.qkv.weight)
    # a block built alone (as a pipeline stage does) equals the model's block, in any dtype
    alone = Block(cfg(seed=5), 1, dtype=F64)
    assert torch.equal(alone.mlp.fc2.weight, a.blocks[1].mlp.fc2.weight.double())
    assert torch.equal(alone.attn.qkv.bias, torch.zeros(48, dtype=F64))


def test_forward_is_causal_and_matches_manual():
    model = models.GPT(cfg(), dtype=F64)
    tokens, _ = batch()
    logits = model(tokens)
    assert logits.shape == (4, 16, 32)
    changed = tokens.clone()
    changed[:, 10:] = (changed[:, 10:] + 1) % 32
    assert torch.allclose(model(changed)[:, :10], logits[:, :10])
    assert not torch.allclose(model(changed)[:, 10:], logits[:, 10:])
    x = model.tok_emb(tokens) + model.pos_emb.weight[:16]
    for blk in model.blocks:
        x = x + blk.attn(blk.ln1(x))
        x = x + blk.mlp(blk.ln2(x))
    assert torch.allclose(model.head(model.ln_f(x)), logits)


def test_tied_head_uses_embedding():
    model = models.GPT(cfg(tied=True), dtype=F64)
    tokens, targets = batch()
    model.loss(tokens, targets).backward()
    assert model.tok_emb.weight.grad is not None
    x = model.ln_f(model.blocks[1](model.blocks[0](model.tok_emb(tokens) + model.pos_emb.weight)))
    assert torch.allclose(model(tokens), x @ model.tok_emb.weight.T)


def test_bad_tokens():
    model = models.GPT(cfg())
    with pytest.raises(MpiparError, match="exceeds"):
        model(torch.zeros(2, 17, dtype=torch.long))
    with pytest.raises(MpiparError, match="integer"):
        model(torch.zeros(2, 16))


def _train(m=1, steps=3, **kw):
    model = models.GPT(cfg(tied=True), dtype=F64)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = [models.train_step(model, batch(seed=s), opt, num_microbatches=m, **kw) for s in range(steps)]
    return losses, model.state_dict()


def test_microbatches_checkpointing_and_loss_value():
    ref_losses, ref = _train(1)
    for kw in (dict(m=2), dict(m=4, activation_checkpointing=True)):
        losses, state = _train(**kw)
        assert max(abs(a - b) for a, b in zip(losses, ref_losses)) < 1e-12
        assert max(float((state[k] - ref[k]).abs().max()) for k in ref) < 1e-12
    model = models.GPT(cfg(), dtype=F64)
    tokens, targets = batch()
    expected = F.cross_entropy(model(tokens).flatten(0, 1), targets.flatten()).item()
    assert models.train_step(model, (tokens, targets), torch.optim.SGD(model.parameters(), lr=0.0)) \
        == pytest.approx(expected, abs=1e-12)
    assert all(p.grad is None for p in model.parameters())  # zero_grad ran


def test_bf16_autocast_runs_and_restores_setting():
    losses, _ = _train(1, steps=2)
    model = models.GPT(cfg(tied=True))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    loss = models.train_step(model, batch(seed=0), opt, bf16=True)
    assert model.autocast_dtype is None
    assert abs(loss - losses[0]) < 3e-2


def test_clipping_matches_torch():
    model = models.GPT(cfg(), dtype=F64)
    model.loss(*batch()).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    norm = models.clip_grad_norm(model, 0.1)
    ref = models.GPT(cfg(), dtype=F64)
    for p, g in zip(ref.parameters(), grads):
        p.grad = g.clone()
    ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.1)
    assert norm == pytest.approx(float(ref_norm), rel=1e-12) and norm > 0.1
    for p, q in zip(model.parameters(), ref.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-12, atol=0)


def test_train_step_errors():
    model = models.GPT(cfg())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tokens, targets = batch(n=3)
    with pytest.raises(MpiparError, match="not divisible"):
        models.train_step(model, (tokens, targets), opt, num_microbatches=2)
    with pytest.raises(MpiparError, match="without a mesh"):
        models.train_step(model, (tokens, targets), opt, mesh=object())


def test_loss_falls_on_builtin_corpus():
    corpus = models.CharCorpus(num_chars=20_000)
    c = models.GPTConfig(corpus.vocab_size, 32, 32, 4, 2, seed=1)
    model = models.GPT(c)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = [models.train_step(model, corpus.batch(s, 16, 32), opt) for s in range(30)]
    assert sum(losses[-5:]) / 5 < losses[0] - 0.5


def test_corpus_is_deterministic():
    a, b = models.CharCorpus(5000, seed=2), models.CharCorpus(5000, seed=2)
    assert a.text == b.text and len(a.text) == 5000 and a.vocab_size % 64 == 0
    x, y = a.batch(7, 3, 20)
    assert torch.equal(x, b.batch(7, 3, 20)[0]) and not torch.equal(x, a.batch(8, 3, 20)[0])
    assert torch.equal(x[:, 1:], y[:, :-1]) and x.shape == (3, 20)
    assert a.decode(a.encode("the fox")) == "the fox"


@pytest.mark.parametrize("dim,stride,parts", [(0, 1, 2), (0, 3, 2), (1, 1, 4), (None, 1, 1)])
def test_shard_geometry(dim, stride, parts):
    full = torch.arange(12 * 8).reshape(12, 8)
    pieces = [take_shard(full, r, parts, dim, stride) for r in range(parts)]
    assert torch.equal(assemble(pieces, dim, stride), full)
    if stride == 3:  # rank 0 holds the first half of q, of k and of v
        assert torch.equal(pieces[0][:, 0], torch.tensor([0, 8, 32, 40, 64, 72]))


def test_serial_checkpoint_roundtrip_and_refusals(tmp_path):
    model = models.GPT(cfg(), dtype=F64)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    models.train_step(model, batch(seed=0), opt)
    models.save(model, opt, str(tmp_path), extra={"step": 1})
    next_loss = models.train_step(model, batch(seed=1), opt)
    fresh = models.GPT(cfg(seed=9), dtype=F64)
    opt2 = torch.optim.AdamW(fresh.parameters(), lr=0.5)
    assert models.load(fresh, opt2, str(tmp_path)) == {"step": 1}
    assert opt2.param_groups[0]["lr"] == 1e-2
    assert models.train_step(fresh, batch(seed=1), opt2) == next_loss
    with pytest.raises(MpiparError, match="model shape differs"):
        models.load(models.GPT(cfg(num_layers=3)), None, str(tmp_path))
    shard = tmp_path / "shard-pp0-tp0.pt"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(MpiparError, match="shard shard-pp0-tp0.pt is truncated"):
        models.load(fresh, opt2, str(tmp_path))
    shard.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(MpiparError, match="shard shard-pp0-tp0.pt is corrupt"):
        models.load(fresh, opt2, str(tmp_path))
    os.remove(tmp_path / "manifest.json")
    with pytest.raises(MpiparError, match="incomplete"):
        models.load(fresh, opt2, str(tmp_path))


def test_serial_model_imports_no_mpi():
    code = ("import sys, torch; from mpipar import models; m = models.GPT(models.GPTConfig(8, 4, 8, 2, 1)); "
            "m(torch.zeros(1, 4, dtype=torch.long)); assert 'mpi4py.MPI' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
