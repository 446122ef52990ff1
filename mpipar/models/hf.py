"""Hugging Face interop: transformers' Llama and GPT-2 models to and from mpipar's serial names.

    cfg, state = from_hf(hf_model)            # LlamaForCausalLM (Mistral without sliding window) or GPT2LMHeadModel
    cfg, state = load_pretrained(DIR)         # a local save_pretrained folder (config.json + *.safetensors)
    model = models.GPT(cfg, mesh); model.load_full_state_dict(state)
    hf_state = to_hf(cfg, model.full_state_dict())   # transformers' names (load_state_dict on its model)
    hf_config = to_hf_config(cfg)              # a transformers config for the same shape

GPT-2's Conv1D weights are [in, out] (nn.Linear's transposed): they are
transposed both ways. GPT-2's "gelu_new" is the tanh GELU (activation
"gelu_tanh"). Only what mpipar's models express is accepted (no biases in
Llama, default rotary, no sliding window): anything else is an MpiparError.
Reading a folder needs `safetensors` only, not transformers (nothing is downloaded).
"""
from __future__ import annotations

import json
import os

import torch

from ..errors import MpiparError, require
from .config import GPTConfig
from .gpt import check_state, param_names

GELU = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}
LLAMA_TYPES = ("llama", "mistral")
LLAMA_LAYER = {"input_layernorm.weight": "ln1.weight", "self_attn.q_proj.weight": "attn.q.weight",
               "self_attn.k_proj.weight": "attn.k.weight", "self_attn.v_proj.weight": "attn.v.weight",
               "self_attn.o_proj.weight": "attn.proj.weight", "post_attention_layernorm.weight": "ln2.weight",
               "mlp.gate_proj.weight": "mlp.gate.weight", "mlp.up_proj.weight": "mlp.up.weight",
               "mlp.down_proj.weight": "mlp.down.weight"}
GPT2_LAYER = {"ln_1.weight": "ln1.weight", "ln_1.bias": "ln1.bias", "attn.c_attn.weight": "attn.qkv.weight",
              "attn.c_attn.bias": "attn.qkv.bias", "attn.c_proj.weight": "attn.proj.weight",
              "attn.c_proj.bias": "attn.proj.bias", "ln_2.weight": "ln2.weight", "ln_2.bias": "ln2.bias",
              "mlp.c_fc.weight": "mlp.fc1.weight", "mlp.c_fc.bias": "mlp.fc1.bias",
              "mlp.c_proj.weight": "mlp.fc2.weight", "mlp.c_proj.bias": "mlp.fc2.bias"}
CONV1D = ("attn.qkv.weight", "attn.proj.weight", "mlp.fc1.weight", "mlp.fc2.weight")


def config_from_hf(d: dict, seq_len: int | None = None, seed: int = 0) -> GPTConfig:
    """GPTConfig of a transformers config (as its to_dict()); seq_len (Llama) bounds the training length."""
    kind = d.get("model_type")
    if kind in LLAMA_TYPES:
        heads = d["num_attention_heads"]
        head_dim = d.get("head_dim") or d["hidden_size"] // heads
        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
        require(rope.get("rope_type", rope.get("type", "default")) == "default",
                f"from_hf: rotary scaling {rope} is not supported (only the default rotary)")
        require(head_dim * heads == d["hidden_size"], "from_hf: head_dim * num_attention_heads != hidden_size")
        require(not d.get("attention_bias") and not d.get("mlp_bias"), "from_hf: biased Llama layers are not supported")
        require(d.get("hidden_act", "silu") == "silu", f"from_hf: hidden_act {d.get('hidden_act')!r} (need silu)")
        require(d.get("sliding_window") is None, "from_hf: sliding-window attention is not supported")
        return GPTConfig(vocab_size=d["vocab_size"], seq_len=seq_len or d["max_position_embeddings"],
                         hidden=d["hidden_size"], num_heads=heads, num_layers=d["num_hidden_layers"],
                         ffn_hidden=d["intermediate_size"], seed=seed, tied=bool(d.get("tie_word_embeddings")),
                         arch="llama", num_kv_heads=d.get("num_key_value_heads") or heads,
                         rope_theta=float(rope.get("rope_theta", d.get("rope_theta", 10000.0))),
                         norm_eps=float(d.get("rms_norm_eps", 1e-6)))
    if kind == "gpt2":
        act = d.get("activation_function", "gelu_new")
        require(act in GELU, f"from_hf: GPT-2 activation {act!r} is not supported")
        require(not d.get("scale_attn_by_inverse_layer_idx") and not d.get("reorder_and_upcast_attn")
                and d.get("scale_attn_weights", True), "from_hf: GPT-2 attention scaling options not supported")
        require(seq_len in (None, d["n_positions"]), "from_hf: GPT-2's seq_len is its n_positions")
        return GPTConfig(vocab_size=d["vocab_size"], seq_len=d["n_positions"], hidden=d["n_embd"],
                         num_heads=d["n_head"], num_layers=d["n_layer"], ffn_hidden=d.get("n_inner") or 4 * d["n_embd"],
                         seed=seed, tied=bool(d.get("tie_word_embeddings", True)), arch="gpt2",
                         norm_eps=float(d.get("layer_norm_epsilon", 1e-5)), activation=GELU[act])
    raise MpiparError(f"from_hf: model_type {kind!r} is not supported (llama, mistral, gpt2)")


