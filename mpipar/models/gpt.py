"""The serial GPT: plain torch, no MPI. The reference every parallel layout reproduces.

    cfg = GPTConfig(vocab_size=64, seq_len=32, hidden=64, num_heads=4, num_layers=2)
    model = SerialGPT(cfg)              # what models.GPT(cfg) returns
    logits = model(tokens)              # tokens [B, seq] -> logits [B, seq, vocab]

Architecture (no dropout): a token embedding, `num_layers` pre-norm blocks
``x + attn(ln1(x))``, ``x + mlp(ln2(x))``, a final norm and a bias-free head
(its own weight, or the token embedding's with ``tied=True``).
arch "gpt2": learned position embedding, LayerNorm, models.SelfAttention and
models.MLP. arch "llama": models.GQAttention (rotary positions, grouped K/V
heads), models.SwiGLU and models.RMSNorm, no biases, no position embedding.

Initialisation is deterministic from `cfg.seed` and independent of any layout:
the embeddings, every block and the head each draw from their own
torch.Generator seeded by `component_seed(cfg.seed, name)`, so a pipeline stage
can build only its own layers and still hold exactly the serial numbers.
GPT-2's scheme for both archs: weights N(0, 0.02), residual projections
(attn.proj, mlp.fc2 / mlp.down) N(0, 0.02/sqrt(2*num_layers)), biases 0, norms 1 and 0.
"""
from __future__ import annotations

import math
import zlib

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..errors import require
from .config import GPTConfig
from .serial import MLP, GQAttention, RMSNorm, SelfAttention, SwiGLU

INIT_STD = 0.02


def component_seed(seed: int, name: str) -> int:
    """Seed of one component (e.g. "block.3"): a fixed mix of cfg.seed and the name."""
    return (int(seed) * 1_000_003 + zlib.crc32(name.encode())) % (2 ** 63)


def _normal_(t: torch.Tensor, std: float, gen: torch.Generator) -> None:
    """Draw N(0, std) in float32 on the CPU (same numbers for every dtype/device), copy into t."""
    with torch.no_grad():
        t.copy_(torch.empty(t.shape, dtype=torch.float32).normal_(0.0, std, generator=gen))


@torch.no_grad()
def init_block_(block: "Block", cfg: GPTConfig, index: int) -> "Block":
    """GPT-2 initialisation of block `index` from its own generator."""
    gen = torch.Generator().manual_seed(component_seed(cfg.seed, f"block.{index}"))
    resid_std = INIT_STD / math.sqrt(2 * cfg.num_layers)
    attn, mlp = block.attn, block.mlp
    if cfg.arch == "llama":
        linears = ((attn.q, INIT_STD), (attn.k, INIT_STD), (attn.v, INIT_STD), (attn.proj, resid_std),
                   (mlp.gate, INIT_STD), (mlp.up, INIT_STD), (mlp.down, resid_std))
    else:
        linears = ((attn.qkv, INIT_STD), (attn.proj, resid_std), (mlp.fc1, INIT_STD), (mlp.fc2, resid_std))
    for lin, std in linears:
        _normal_(lin.weight, std, gen)
        if lin.bias is not None:
            lin.bias.zero_()
    for ln in (block.ln1, block.ln2):
        ln.reset_parameters() if isinstance(ln, nn.LayerNorm) else ln.weight.fill_(1.0)
    return block


@torch.no_grad()
def init_embeddings_(tok: nn.Embedding, pos: nn.Embedding | None, cfg: GPTConfig) -> None:
    gen = torch.Generator().manual_seed(component_seed(cfg.seed, "embeddings"))
    _normal_(tok.weight, INIT_STD, gen)
    if pos is not None:
        _normal_(pos.weight, INIT_STD / 2, gen)


@torch.no_grad()
def init_head_(head: nn.Linear, cfg: GPTConfig) -> None:
    gen = torch.Generator().manual_seed(component_seed(cfg.seed, "head"))
    _normal_(head.weight, INIT_STD, gen)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, cfg: GPTConfig, index: int, dtype=None, device=None):
        super().__init__()
        kw = dict(dtype=dtype, device=device)
        self.ln1 = make_norm(cfg, **kw)
        llama = cfg.arch == "llama"
        self.attn = GQAttention(cfg.hidden, cfg.num_heads, cfg.num_kv_heads, cfg.rope_theta, **kw) if llama \
            else SelfAttention(cfg.hidden, cfg.num_heads, causal=True, **kw)
        self.ln2 = make_norm(cfg, **kw)
        self.mlp = SwiGLU(cfg.hidden, cfg.ffn_hidden, **kw) if llama \
            else MLP(cfg.hidden, cfg.ffn_hidden, activation=cfg.activation, **kw)
        init_block_(self, cfg, index)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


