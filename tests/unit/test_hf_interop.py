"""Hugging Face interop (serial, no MPI): mpipar's logits equal transformers' (float64), round trips exact.

transformers' LlamaRMSNorm computes in float32 even for a float64 model; the
Llama tests patch it to compute in the input's precision (mpipar's RMSNorm
computes in at least float32, i.e. float64 here), so the comparison can be
exact to 1e-10. Nothing is downloaded: tiny random configs.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from mpipar import models
from mpipar.errors import MpiparError

transformers = pytest.importorskip("transformers")
F64 = torch.float64


def _rmsnorm_forward(self, x):
    h = x.to(torch.promote_types(x.dtype, torch.float32))
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
    return self.weight * h.to(x.dtype)


@pytest.fixture
def exact_hf_rmsnorm(monkeypatch):
    from transformers.models.llama import modeling_llama

    monkeypatch.setattr(modeling_llama.LlamaRMSNorm, "forward", _rmsnorm_forward)


def hf_llama(tied=False, kv=2, seed=0):
    torch.manual_seed(seed)
    c = transformers.LlamaConfig(vocab_size=64, hidden_size=32, num_attention_heads=4, num_key_value_heads=kv,
                                 num_hidden_layers=2, intermediate_size=48, max_position_embeddings=32,
                                 rope_theta=1000.0, rms_norm_eps=1e-6, tie_word_embeddings=tied,
                                 attn_implementation="sdpa")
    model = transformers.LlamaForCausalLM(c).to(F64).eval()
    with torch.no_grad():  # random norms too, so a swapped norm cannot hide
        for n, p in model.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
    return model


def hf_gpt2(seed=0, activation="gelu_new"):
    torch.manual_seed(seed)
    c = transformers.GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                                activation_function=activation, bos_token_id=None, eos_token_id=None,
                                attn_implementation="sdpa")
    model = transformers.GPT2LMHeadModel(c).to(F64).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "ln" in n or n.endswith("bias"):
                p.uniform_(-0.5, 0.5) if n.endswith("bias") else p.uniform_(0.5, 1.5)
    return model


def tokens(n=3, seq=32):
    return torch.randint(0, 64, (n, seq), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("tied,kv", [(False, 2), (True, 1), (False, 4)])
def test_llama_logits_equal_transformers(exact_hf_rmsnorm, tied, kv):
    hf = hf_llama(tied, kv)
    cfg, state = models.from_hf(hf)
    assert cfg.arch == "llama" and cfg.num_kv_heads == kv and cfg.tied == tied and cfg.rope_theta == 1000.0
    model = models.GPT(cfg, dtype=F64)
    model.load_full_state_dict(state)
    x = tokens()
    with torch.no_grad():
        ours, theirs = model(x), hf(x).logits
    assert float((ours - theirs).abs().max()) < 1e-10


@pytest.mark.parametrize("activation", ["gelu_new", "gelu"])
def test_gpt2_logits_equal_transformers(activation):
    hf = hf_gpt2(activation=activation)
    cfg, state = models.from_hf(hf)
    assert cfg.activation == {"gelu_new": "gelu_tanh", "gelu": "gelu"}[activation] and cfg.tied
    model = models.GPT(cfg, dtype=F64)
    model.load_full_state_dict(state)
    x = tokens()
    with torch.no_grad():
        ours, theirs = model(x), hf(x).logits
    assert float((ours - theirs).abs().max()) < 1e-10


@pytest.mark.parametrize("make", [lambda: hf_llama(), lambda: hf_llama(tied=True), lambda: hf_gpt2()])
def test_round_trip_is_exact(make):
    hf = make()
    cfg, state = models.from_hf(hf)
    back = models.to_hf(cfg, state)
    ref = hf.state_dict()
    assert set(back) == set(ref)
    assert all(torch.equal(back[k], ref[k]) for k in ref)
    fresh = type(hf)(models.to_hf_config(cfg)).to(F64)
    missing, unexpected = fresh.load_state_dict(back, strict=False)
    assert not unexpected and not [m for m in missing if "lm_head" not in m]
    x = tokens()
    with torch.no_grad():
        assert torch.equal(fresh(x).logits, hf(x).logits)


@pytest.mark.parametrize("make", [lambda: hf_llama(), lambda: hf_gpt2()])
def test_load_pretrained_from_a_local_folder(tmp_path, make):
    hf = make()
    hf.save_pretrained(tmp_path, safe_serialization=True)
    cfg, state = models.load_pretrained(str(tmp_path))
    ref_cfg, ref_state = models.from_hf(hf)
    assert cfg == ref_cfg and list(state) == list(ref_state)
    assert all(torch.equal(state[k], ref_state[k]) for k in ref_state)
    lazy_cfg, lazy = models.load_pretrained(str(tmp_path), lazy=True)
    assert isinstance(lazy, models.LazyState) and lazy_cfg == cfg and list(lazy) == list(ref_state)
    assert all(lazy.shape_of(k) == list(v.shape) and torch.equal(lazy[k], v) for k, v in ref_state.items())
    from mpipar.tensor.sharding import take_shard

    for k, v in ref_state.items():  # slices read from the file equal slices of the tensor
        for dim in range(v.dim()):
            for stride in (1, 3) if k.endswith("qkv.weight") else (1,):
                assert torch.equal(lazy.shard(k, 1, 2, dim, stride), take_shard(v, 1, 2, dim, stride)), (k, dim)
    model = models.GPT(cfg, dtype=F64)
    model.load_full_state_dict(lazy)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in ref_state.items())
    with pytest.raises(MpiparError, match="no config.json"):
        models.load_pretrained(str(tmp_path / "nothing"))


def test_unsupported_models_raise():
    c = transformers.LlamaConfig(vocab_size=64, hidden_size=32, num_attention_heads=4, num_hidden_layers=1,
                                 intermediate_size=48, attention_bias=True)
    with pytest.raises(MpiparError, match="biased"):
        models.from_hf(transformers.LlamaForCausalLM(c))
    cfg = models.GPTConfig(64, 32, 32, 4, 2, ffn_hidden=48, arch="llama")
    with pytest.raises(MpiparError, match="missing"):
        models.GPT(cfg).load_full_state_dict({})


def test_token_file_batches_are_windows(tmp_path):
    ids = np.arange(1000, dtype=np.uint16) * 7 % 50000
    path = tmp_path / "tokens.bin"
    ids.tofile(path)
    data = models.TokenFile(str(path), dtype="uint16")
    assert len(data) == 1000 and data.max_id() == int(ids.max())
    x, y = data.batch(5, batch_size=4, seq_len=16, seed=2)
    assert x.shape == y.shape == (4, 16) and x.dtype == torch.int64
    for row_x, row_y in zip(x, y):
        start = int(np.flatnonzero(ids == int(row_x[0]))[0])
        assert torch.equal(row_x, torch.from_numpy(ids[start:start + 16].astype(np.int64)))
        assert torch.equal(row_y, torch.from_numpy(ids[start + 1:start + 17].astype(np.int64)))
    again, _ = data.batch(5, 4, 16, seed=2)
    other, _ = data.batch(6, 4, 16, seed=2)
    assert torch.equal(x, again) and not torch.equal(x, other)
    ids32 = np.array([70000, 1, 2, 3], dtype=np.uint32)
    ids32.tofile(tmp_path / "big.bin")
    assert models.TokenFile(str(tmp_path / "big.bin"), "uint32").batch(0, 1, 3)[0][0].tolist() == [70000, 1, 2]
    with pytest.raises(MpiparError):
        models.TokenFile(str(path), dtype="int8")
