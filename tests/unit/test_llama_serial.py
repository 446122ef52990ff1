"""The serial Llama (no MPI): names, parameter count, config errors, presets, layout-free initialisation."""
from __future__ import annotations

import pytest
import torch

from mpipar import models
from mpipar.errors import MpiparError
from mpipar.models.gpt import Block, param_names
from mpipar.layers.rotary import apply_rotary, rotary_tables


def cfg(**kw):
    base = dict(vocab_size=32, seq_len=16, hidden=32, num_heads=4, num_layers=2, ffn_hidden=48, arch="llama",
                num_kv_heads=2)
    base.update(kw)
    return models.GPTConfig(**base)


@pytest.mark.parametrize("tied,kv", [(False, 2), (True, 1), (False, 4)])
def test_names_and_count(tied, kv):
    c = cfg(tied=tied, num_kv_heads=kv)
    model = models.GPT(c)
    assert list(model.state_dict()) == param_names(c)
    assert sum(p.numel() for p in model.parameters()) == c.num_params()
    assert model.pos_emb is None and all(p.bias is None for p in (model.blocks[0].attn.k, model.blocks[0].mlp.up))
    assert isinstance(model, models.GPT) and isinstance(model.ln_f, models.RMSNorm)


def test_config_errors():
    for bad in (dict(ffn_hidden=None), dict(num_kv_heads=3), dict(hidden=36, num_heads=12, num_kv_heads=12),
                dict(arch="bert"), dict(rope_theta=0), dict(activation="relu")):
        with pytest.raises(MpiparError):
            cfg(**bad)
    with pytest.raises(MpiparError, match="needs arch='llama'"):
        models.GPTConfig(32, 16, 32, 4, 2, num_kv_heads=2)


def test_presets():
    for name in models.PRESETS:
        c = models.preset(name, vocab_size=512, seq_len=128)
        assert c.vocab_size == 512 and c.seq_len == 128 and c.num_params() > 0
    assert models.preset("llama-1b", 128256, 2048).num_params() > 1e9
    with pytest.raises(MpiparError, match="unknown model preset"):
        models.preset("llama-7t", 10, 10)


def test_block_alone_equals_the_models_block():
    """A pipeline stage builds its blocks alone: the same numbers as the whole model, in any dtype."""
    model = models.GPT(cfg(seed=4))
    alone = Block(cfg(seed=4), 1, dtype=torch.float64)
    for k, v in alone.state_dict().items():
        assert torch.equal(v, model.blocks[1].state_dict()[k].double()), k
    other = models.GPT(cfg(seed=5))
    assert not torch.equal(other.blocks[1].attn.k.weight, model.blocks[1].attn.k.weight)


def test_rotary_is_relative():
    """q.k after rotation depends only on the distance of the positions (what lets each rank use global ones)."""
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(8, generator=g, dtype=torch.float64), torch.randn(8, generator=g, dtype=torch.float64)
    cos, sin = rotary_tables(torch.arange(40), 8, 100.0, torch.float64)
    dot = [float(apply_rotary(q, cos[i], sin[i]) @ apply_rotary(k, cos[i + 3], sin[i + 3])) for i in (0, 17, 36)]
    assert max(dot) - min(dot) < 1e-5  # float32 tables
    assert abs(float(apply_rotary(q, cos[0], sin[0]) @ apply_rotary(k, cos[5], sin[5])) - dot[0]) > 1e-3


def test_causal():
    model = models.GPT(cfg(), dtype=torch.float64)
    tokens = torch.randint(0, 32, (2, 16), generator=torch.Generator().manual_seed(0))
    changed = tokens.clone()
    changed[:, 9:] = (changed[:, 9:] + 1) % 32
    a, b = model(tokens), model(changed)
    assert torch.equal(a[:, :9], b[:, :9]) and not torch.allclose(a[:, 9:], b[:, 9:])