def _prefixes(cfg: GPTConfig):
    if cfg.arch == "llama":
        return "model.layers.", LLAMA_LAYER, {"model.embed_tokens.weight": "tok_emb.weight",
                                              "model.norm.weight": "ln_f.weight", "lm_head.weight": "head.weight"}
    return "transformer.h.", GPT2_LAYER, {"transformer.wte.weight": "tok_emb.weight",
                                          "transformer.wpe.weight": "pos_emb.weight",
                                          "transformer.ln_f.weight": "ln_f.weight",
                                          "transformer.ln_f.bias": "ln_f.bias", "lm_head.weight": "head.weight"}


def state_from_hf(cfg: GPTConfig, hf_state: dict) -> dict:
    """mpipar's serial state of transformers' state_dict (extra buffers and a tied lm_head ignored)."""
    layers, per_layer, top = _prefixes(cfg)
    out = {}
    for name, t in hf_state.items():
        if name in top:
            if not (cfg.tied and top[name] == "head.weight"):
                out[top[name]] = t
        elif name.startswith(layers):
            index, _, leaf = name[len(layers):].partition(".")
            if leaf in per_layer:
                key = per_layer[leaf]
                out[f"blocks.{index}.{key}"] = t.t() if cfg.arch == "gpt2" and key in CONV1D else t
    check_state(out, cfg)
    return {k: out[k].detach().clone().contiguous() for k in param_names(cfg)}


def from_hf(hf_model, seq_len: int | None = None, seed: int = 0) -> tuple[GPTConfig, dict]:
    """(GPTConfig, serial state) of a transformers LlamaForCausalLM / MistralForCausalLM / GPT2LMHeadModel."""
    cfg = config_from_hf(hf_model.config.to_dict(), seq_len, seed)
    return cfg, state_from_hf(cfg, hf_model.state_dict())


def to_hf(cfg: GPTConfig, state: dict) -> dict:
    """transformers' state_dict of an mpipar serial state (GPT-2 Conv1D weights transposed back)."""
    check_state(state, cfg)
    layers, per_layer, top = _prefixes(cfg)
    inverse_top = {v: k for k, v in top.items()}
    inverse_layer = {v: k for k, v in per_layer.items()}
    out = {}
    for name, t in state.items():
        if name.startswith("blocks."):
            index, _, leaf = name[len("blocks."):].partition(".")
            conv1d = cfg.arch == "gpt2" and leaf in CONV1D
            out[f"{layers}{index}.{inverse_layer[leaf]}"] = t.t().contiguous() if conv1d else t
        else:
            out[inverse_top[name]] = t
    if cfg.tied:
        out["lm_head.weight"] = state["tok_emb.weight"]
    return out


def to_hf_config(cfg: GPTConfig):
    """A transformers LlamaConfig / GPT2Config of the same shape (needs transformers)."""
    import transformers

    if cfg.arch == "llama":
        return transformers.LlamaConfig(
            vocab_size=cfg.vocab_size, hidden_size=cfg.hidden, num_attention_heads=cfg.num_heads,
            num_key_value_heads=cfg.num_kv_heads, num_hidden_layers=cfg.num_layers,
            intermediate_size=cfg.ffn_hidden, max_position_embeddings=cfg.seq_len, rope_theta=cfg.rope_theta,
            rms_norm_eps=cfg.norm_eps, tie_word_embeddings=cfg.tied, attention_bias=False, mlp_bias=False)
    act = {"gelu": "gelu", "gelu_tanh": "gelu_new"}[cfg.activation]
    return transformers.GPT2Config(
        vocab_size=cfg.vocab_size, n_positions=cfg.seq_len, n_embd=cfg.hidden, n_head=cfg.num_heads,
        n_layer=cfg.num_layers, n_inner=cfg.ffn_hidden, layer_norm_epsilon=cfg.norm_eps, activation_function=act,
        tie_word_embeddings=cfg.tied, bos_token_id=None, eos_token_id=None,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)


def load_pretrained(path: str, seq_len: int | None = None, seed: int = 0, dtype=None) -> tuple[GPTConfig, dict]:
    """(GPTConfig, serial state) from a local `save_pretrained` folder: config.json and model.safetensors
    (or the shards of model.safetensors.index.json). No network, no transformers."""
    from safetensors.torch import load_file

    require(os.path.isfile(os.path.join(path, "config.json")), f"load_pretrained: no config.json in {path!r}")
    with open(os.path.join(path, "config.json")) as f:
        cfg = config_from_hf(json.load(f), seq_len, seed)
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    hf_state = {}
    for name in files:
        file = os.path.join(path, name)
        require(os.path.isfile(file), f"load_pretrained: {file!r} is missing (only safetensors are read)")
        hf_state.update(load_file(file))
    state = state_from_hf(cfg, hf_state)
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    return cfg, state