def make_norm(cfg: GPTConfig, dtype=None, device=None) -> nn.Module:
    """The arch's norm: LayerNorm (gpt2) or RMSNorm (llama), eps cfg.norm_eps, weight 1 (bias 0)."""
    if cfg.arch == "llama":
        return RMSNorm(cfg.hidden, cfg.norm_eps, dtype=dtype, device=device)
    return nn.LayerNorm(cfg.hidden, eps=cfg.norm_eps, dtype=dtype, device=device)


def make_embeddings(cfg: GPTConfig, dtype=None, device=None) -> tuple[nn.Embedding, nn.Embedding | None]:
    """(token, position) embeddings with their serial initial values (position: None for llama)."""
    tok = nn.Embedding(cfg.vocab_size, cfg.hidden, dtype=dtype, device=device)
    pos = None if cfg.arch == "llama" else nn.Embedding(cfg.seq_len, cfg.hidden, dtype=dtype, device=device)
    init_embeddings_(tok, pos, cfg)
    return tok, pos


def make_head(cfg: GPTConfig, dtype=None, device=None) -> nn.Linear:
    """The untied head nn.Linear(hidden, vocab, bias=False) with its serial initial values."""
    head = nn.Linear(cfg.hidden, cfg.vocab_size, bias=False, dtype=dtype, device=device)
    init_head_(head, cfg)
    return head


def run_blocks(blocks, x: torch.Tensor, activation_checkpointing: bool) -> torch.Tensor:
    """x through `blocks`, recomputing each block in the backward when asked."""
    for block in blocks:
        if activation_checkpointing and torch.is_grad_enabled():
            x = checkpoint(block, x, use_reentrant=False)
        else:
            x = block(x)
    return x


