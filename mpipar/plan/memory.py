"""Memory per rank: parameters, gradients and optimizer state under ZeRO 0-3, and activations.

Model states, with Psi the parameters a rank holds and d the ranks that share
them in data parallelism (dp * sp), bytes per parameter (Rajbhandari et al.
2020, mixed precision with Adam: 2 + 2 + 12):
  zero 0: 16       zero 1: 4 + 12/d       zero 2: 2 + 14/d       zero 3: 16/d
fp32 training keeps 4-byte parameters and gradients and 8 bytes of Adam moments.

Activations of one block for one microbatch (Korthikanti et al. 2022, 16-bit,
with dropout): s*b*h*(34 + 5*a*s/h) bytes; with tensor parallelism
s*b*h*(10 + 24/t + 5*a*s/(h*t)); with sequence parallelism too s*b*h/t*(34 + 5*a*s/h);
selective recompute drops the 5*a*s/h term, full recompute keeps the block
input 2*s*b*h (/t with sequence parallelism); flash attention never stores the
s^2 term. `layer_activation_bytes` computes these term by term (GQA, SwiGLU,
any element size) so that for GPT-2 at 2 bytes it equals the closed forms.
"""
from __future__ import annotations

from .spec import DTYPE_BYTES, Layout, ModelSpec



def state_bytes_per_param(dtype: str, zero: int, d: int) -> tuple[float, float, float]:
    """(params, grads, optimizer) bytes per parameter of one rank."""
    p, g, o = (4.0, 4.0, 8.0) if dtype == "fp32" else (2.0, 2.0, 12.0)
    if zero >= 1:
        o /= d
    if zero >= 2:
        g /= d
    if zero >= 3:
        p /= d
    return p, g, o


def layer_activation_bytes(spec: ModelSpec, layout: Layout, flash: bool, elem: int | None = None) -> float:
    """Bytes one block keeps for the backward, for one microbatch, on one rank."""
    e = DTYPE_BYTES[layout.dtype] if elem is None else elem
    t, c = layout.tp, layout.sp
    h, hd, f = spec.hidden, spec.head_dim, spec.ffn_hidden
    a = spec.num_heads
    g = max(spec.num_kv_heads, t)          # kv heads are replicated when tp exceeds them
    tokens = layout.micro_batch * spec.seq_len / c
    rep_t = t if layout.sequence_parallel else 1
    if layout.recompute == "full":
        return tokens * h * e / rep_t
    mask = 1 if spec.dropout else 0                       # dropout keeps a byte mask per element
    if spec.arch == "gpt2":
        replicated = 4 * e * h + 2 * mask * h             # 2 norm inputs, qkv and fc1 inputs, 2 dropout masks
        split = (h + 2 * g * hd + h + 2 * f) * e          # q, k, v, proj input, GeLU input, fc2 input
        whole = tables = 0.0
    else:
        # eager RMSNorm keeps its input, the normalized input and its rsqrt per token; the qkv
        # and MLP inputs are kept as their GEMMs read them, gathered over the sequence; k and v
        # are kept repeated to every query head (GQA's repeat_interleave comes before attention)
        replicated = 4 * h * e + 2 * e + 2 * mask * h     # 2 norm inputs, 2 normalized, 2 rsqrt
        whole = 2 * h * e                                 # qkv and MLP inputs
        split = (h + 2 * a * hd + h + 4 * f) * e          # q, k, v, proj input, gate, up, silu, down input
        tables = 2 * spec.seq_len / c * hd * e            # the rotary cos and sin of the block's positions
    scores = (e + (e + 1) * mask) * a * spec.seq_len       # softmax out (+ dropout mask and output)
    per_token = replicated / rep_t + whole + split / t
    if not flash and layout.recompute == "none":
        per_token += scores / t
    if flash:
        per_token += 4 * a / t                            # log-sum-exp per head
    return tokens * per_token + tables


def end_activation_bytes(spec: ModelSpec, layout: Layout, first: bool, last: bool) -> float:
    """Embedding output (first stage) and the logits and fp32 softmax of the head (last stage)."""
    e = DTYPE_BYTES[layout.dtype]
    tokens = layout.micro_batch * spec.seq_len / layout.sp
    out = 0.0
    if first:
        out += tokens * spec.hidden * e / (layout.tp if layout.sequence_parallel else 1)
    if last:
        out += tokens * spec.vocab_size / layout.tp * (e + 4) + tokens * spec.hidden * e
    return out


def layer_params_per_rank(spec: ModelSpec, tp: int) -> float:
    """One block's parameters on one tp rank: matrices and column-parallel biases split, norms and
    row-parallel biases replicated, kv heads replicated when tp exceeds them."""
    h, f = spec.hidden, spec.ffn_hidden
    q, kv = h / tp, max(spec.num_kv_heads / tp, 1.0) * spec.head_dim
    if spec.arch == "gpt2":
        return 4 * h + (h + 1) * (q + 2 * kv) + (q * h + h) + (h * f / tp + f / tp) + (f / tp * h + h)
    return 2 * h + h * (q + 2 * kv) + q * h + 3 * h * f / tp


def end_params_per_rank(spec: ModelSpec, tp: int, first: bool, last: bool, pp: int) -> float:
    out = 0.0
    V, h = spec.vocab_size, spec.hidden
    if first:
        out += V * h / tp + (spec.seq_len * h if spec.arch == "gpt2" else 0)
    if last:
        out += (2 * h if spec.arch == "gpt2" else h)
        if not spec.tied or pp > 1:   # a tied head on another stage keeps its own copy
            out += V * h / tp
    return out
