"""GPTConfig: the shape of a GPT-2 or Llama-family model, and named presets.

    cfg = GPTConfig(vocab_size, seq_len, hidden, num_heads, num_layers, ffn_hidden=None, seed=0,
                    tied=False, arch="gpt2", num_kv_heads=None, rope_theta=10000.0, norm_eps=1e-5,
                    activation="gelu")
    cfg = preset("llama-tiny", vocab_size=256, seq_len=128)   # a named shape, fields overridable

arch "gpt2": learned positions, LayerNorm (eps norm_eps), biased linears, GELU
MLP (`activation` "gelu" exact, or "gelu_tanh" as Hugging Face's GPT-2).
arch "llama": rotary positions (theta rope_theta), RMSNorm, SwiGLU MLP
(ffn_hidden required), grouped-query attention with num_kv_heads K/V heads
(None: num_heads), no biases.
"""
from __future__ import annotations

import dataclasses

from ..errors import require
from ..model_shape import check_heads, check_sizes

ACTIVATIONS = ("gelu", "gelu_tanh")


@dataclasses.dataclass
class GPTConfig:
    """Shape of a GPT. ffn_hidden=None means 4*hidden (gpt2); tied=True shares the head with tok_emb."""

    vocab_size: int
    seq_len: int
    hidden: int
    num_heads: int
    num_layers: int
    ffn_hidden: int | None = None
    seed: int = 0
    tied: bool = False
    arch: str = "gpt2"
    num_kv_heads: int | None = None
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    activation: str = "gelu"

    def __post_init__(self):
        check_sizes("GPTConfig", self)
        if self.ffn_hidden is None:
            require(self.arch == "gpt2", "GPTConfig: arch='llama' needs ffn_hidden (SwiGLU's width)")
            self.ffn_hidden = 4 * self.hidden
        check_heads("GPTConfig", self)
        require(_is_int(self.seed), f"GPTConfig: seed must be an int, got {self.seed!r}")
        require(isinstance(self.tied, bool), f"GPTConfig: tied must be a bool, got {self.tied!r}")
        if self.num_kv_heads is None:
            self.num_kv_heads = self.num_heads
        require(_is_int(self.num_kv_heads) and self.num_kv_heads > 0 and self.num_heads % self.num_kv_heads == 0,
                f"GPTConfig: num_kv_heads {self.num_kv_heads!r} must be a positive divisor of num_heads "
                f"{self.num_heads}")
        require(self.arch == "llama" or self.num_kv_heads == self.num_heads,
                "GPTConfig: num_kv_heads != num_heads needs arch='llama'")
        require(self.arch == "gpt2" or self.head_dim % 2 == 0,
                f"GPTConfig: rotary positions need an even head_dim, got {self.head_dim}")
        for name in ("rope_theta", "norm_eps"):
            value = getattr(self, name)
            require(isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0,
                    f"GPTConfig: {name} must be a positive number, got {value!r}")
        require(self.activation in ACTIVATIONS, f"GPTConfig: activation must be one of {ACTIVATIONS}")

    @property
    def head_dim(self) -> int:
        return self.hidden // self.num_heads

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def num_params(self) -> int:
        """Parameter count of the serial model."""
        h, f, v, s, n = self.hidden, self.ffn_hidden, self.vocab_size, self.seq_len, self.num_layers
        head = 0 if self.tied else v * h
        if self.arch == "llama":
            kv = self.num_kv_heads * self.head_dim
            block = 2 * h + (2 * h * h + 2 * h * kv) + 3 * h * f
            return v * h + n * block + h + head
        block = 4 * h + (3 * h * h + 3 * h) + (h * h + h) + (h * f + f) + (f * h + h)
        return v * h + s * h + n * block + 2 * h + head


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# Shapes by name (vocab_size and seq_len are the data's: override them). The Llama shapes follow
# the published small Llama-family models (SmolLM/TinyLlama-style widths, GQA 3:1 or 4:1).
PRESETS = {
    "llama-tiny": dict(arch="llama", hidden=64, num_heads=4, num_kv_heads=2, num_layers=4, ffn_hidden=176),
    "llama-small": dict(arch="llama", hidden=256, num_heads=8, num_kv_heads=4, num_layers=8, ffn_hidden=704),
    "llama-160m": dict(arch="llama", hidden=768, num_heads=12, num_kv_heads=4, num_layers=12, ffn_hidden=2048),
    "llama-1b": dict(arch="llama", hidden=2048, num_heads=32, num_kv_heads=8, num_layers=16, ffn_hidden=8192,
                     rope_theta=500000.0),
    "gpt2-tiny": dict(arch="gpt2", hidden=64, num_heads=4, num_layers=4, activation="gelu_tanh"),
    "gpt2-small": dict(arch="gpt2", hidden=768, num_heads=12, num_layers=12, activation="gelu_tanh", tied=True),
}


def preset(name: str, vocab_size: int, seq_len: int, **overrides) -> GPTConfig:
    """GPTConfig of a named shape (PRESETS) with the data's vocab_size and seq_len."""
    require(name in PRESETS, f"unknown model preset {name!r}; known: {sorted(PRESETS)}")
    kw = dict(PRESETS[name])
    kw.update(overrides)
    return GPTConfig(vocab_size=vocab_size, seq_len=seq_len, **kw)
