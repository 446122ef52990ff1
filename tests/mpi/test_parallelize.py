"""tensor.parallelize + tensor.plans.llama on an unmodified transformers LlamaForCausalLM (TP = world size).

The parallelized model's loss equals the serial model's (float64, 1e-10) and
every parameter's gradient equals its shard of the serial gradient; a bad
plan raises MpiparError on every rank before anything is replaced.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from mpi4py import MPI

import mpipar
from mpipar import tensor
from mpipar.errors import MpiparError
from mpipar.tensor import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding
from mpipar.tensor.sharding import take_shard

transformers = pytest.importorskip("transformers")
WORLD = MPI.COMM_WORLD
F64 = torch.float64


def hf_llama(tied=False):
    n = WORLD.Get_size()
    heads, kv, hidden = (6, 3, 24) if n == 3 else (8, 4, 32)  # K/V heads divisible by the group size
    torch.manual_seed(0)
    c = transformers.LlamaConfig(vocab_size=48, hidden_size=hidden, num_attention_heads=heads,
                                 num_key_value_heads=kv, num_hidden_layers=2, intermediate_size=48,
                                 max_position_embeddings=16, rms_norm_eps=1e-6, tie_word_embeddings=tied,
                                 attn_implementation="sdpa")
    return transformers.LlamaForCausalLM(c).to(F64)


def loss_of(model, x, y):
    return F.cross_entropy(model(x).logits.flatten(0, 1), y.reshape(-1))


def local_of(name, module, full):
    """This rank's shard of the serial tensor `full` held by parameter `name` of `module`."""
    owner = module.get_submodule(name.rpartition(".")[0])
    r, n = owner.group.rank if hasattr(owner, "group") else 0, owner.group.size if hasattr(owner, "group") else 1
    if isinstance(owner, (ColumnParallelLinear, VocabParallelEmbedding)):
        return take_shard(full, r, n, 0)
    if isinstance(owner, RowParallelLinear) and name.endswith("weight"):
        return take_shard(full, r, n, 1)
    return full


@pytest.mark.mpi
@pytest.mark.parametrize("tied", [False, True])
def test_llama_loss_and_grads_equal_serial(tied):
    serial = hf_llama(tied)
    model = copy.deepcopy(serial)
    mesh = mpipar.Mesh(tp=WORLD.Get_size())
    out = tensor.parallelize(model, mesh.tp, tensor.plans.llama(model))
    assert out is model
    expect_vocab = not tied and mesh.tp.size >= 1
    assert isinstance(model.model.embed_tokens, VocabParallelEmbedding) == expect_vocab
    assert isinstance(model.model.layers[1].self_attn.k_proj, ColumnParallelLinear)
    g = torch.Generator().manual_seed(3)
    x, y = (torch.randint(0, 48, (2, 16), generator=g) for _ in range(2))
    ref = loss_of(serial, x, y)
    ref.backward()
    loss = loss_of(model, x, y)
    loss.backward()
    assert abs(float(loss.detach()) - float(ref.detach())) < 1e-10
    ref_grads = dict(serial.named_parameters())
    worst = 0.0
    for name, p in model.named_parameters():
        expected = local_of(name, model, ref_grads[name].grad)
        assert p.grad.shape == expected.shape, name
        worst = max(worst, float((p.grad - expected).abs().max()))
    assert worst < 1e-10, worst


@pytest.mark.mpi
def test_bad_plans_raise_everywhere():
    n = WORLD.Get_size()
    model = hf_llama()
    mesh = mpipar.Mesh(tp=n)
    with pytest.raises(MpiparError, match="matches no submodule"):
        tensor.parallelize(model, mesh.tp, {"model.layers.*.self_attn.qkv": "colwise"})
    with pytest.raises(MpiparError, match="style must be one of"):
        tensor.parallelize(model, mesh.tp, {"model.layers.*.mlp.up_proj": "diagonal"})
    with pytest.raises(MpiparError, match="needs an Embedding"):
        tensor.parallelize(model, mesh.tp, {"model.layers.*.mlp.up_proj": "vocab"})
    if n > 1:
        plan = tensor.plans.llama(model)
        plan.units = {k: 7 * 8 for k in plan.units}  # 7-head units: no group size here divides them
        with pytest.raises(MpiparError, match="not divisible by the group size"):
            tensor.parallelize(model, mesh.tp, plan)
        # a plan only one rank got wrong still raises on every rank
        mine = {"model.layers.*.mlp.up_proj": "colwise" if WORLD.Get_rank() else "rowwise"}
        with pytest.raises(MpiparError, match="differs"):
            tensor.parallelize(model, mesh.tp, mine)
    assert isinstance(model.model.layers[0].mlp.up_proj, torch.nn.Linear)  # nothing was replaced