class SerialGPT(nn.Module):
    """GPT on one process. forward(tokens [B, seq]) -> logits [B, seq, vocab].

    Parameter names (the checkpoint and `full_state_dict` names of every layout, `param_names`):
    gpt2: tok_emb.weight, pos_emb.weight, blocks.{i}.{ln1,attn.qkv,attn.proj,ln2,mlp.fc1,mlp.fc2}.*,
    ln_f.*, head.weight (untied only); llama: no pos_emb, blocks.{i}.{ln1,attn.{q,k,v,proj},ln2,
    mlp.{gate,up,down}}.weight, ln_f.weight.
    Options: `autocast_dtype` (e.g. torch.bfloat16) runs the forward under torch.autocast;
    `activation_checkpointing` recomputes each block in the backward.
    """

    def __init__(self, cfg: GPTConfig, mesh=None, num_chunks: int = 1, *, dtype=None, device=None,
                 activation_checkpointing: bool = False, autocast_dtype: torch.dtype | None = None, zero: int = 0):
        super().__init__()
        require(isinstance(cfg, GPTConfig), f"GPT: expected a GPTConfig, got {type(cfg).__name__}")
        require(mesh is None and num_chunks == 1, "SerialGPT: takes no mesh and one chunk (use models.GPT(cfg, mesh))")
        require(zero == 0 and not isinstance(zero, bool), f"SerialGPT: zero must be 0 (nothing to shard without a "
                                                          f"mesh), got {zero!r}")
        self.cfg = cfg
        self.activation_checkpointing, self.autocast_dtype = activation_checkpointing, autocast_dtype
        self.tok_emb, self.pos_emb = make_embeddings(cfg, dtype, device)
        self.blocks = nn.ModuleList(Block(cfg, i, dtype, device) for i in range(cfg.num_layers))
        self.ln_f = make_norm(cfg, dtype, device)
        self.head = None if cfg.tied else make_head(cfg, dtype, device)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        check_tokens(tokens, self.cfg)
        with autocast_context(self.autocast_dtype, self.tok_emb.weight.device):
            x = self.tok_emb(tokens)
            if self.pos_emb is not None:
                x = x + self.pos_emb(torch.arange(tokens.shape[-1], device=tokens.device))
            x = self.ln_f(run_blocks(self.blocks, x, self.activation_checkpointing))
            weight = self.tok_emb.weight if self.head is None else self.head.weight
            return F.linear(x, weight)

    def loss(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy over every token (computed in at least float32)."""
        logits = self(tokens)
        compute = torch.promote_types(logits.dtype, torch.float32)
        return F.cross_entropy(logits.to(compute).flatten(0, -2), targets.reshape(-1))

    def full_state_dict(self) -> dict:
        """A detached copy of the state_dict (the same names every parallel layout gathers to)."""
        return {k: v.detach().clone() for k, v in self.state_dict().items()}

    def load_full_state_dict(self, state: dict) -> None:
        """Copy the serial-named tensors of `state` into the parameters (every name required)."""
        check_state(state, self.cfg)
        with torch.no_grad():
            for k, v in self.state_dict().items():
                v.copy_(state[k])


BLOCK_PARAMS = ("ln1.weight", "ln1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight",
                "attn.proj.bias", "ln2.weight", "ln2.bias", "mlp.fc1.weight", "mlp.fc1.bias",
                "mlp.fc2.weight", "mlp.fc2.bias")


LLAMA_BLOCK_PARAMS = ("ln1.weight", "attn.q.weight", "attn.k.weight", "attn.v.weight", "attn.proj.weight",
                      "ln2.weight", "mlp.gate.weight", "mlp.up.weight", "mlp.down.weight")


def param_names(cfg: GPTConfig) -> list[str]:
    """The serial model's parameter names, in state_dict order."""
    llama = cfg.arch == "llama"
    names = ["tok_emb.weight"] + ([] if llama else ["pos_emb.weight"])
    block = LLAMA_BLOCK_PARAMS if llama else BLOCK_PARAMS
    names += [f"blocks.{i}.{p}" for i in range(cfg.num_layers) for p in block]
    names += ["ln_f.weight"] + ([] if llama else ["ln_f.bias"]) + ([] if cfg.tied else ["head.weight"])
    return names


def param_shapes(cfg: GPTConfig) -> dict:
    """Full shape of every serial parameter (by name)."""
    h, f, kv = cfg.hidden, cfg.ffn_hidden, cfg.num_kv_heads * cfg.head_dim
    leaf = {"ln1.weight": [h], "ln1.bias": [h], "ln2.weight": [h], "ln2.bias": [h],
            "attn.qkv.weight": [3 * h, h], "attn.qkv.bias": [3 * h], "attn.proj.weight": [h, h],
            "attn.proj.bias": [h], "mlp.fc1.weight": [f, h], "mlp.fc1.bias": [f], "mlp.fc2.weight": [h, f],
            "mlp.fc2.bias": [h], "attn.q.weight": [h, h], "attn.k.weight": [kv, h], "attn.v.weight": [kv, h],
            "mlp.gate.weight": [f, h], "mlp.up.weight": [f, h], "mlp.down.weight": [h, f]}
    top = {"tok_emb.weight": [cfg.vocab_size, h], "pos_emb.weight": [cfg.seq_len, h], "ln_f.weight": [h],
           "ln_f.bias": [h], "head.weight": [cfg.vocab_size, h]}
    return {n: top[n] if n in top else leaf[n.split(".", 2)[2]] for n in param_names(cfg)}


def check_state(state, cfg: GPTConfig) -> None:
    """MpiparError unless `state` (a dict, or a mapping with `shape_of(name)`) holds exactly the serial
    names of cfg with their full shapes."""
    shapes = param_shapes(cfg)
    missing = [n for n in shapes if n not in state]
    extra = [n for n in state if n not in shapes]
    require(not missing and not extra, f"load_full_state_dict: missing {missing[:4]}, unexpected {extra[:4]}")
    shape = state.shape_of if hasattr(state, "shape_of") else (lambda n: list(state[n].shape))
    bad = [n for n, s in shapes.items() if list(shape(n)) != s]
    require(not bad, f"load_full_state_dict: wrong shapes for {[(n, tuple(shape(n))) for n in bad[:4]]}")


def check_tokens(tokens, cfg: GPTConfig) -> None:
    """MpiparError unless tokens is an integer [B, seq] tensor with seq <= cfg.seq_len."""
    require(isinstance(tokens, torch.Tensor) and not tokens.is_floating_point() and tokens.dim() == 2,
            f"GPT: tokens must be an integer tensor [batch, seq], got "
            f"{getattr(tokens, 'dtype', type(tokens).__name__)} {tuple(getattr(tokens, 'shape', ()))}")
    require(tokens.shape[1] <= cfg.seq_len,
            f"GPT: sequence length {tokens.shape[1]} exceeds cfg.seq_len {cfg.seq_len}")


def autocast_context(dtype, device):
    """torch.autocast for `dtype` on `device`'s type, or a no-op when dtype is None."""
    import contextlib

    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)
