"""The serial GPT: plain torch, no MPI. The reference every parallel layout reproduces.

    cfg = GPTConfig(vocab_size=64, seq_len=32, hidden=64, num_heads=4, num_layers=2)
    model = SerialGPT(cfg)              # what models.GPT(cfg) returns
    logits = model(tokens)              # tokens [B, seq] -> logits [B, seq, vocab]

Architecture (GPT-2 style, no dropout): token + learned position embedding,
`num_layers` pre-LN blocks ``x + attn(ln1(x))``, ``x + mlp(ln2(x))`` with the
causal models.SelfAttention and models.MLP, a final LayerNorm and a bias-free
head (its own weight, or the token embedding's with ``tied=True``).

Initialisation is deterministic from `cfg.seed` and independent of any layout:
the embeddings, every block and the head each draw from their own
torch.Generator seeded by `component_seed(cfg.seed, name)`, so a pipeline stage
can build only its own layers and still hold exactly the serial numbers.
GPT-2's scheme: weights N(0, 0.02), residual projections (attn.proj, mlp.fc2)
N(0, 0.02/sqrt(2*num_layers)), biases 0, LayerNorm 1 and 0.
"""
from __future__ import annotations

import dataclasses
import math
import zlib

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..errors import require
from .serial import MLP, SelfAttention

INIT_STD = 0.02


@dataclasses.dataclass
class GPTConfig:
    """Shape of a GPT. ffn_hidden=None means 4*hidden; tied=True shares the head with tok_emb."""

    vocab_size: int
    seq_len: int
    hidden: int
    num_heads: int
    num_layers: int
    ffn_hidden: int | None = None
    seed: int = 0
    tied: bool = False

    def __post_init__(self):
        for name in ("vocab_size", "seq_len", "hidden", "num_heads", "num_layers"):
            value = getattr(self, name)
            require(isinstance(value, int) and not isinstance(value, bool) and value > 0,
                    f"GPTConfig: {name} must be a positive int, got {value!r}")
        if self.ffn_hidden is None:
            self.ffn_hidden = 4 * self.hidden
        require(isinstance(self.ffn_hidden, int) and self.ffn_hidden > 0,
                f"GPTConfig: ffn_hidden must be a positive int, got {self.ffn_hidden!r}")
        require(self.hidden % self.num_heads == 0,
                f"GPTConfig: hidden {self.hidden} is not divisible by num_heads {self.num_heads}")
        require(isinstance(self.seed, int), f"GPTConfig: seed must be an int, got {self.seed!r}")
        require(isinstance(self.tied, bool), f"GPTConfig: tied must be a bool, got {self.tied!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def num_params(self) -> int:
        """Parameter count of the serial model."""
        h, f, v, s, n = self.hidden, self.ffn_hidden, self.vocab_size, self.seq_len, self.num_layers
        block = 4 * h + (3 * h * h + 3 * h) + (h * h + h) + (h * f + f) + (f * h + h)
        return v * h + s * h + n * block + 2 * h + (0 if self.tied else v * h)


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
    for lin, std in ((block.attn.qkv, INIT_STD), (block.attn.proj, resid_std),
                     (block.mlp.fc1, INIT_STD), (block.mlp.fc2, resid_std)):
        _normal_(lin.weight, std, gen)
        lin.bias.zero_()
    for ln in (block.ln1, block.ln2):
        ln.reset_parameters()
    return block


@torch.no_grad()
def init_embeddings_(tok: nn.Embedding, pos: nn.Embedding, cfg: GPTConfig) -> None:
    gen = torch.Generator().manual_seed(component_seed(cfg.seed, "embeddings"))
    _normal_(tok.weight, INIT_STD, gen)
    _normal_(pos.weight, INIT_STD / 2, gen)


@torch.no_grad()
def init_head_(head: nn.Linear, cfg: GPTConfig) -> None:
    gen = torch.Generator().manual_seed(component_seed(cfg.seed, "head"))
    _normal_(head.weight, INIT_STD, gen)


class GPT(nn.Module):
    """`GPT(cfg)`: the serial model (SerialGPT); `GPT(cfg, mesh, num_chunks=1, ...)`: the parallel one.

    Both are instances of GPT. Constructing GPT dispatches on `mesh` in __new__;
    the chosen class's __init__ then receives the same arguments.
    """

    def __new__(cls, cfg=None, mesh=None, *args, **kwargs):
        if cls is GPT:
            if mesh is None:
                cls = SerialGPT
            else:
                from .parallel import ParallelGPT

                cls = ParallelGPT
        return super().__new__(cls)


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, cfg: GPTConfig, index: int, dtype=None, device=None):
        super().__init__()
        kw = dict(dtype=dtype, device=device)
        self.ln1 = nn.LayerNorm(cfg.hidden, **kw)
        self.attn = SelfAttention(cfg.hidden, cfg.num_heads, causal=True, **kw)
        self.ln2 = nn.LayerNorm(cfg.hidden, **kw)
        self.mlp = MLP(cfg.hidden, cfg.ffn_hidden, **kw)
        init_block_(self, cfg, index)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


def make_embeddings(cfg: GPTConfig, dtype=None, device=None) -> tuple[nn.Embedding, nn.Embedding]:
    """(token, position) embeddings with their serial initial values."""
    tok = nn.Embedding(cfg.vocab_size, cfg.hidden, dtype=dtype, device=device)
    pos = nn.Embedding(cfg.seq_len, cfg.hidden, dtype=dtype, device=device)
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


class SerialGPT(GPT):
    """GPT on one process. forward(tokens [B, seq]) -> logits [B, seq, vocab].

    Parameter names (the checkpoint and `full_state_dict` names of every layout):
    tok_emb.weight, pos_emb.weight, blocks.{i}.{ln1,attn.qkv,attn.proj,ln2,mlp.fc1,mlp.fc2}.*,
    ln_f.*, head.weight (untied only).
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
        self.ln_f = nn.LayerNorm(cfg.hidden, dtype=dtype, device=device)
        self.head = None if cfg.tied else make_head(cfg, dtype, device)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        check_tokens(tokens, self.cfg)
        with autocast_context(self.autocast_dtype, self.tok_emb.weight.device):
            positions = torch.arange(tokens.shape[-1], device=tokens.device)
            x = self.tok_emb(tokens) + self.pos_emb(positions)
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


BLOCK_PARAMS = ("ln1.weight", "ln1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight",
                "attn.proj.bias", "ln2.weight", "ln2.bias", "mlp.fc1.weight", "mlp.fc1.bias",
                "mlp.fc2.weight", "mlp.fc2.bias")


def param_names(cfg: GPTConfig) -> list[str]:
    """The serial model's parameter names, in state_dict order."""
    names = ["tok_emb.weight", "pos_emb.weight"]
    names += [f"blocks.{i}.{p}" for i in range(cfg.num_layers) for p in BLOCK_PARAMS]
    names += ["ln_f.weight", "ln_f.bias"] + ([] if cfg.tied else ["head.weight"])
    return names


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
