"""Tensor-parallel plans for tensor.parallelize, by model family.

    plan = plans.llama(hf_model)      # transformers LlamaForCausalLM (and Mistral-style models)
    tensor.parallelize(hf_model, mesh.tp, plan)

A plan is a dict {pattern: style} with `units` {pattern: head_dim} so that the
projections split whole heads (q, k, v by rows, o by columns).
"""
from __future__ import annotations

from torch import nn


class Plan(dict):
    """{pattern: style} plus `units`: {pattern: the size each shard must be a multiple of}."""

    def __init__(self, entries: dict, units: dict | None = None):
        super().__init__(entries)
        self.units = dict(units or {})


def llama(model: nn.Module) -> Plan:
    """Megatron's split of a transformers Llama: embedding by vocabulary (unless tied to the head),
    q/k/v and gate/up column-parallel, o and down row-parallel; norms and lm_head replicated.

    transformers' attention reshapes q/k/v with `view(..., -1, head_dim)`, so it runs on the
    local heads of the sharded projections unchanged; K/V heads must divide by the group size.
    """
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    layer = "model.layers.*."
    entries = {layer + "self_attn.q_proj": "colwise", layer + "self_attn.k_proj": "colwise",
               layer + "self_attn.v_proj": "colwise", layer + "self_attn.o_proj": "rowwise",
               layer + "mlp.gate_proj": "colwise", layer + "mlp.up_proj": "colwise",
               layer + "mlp.down_proj": "rowwise"}
    if not getattr(cfg, "tie_word_embeddings", False):
        entries = {"model.embed_tokens": "vocab", **entries}
    units = {layer + f"self_attn.{p}_proj": head_dim for p in ("q", "k", "v", "o")}
    return Plan(entries, units)
