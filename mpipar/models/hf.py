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
from collections.abc import Mapping

import torch

from ..errors import MpiparError, require
from .config import GPTConfig
from ..tensor.sharding import take_shard
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


def serial_name(cfg: GPTConfig, hf_name: str) -> tuple[str, bool] | None:
    """(mpipar's serial name, whether to transpose) of a transformers tensor name, or None (not a weight
    mpipar holds: buffers, a tied lm_head)."""
    layers, per_layer, top = _prefixes(cfg)
    if hf_name in top:
        return None if cfg.tied and top[hf_name] == "head.weight" else (top[hf_name], False)
    if hf_name.startswith(layers):
        index, _, leaf = hf_name[len(layers):].partition(".")
        if leaf in per_layer:
            key = per_layer[leaf]
            return f"blocks.{index}.{key}", cfg.arch == "gpt2" and key in CONV1D
    return None


def state_from_hf(cfg: GPTConfig, hf_state: dict) -> dict:
    """mpipar's serial state of transformers' state_dict (extra buffers and a tied lm_head ignored)."""
    out = {}
    for name, t in hf_state.items():
        target = serial_name(cfg, name)
        if target is not None:
            out[target[0]] = t.t() if target[1] else t
    check_state(out, cfg)
    return {k: out[k].detach().clone().contiguous() for k in param_names(cfg)}


class LazyState(Mapping):
    """A serial state read from safetensors files one tensor at a time, when indexed.

    A parallel model's `load_full_state_dict` reads only its shard of each
    tensor (`shard`: row or column slices straight from the file where the
    split is contiguous there), so no rank holds the whole model.
    `shape_of(name)` reads only the file's header.
    """

    def __init__(self, cfg: GPTConfig, files: list[str], dtype=None):
        from safetensors import safe_open

        self.dtype, self._where = dtype, {}
        for file in files:
            with safe_open(file, framework="pt") as f:
                for hf_name in f.keys():
                    target = serial_name(cfg, hf_name)
                    if target is not None:
                        shape = f.get_slice(hf_name).get_shape()
                        self._where[target[0]] = (file, hf_name, target[1], shape[::-1] if target[1] else shape)
        check_state(self, cfg)
        self._where = {k: self._where[k] for k in param_names(cfg)}

    def shape_of(self, name: str) -> list[int]:
        return list(self._where[name][3])

    def __getitem__(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        file, hf_name, transpose, _ = self._where[name]
        with safe_open(file, framework="pt") as f:
            t = f.get_tensor(hf_name)
        t = t.t().contiguous() if transpose else t
        return t if self.dtype is None else t.to(self.dtype)

    def shard(self, name: str, part: int, parts: int, dim: int | None, stride: int = 1) -> torch.Tensor:
        """take_shard(self[name], ...) reading only that slice from the file where it is contiguous
        in the file's layout (not transposed, stride 1); the whole tensor otherwise."""
        from safetensors import safe_open

        file, hf_name, transpose, shape = self._where[name]
        if dim is None or parts == 1 or transpose or stride != 1:
            return take_shard(self[name], part, parts, dim, stride)
        size = shape[dim] // parts
        index = tuple(slice(part * size, (part + 1) * size) if d == dim else slice(None) for d in range(len(shape)))
        with safe_open(file, framework="pt") as f:
            t = f.get_slice(hf_name)[index]
        return t if self.dtype is None else t.to(self.dtype)

    def __iter__(self):
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


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


def load_pretrained(path: str, seq_len: int | None = None, seed: int = 0, dtype=None,
                    lazy: bool = False) -> tuple[GPTConfig, dict]:
    """(GPTConfig, serial state) from a local `save_pretrained` folder: config.json and model.safetensors
    (or the shards of model.safetensors.index.json). No network, no transformers.

    lazy=True returns a LazyState (tensors read when indexed) for `load_full_state_dict` on big models.
    """
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
    files = [os.path.join(path, name) for name in files]
    for file in files:
        require(os.path.isfile(file), f"load_pretrained: {file!r} is missing (only safetensors are read)")
    if lazy:
        return cfg, LazyState(cfg, files, dtype)
    hf_state = {}
    for file in files:
        hf_state.update(load_file(file))
    state = state_from_hf(cfg, hf_state)
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    return cfg, state
