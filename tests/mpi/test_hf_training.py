"""A transformers model trained by mpipar on a parallel layout equals the same model trained by transformers.

The Llama (grouped K/V) and GPT-2 (tied, Conv1D) models are built by
transformers from a tiny random config (float64), converted with
models.from_hf, trained 3 AdamW steps on this world's layout, converted back
with models.to_hf: the weights equal those of the transformers model trained
the same 3 steps on the same batches (1e-8), and the losses agree (1e-9).
transformers' LlamaRMSNorm computes in float32 even for float64 models; it is
patched to the input's precision, as in tests/unit/test_hf_interop.py.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from mpi4py import MPI

import mpipar
from mpipar import models

transformers = pytest.importorskip("transformers")
WORLD = MPI.COMM_WORLD
F64 = torch.float64
STEPS = 3
LAYOUTS = {1: {"dp": 1}, 2: {"tp": 2}, 3: {"pp": 3}, 4: {"tp": 2, "sp": 2}}
GPT2_LAYOUTS = {1: {"dp": 1}, 2: {"pp": 2}, 3: {"sp": 3}, 4: {"dp": 2, "tp": 2}}


def _rmsnorm_forward(self, x):
    h = x.to(torch.promote_types(x.dtype, torch.float32))
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
    return self.weight * h.to(x.dtype)


def hf_llama():
    torch.manual_seed(0)
    c = transformers.LlamaConfig(vocab_size=64, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                                 num_hidden_layers=3, intermediate_size=48, max_position_embeddings=24,
                                 rope_theta=1000.0, rms_norm_eps=1e-6, attn_implementation="sdpa")
    return transformers.LlamaForCausalLM(c).to(F64).eval()


def hf_gpt2():
    torch.manual_seed(0)
    c = transformers.GPT2Config(vocab_size=64, n_positions=24, n_embd=32, n_layer=2, n_head=4,
                                bos_token_id=None, eos_token_id=None, attn_implementation="sdpa")
    return transformers.GPT2LMHeadModel(c).to(F64).eval()


def batches():
    """One batch, three times: the loss must fall (the steps do something)."""
    g = torch.Generator().manual_seed(4)
    return [tuple(torch.randint(0, 64, (4, 24), generator=g) for _ in range(2))] * STEPS


def train_hf(hf):
    opt = torch.optim.AdamW(hf.parameters(), lr=1e-2, weight_decay=0.1)
    losses = []
    for x, y in batches():
        loss = F.cross_entropy(hf(x).logits.flatten(0, 1), y.reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    return losses


@pytest.mark.mpi
@pytest.mark.parametrize("make,layouts", [(hf_llama, LAYOUTS), (hf_gpt2, GPT2_LAYOUTS)], ids=["llama", "gpt2"])
def test_trained_on_a_layout_equals_transformers_trained(monkeypatch, tmp_path_factory, make, layouts):
    """The Llama model reaches the layout through a save_pretrained folder read lazily (tensor by tensor)."""
    from transformers.models.llama import modeling_llama

    monkeypatch.setattr(modeling_llama.LlamaRMSNorm, "forward", _rmsnorm_forward)
    hf = make()
    cfg, state = models.from_hf(hf)
    if make is hf_llama:
        path = str(tmp_path_factory.mktemp("hf")) if WORLD.Get_rank() == 0 else None
        if path:
            hf.save_pretrained(path)
        path = WORLD.bcast(path)
        loaded_cfg, state = models.load_pretrained(path, lazy=True)
        assert loaded_cfg == cfg
    mesh = mpipar.Mesh(**layouts[WORLD.Get_size()])
    model = models.GPT(cfg, mesh, dtype=F64)
    model.load_full_state_dict(state)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    losses = [models.train_step(model, b, opt, mesh, num_microbatches=2) for b in batches()]
    trained = models.to_hf(cfg, model.full_state_dict())
    ref_losses = train_hf(hf)
    for a, b in zip(losses, ref_losses):
        assert abs(a - b) < 1e-9, (losses, ref_losses)
    ref = hf.state_dict()
    worst = max(float((trained[k] - ref[k]).abs().max()) for k in trained)
    assert worst < 1e-8, f"weights differ from transformers' by {worst}"
    assert ref_losses[-1] < ref_losses[0]
