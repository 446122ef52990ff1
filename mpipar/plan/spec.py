"""ModelSpec (the shape of a GPT-2 or Llama model) and Layout (how it is spread over ranks).

Both are plain frozen dataclasses that check themselves on construction and
raise MpiparError on anything the estimate could not mean: sizes that do not
divide, more pipeline stages than layers, unknown schedules or dtypes.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace

from ..errors import MpiparError
from ..model_shape import check_heads, check_sizes, positive_int as _positive_int

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
RECOMPUTE = ("none", "selective", "full")
SP_MODES = ("ring", "ulysses")
SCHEDULES = ("naive", "gpipe", "1f1b", "interleaved-1f1b", "zb-h1")


@dataclass(frozen=True)
class ModelSpec:
    """Shape of the model, in GPTConfig's order. ffn_hidden=None: 4h (gpt2) or Llama's 8h/3 rounded up to 256.

    dropout: whether the blocks apply dropout (Megatron's GPT does, with its masks
    kept for the backward; mpipar's models do not, and from_config says so).
    """

    vocab_size: int
    seq_len: int
    hidden: int
    num_heads: int
    num_layers: int
    ffn_hidden: int | None = None
    arch: str = "gpt2"
    num_kv_heads: int | None = None
    tied: bool = False
    dropout: bool = True

    def __post_init__(self):
        check_sizes("ModelSpec", self)
        if self.ffn_hidden is None:
            ffn = 4 * self.hidden if self.arch == "gpt2" else 256 * -(-(8 * self.hidden // 3) // 256)
            object.__setattr__(self, "ffn_hidden", ffn)
        if self.num_kv_heads is None:
            object.__setattr__(self, "num_kv_heads", self.num_heads)
        check_heads("ModelSpec", self)
        _positive_int("ModelSpec", "num_kv_heads", self.num_kv_heads)
        if self.num_heads % self.num_kv_heads:
            raise MpiparError(f"ModelSpec: num_heads {self.num_heads} is not divisible by "
                              f"num_kv_heads {self.num_kv_heads}")

    @classmethod
    def from_config(cls, cfg) -> "ModelSpec":
        """From a models.GPTConfig (or anything with its attribute names); mpipar's models have no dropout."""
        arch = getattr(cfg, "arch", "gpt2")
        return cls(cfg.vocab_size, cfg.seq_len, cfg.hidden, cfg.num_heads, cfg.num_layers,
                   ffn_hidden=getattr(cfg, "ffn_hidden", None), arch=arch,
                   num_kv_heads=getattr(cfg, "num_kv_heads", None), tied=bool(getattr(cfg, "tied", False)),
                   dropout=bool(getattr(cfg, "dropout", False)))

    @property
    def head_dim(self) -> int:
        return self.hidden // self.num_heads

    def layer_params(self) -> int:
        """Parameters of one transformer block."""
        h, f, kv = self.hidden, self.ffn_hidden, self.num_kv_heads * self.head_dim
        if self.arch == "gpt2":  # two LayerNorms (weight, bias), biased QKV / proj / fc1 / fc2
            return 4 * h + (h * (h + 2 * kv) + h + 2 * kv) + (h * h + h) + (h * f + f) + (f * h + h)
        return 2 * h + h * (h + 2 * kv) + h * h + 3 * h * f  # RMSNorm weights, no biases, SwiGLU

    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden + (self.seq_len * self.hidden if self.arch == "gpt2" else 0)

    def head_params(self) -> int:
        """Final norm and (untied) output projection."""
        norm = 2 * self.hidden if self.arch == "gpt2" else self.hidden
        return norm + (0 if self.tied else self.vocab_size * self.hidden)

    def num_params(self) -> int:
        return self.embedding_params() + self.num_layers * self.layer_params() + self.head_params()


@dataclass(frozen=True)
class Layout:
    """Parallel layout: tp x sp x dp x pp ranks, pipeline schedule, micro-batch, recompute, ZeRO stage, dtype.

    micro_batch is in sequences per data-parallel rank; the number of
    microbatches is global_batch / (dp * micro_batch).
    """

    tp: int = 1
    pp: int = 1
    dp: int = 1
    sp: int = 1
    sp_mode: str = "ring"
    num_chunks: int = 1
    schedule: str = "1f1b"
    micro_batch: int = 1
    global_batch: int = 8
    sequence_parallel: bool = False
    recompute: str = "none"
    zero: int = 0
    dtype: str = "bf16"

    def __post_init__(self):
        sizes = (self.tp, self.pp, self.dp, self.sp, self.num_chunks, self.micro_batch, self.global_batch)
        if not all(type(x) is int and x >= 1 for x in sizes):
            for name in ("tp", "pp", "dp", "sp", "num_chunks", "micro_batch", "global_batch"):
                _positive_int("Layout", name, getattr(self, name))
        if self.sp_mode not in SP_MODES:
            raise MpiparError(f"Layout: sp_mode must be one of {SP_MODES}, got {self.sp_mode!r}")
        if self.schedule not in SCHEDULES:
            raise MpiparError(f"Layout: schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.recompute not in RECOMPUTE:
            raise MpiparError(f"Layout: recompute must be one of {RECOMPUTE}, got {self.recompute!r}")
        if self.zero not in (0, 1, 2, 3) or isinstance(self.zero, bool):
            raise MpiparError(f"Layout: zero must be 0, 1, 2 or 3, got {self.zero!r}")
        if self.dtype not in DTYPE_BYTES:
            raise MpiparError(f"Layout: dtype must be one of {tuple(DTYPE_BYTES)}, got {self.dtype!r}")
        if self.global_batch % (self.dp * self.micro_batch):
            raise MpiparError(f"Layout: global_batch {self.global_batch} is not divisible by "
                              f"dp * micro_batch = {self.dp} * {self.micro_batch}")
        if self.num_chunks > 1 and self.schedule != "interleaved-1f1b":
            raise MpiparError(f"Layout: num_chunks={self.num_chunks} needs schedule 'interleaved-1f1b', "
                              f"got {self.schedule!r}")
        m, p = self.num_microbatches, self.pp
        if self.schedule == "interleaved-1f1b" and self.num_chunks > 1 and m > p and m % p:
            raise MpiparError(f"Layout: interleaved-1f1b needs num_microbatches ({m}) <= pp or divisible "
                              f"by pp ({p})")
        if self.sequence_parallel and self.tp == 1:
            raise MpiparError("Layout: sequence_parallel (Megatron SP) needs tp > 1")

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp * self.sp

    @property
    def num_microbatches(self) -> int:
        return self.global_batch // (self.dp * self.micro_batch)

    def name(self) -> str:
        parts = [f"dp{self.dp}", f"pp{self.pp}", f"sp{self.sp}", f"tp{self.tp}"]
        if self.pp > 1:
            parts.append(self.schedule + (f"x{self.num_chunks}" if self.num_chunks > 1 else ""))
        if self.sp > 1:
            parts.append(self.sp_mode)
        if self.sequence_parallel:
            parts.append("seqpar")
        parts.append(f"mb{self.micro_batch}")
        if self.recompute != "none":
            parts.append(f"rc-{self.recompute}")
        if self.zero:
            parts.append(f"z{self.zero}")
        return "-".join(parts)

    def replace(self, **changes) -> "Layout":
        return replace(self, **changes)

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def check_fit(spec: ModelSpec, layout: Layout) -> None:
    """Raise MpiparError unless `layout` can split `spec` (heads, kv heads, vocab, ffn, sequence, layers)."""
    t, c, p, v = layout.tp, layout.sp, layout.pp, layout.num_chunks
    for what, n in (("num_heads", spec.num_heads), ("ffn_hidden", spec.ffn_hidden), ("vocab_size", spec.vocab_size)):
        if n % t:
            raise MpiparError(f"layout: {what} {n} is not divisible by tp {t}")
    if spec.num_kv_heads % t and t % spec.num_kv_heads:
        raise MpiparError(f"layout: num_kv_heads {spec.num_kv_heads} and tp {t} do not divide one another")
    if spec.seq_len % (c * (2 if c > 1 and layout.sp_mode == "ring" else 1)):
        raise MpiparError(f"layout: seq_len {spec.seq_len} does not split over sp {c} ({layout.sp_mode})")
    if layout.sp_mode == "ulysses" and c > 1 and (spec.num_heads // t) % c:
        raise MpiparError(f"layout: ulysses needs the heads per tp rank ({spec.num_heads // t}) divisible by sp {c}")
    if layout.sequence_parallel and spec.seq_len // c % t:
        raise MpiparError(f"layout: sequence_parallel needs the local sequence {spec.seq_len // c} divisible by tp {t}")
    if spec.num_layers < p * v:
        raise MpiparError(f"layout: {spec.num_layers} layers cannot fill pp * num_chunks = {p * v} stages")
