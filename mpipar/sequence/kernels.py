"""Local attention on one (query block, key block) pair, returning the log-sum-exp.

`block_forward` gives (out, lse) with lse[b, h, i] = log sum_j exp(scale * q_i.k_j)
over the visible keys; `block_backward` gives (dq, dk, dv) from the GLOBAL out
and lse of the rows (so per-block gradients add up to the exact gradient).
`merge_` combines partial results with the online-softmax rule.

Kernels: on CPU torch's fused flash kernel
(`aten._scaled_dot_product_flash_attention_for_cpu` and its backward; it
supports float64, float32, bfloat16 and float16), on CUDA the memory-efficient
kernel (fp16/bf16/fp32), and plain torch math elsewhere (CUDA float64). A
causal call is only ever made on a square block (top-left = bottom-right).
"""
from __future__ import annotations

import math

import torch

aten = torch.ops.aten
_CPU_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
_CUDA_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of merged outputs, log-sum-exps and accumulated gradients."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def backend(q: torch.Tensor) -> str:
    """'cpu-flash', 'cuda-efficient' or 'math': which kernel runs for q's device and dtype."""
    if q.device.type == "cpu" and q.dtype in _CPU_DTYPES:
        return "cpu-flash"
    if q.device.type == "cuda" and q.dtype in _CUDA_DTYPES:
        return "cuda-efficient"
    return "math"


def block_forward(q, k, v, causal: bool, scale: float):
    """(out [B,H,Lq,D] in q.dtype, lse [B,H,Lq] in acc_dtype) for one block."""
    kind = backend(q)
    if kind == "cpu-flash":
        out, lse = aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)
    elif kind == "cuda-efficient":  # not exercised by the CPU test-suite
        out, lse, _, _ = aten._scaled_dot_product_efficient_attention(
            q, k, v, None, True, 0.0, causal, scale=scale)
        lse = lse[..., : q.shape[2]]
    else:
        out, lse = math_forward(q, k, v, causal, scale)
    return out, lse.to(acc_dtype(q.dtype))


def block_backward(dout, q, k, v, out, lse, causal: bool, scale: float):
    """(dq, dk, dv) of one block given the rows' global out and lse."""
    kind = backend(q)
    if kind == "cpu-flash":
        return aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout, q, k, v, out, lse.float() if q.dtype != torch.float64 else lse, 0.0, causal, scale=scale)
    if kind == "cuda-efficient":  # not exercised by the CPU test-suite
        seed = torch.zeros((), dtype=torch.int64, device=q.device)
        dq, dk, dv, _ = aten._scaled_dot_product_efficient_attention_backward(
            dout, q, k, v, None, out, _padded_lse(lse), seed, seed, 0.0,
            [True, True, True, False], causal, scale=scale)
        return dq, dk, dv
    return math_backward(dout, q, k, v, out, lse, causal, scale)


def _padded_lse(lse, align: int = 32):
    """float32 lse laid out like the CUDA efficient kernel's own: rows padded to a multiple of 32."""
    b, h, length = lse.shape
    padded = lse.new_full((b, h, -(-length // align) * align), float("inf"), dtype=torch.float32)
    padded[..., :length] = lse
    return padded


def _scores(q, k, causal: bool, scale: float):
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    if causal:
        lq, lk = s.shape[-2:]
        mask = torch.ones(lq, lk, dtype=torch.bool, device=s.device).tril()
        s = s.masked_fill(~mask, float("-inf"))
    return s


def math_forward(q, k, v, causal: bool, scale: float):
    """Reference block forward in plain torch (any device and dtype)."""
    s = _scores(q.to(acc_dtype(q.dtype)), k.to(acc_dtype(q.dtype)), causal, scale)
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse.unsqueeze(-1))
    return torch.matmul(p, v.to(p.dtype)).to(q.dtype), lse


def math_backward(dout, q, k, v, out, lse, causal: bool, scale: float):
    """Reference block backward in plain torch, from the rows' global out and lse."""
    dt = acc_dtype(q.dtype)
    qf, kf, vf, dof = q.to(dt), k.to(dt), v.to(dt), dout.to(dt)
    p = torch.exp(_scores(qf, kf, causal, scale) - lse.to(dt).unsqueeze(-1))
    dv = torch.matmul(p.transpose(-1, -2), dof)
    dp = torch.matmul(dof, vf.transpose(-1, -2))
    delta = (dof * out.to(dt)).sum(-1, keepdim=True)
    ds = p * (dp - delta) * scale
    dq, dk = torch.matmul(ds, kf), torch.matmul(ds.transpose(-1, -2), qf)
    return dq.to(q.dtype), dk.to(q.dtype), dv.to(q.dtype)


def merge_(acc_out, acc_lse, out, lse) -> None:
    """In place: fold a block's (out, lse) into the accumulators (online softmax).

    new = logaddexp(acc_lse, lse); acc_out = acc_out*e^(acc_lse-new) + out*e^(lse-new).
    Accumulators may start at (0, -inf); a block always has a visible key per row.
    """
    new = torch.logaddexp(acc_lse, lse)
    acc_out.mul_(torch.exp(acc_lse - new).unsqueeze(-1))
    acc_out.addcmul_(out, torch.exp(lse - new).unsqueeze(-1).to(acc_out.dtype))
    acc_lse.copy_(new)
