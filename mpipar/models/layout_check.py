"""Whether a GPTConfig fits a mesh: the checks ParallelGPT agrees on before building anything. Pure."""
from __future__ import annotations

from ..tensor.gqa import kv_split
from .config import GPTConfig

SP_MODES = ("ring", "ulysses")


def layout_error(cfg: GPTConfig, shape: dict, num_chunks: int, sp_mode: str, sp_layout: str,
                 sequence_parallel: bool) -> str | None:
    """Why cfg cannot run on a mesh of `shape` (dims tp, sp, dp, pp), or None. Pure."""
    tp, sp, pp = shape["tp"], shape["sp"], shape["pp"]
    if not isinstance(num_chunks, int) or num_chunks < 1:
        return f"num_chunks must be a positive int, got {num_chunks!r}"
    if sp_mode not in SP_MODES:
        return f"sp_mode must be one of {SP_MODES}, got {sp_mode!r}"
    if sp_layout not in ("zigzag", "contiguous"):
        return f"sp_layout must be 'zigzag' or 'contiguous', got {sp_layout!r}"
    for what, n in (("num_heads", cfg.num_heads), ("vocab_size", cfg.vocab_size), ("ffn_hidden", cfg.ffn_hidden)):
        if n % tp:
            return f"{what} = {n} is not divisible by tp = {tp}"
    split = kv_split(cfg.num_kv_heads, tp)
    if isinstance(split, str):
        return split
    if cfg.num_layers < pp * num_chunks:
        return (f"num_layers = {cfg.num_layers} cannot fill pp * num_chunks = {pp} * {num_chunks} "
                f"pipeline stages")
    parts = 2 * sp if sp_layout == "zigzag" else sp
    if sp > 1 and cfg.seq_len % parts:
        return f"seq_len = {cfg.seq_len} is not divisible by {parts} ({sp_layout} layout over sp = {sp})"
    if sequence_parallel and (cfg.seq_len // sp) % tp:
        return (f"the local sequence {cfg.seq_len // sp} is not divisible by tp = {tp} "
                f"(Megatron sequence parallelism; pass sequence_parallel=False)")
    if sp > 1 and sp_mode == "ulysses" and (cfg.num_heads // tp) % sp:
        return f"ulysses needs the heads per tp rank ({cfg.num_heads // tp}) divisible by sp = {sp}"
    return None
