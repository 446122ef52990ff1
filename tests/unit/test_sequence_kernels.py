"""Pure tests of the local attention kernels and the log-sum-exp merge (no MPI)."""
import pytest
import torch
import torch.nn.functional as F

from mpipar.sequence import kernels


def _qkv(lq, lk, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 3, lq, 8, generator=g, dtype=torch.float64).to(dtype)
    k = torch.randn(2, 3, lk, 8, generator=g, dtype=torch.float64).to(dtype)
    v = torch.randn(2, 3, lk, 8, generator=g, dtype=torch.float64).to(dtype)
    return q, k, v


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_cpu_uses_the_fused_kernel(dtype):
    assert kernels.backend(torch.zeros(1, dtype=dtype)) == "cpu-flash"
    assert kernels.acc_dtype(dtype) == (torch.float64 if dtype == torch.float64 else torch.float32)


@pytest.mark.parametrize("causal", [True, False])
def test_block_forward_matches_math_and_lse(causal):
    q, k, v = _qkv(12, 12)
    s = kernels.default_scale(8)
    out, lse = kernels.block_forward(q, k, v, causal, s)
    out_m, lse_m = kernels.math_forward(q, k, v, causal, s)
    assert lse.dtype == torch.float64
    torch.testing.assert_close(out, out_m, rtol=0, atol=1e-12)
    torch.testing.assert_close(lse, lse_m, rtol=0, atol=1e-12)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=causal), rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-6)])
def test_merging_key_blocks_gives_full_attention_and_grads(dtype, tol):
    """Split keys in 3 blocks, merge forward by log-sum-exp, sum the block backwards."""
    q, k, v = _qkv(10, 15, dtype)
    s = kernels.default_scale(8)
    qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
    ref = F.scaled_dot_product_attention(qr, kr, vr)
    dout = torch.randn_like(ref)
    ref.backward(dout)
    acc_out = torch.zeros(q.shape, dtype=kernels.acc_dtype(dtype))
    acc_lse = torch.full(q.shape[:3], float("-inf"), dtype=kernels.acc_dtype(dtype))
    cols = [slice(0, 5), slice(5, 10), slice(10, 15)]
    for c in cols:
        o, l = kernels.block_forward(q, k[:, :, c], v[:, :, c], False, s)
        kernels.merge_(acc_out, acc_lse, o, l)
    out = acc_out.to(dtype)
    torch.testing.assert_close(out, ref.detach(), rtol=0, atol=tol)
    dq = torch.zeros_like(q)
    dk, dv = [], []
    for c in cols:
        a, b, cc = kernels.block_backward(dout, q, k[:, :, c], v[:, :, c], out, acc_lse, False, s)
        dq += a
        dk.append(b)
        dv.append(cc)
    torch.testing.assert_close(dq, qr.grad, rtol=0, atol=tol * 5)
    torch.testing.assert_close(torch.cat(dk, 2), kr.grad, rtol=0, atol=tol * 5)
    torch.testing.assert_close(torch.cat(dv, 2), vr.grad, rtol=0, atol=tol * 5)


@pytest.mark.parametrize("causal", [True, False])
def test_math_backward_matches_fused_backward(causal):
    q, k, v = _qkv(9, 9)
    s = kernels.default_scale(8)
    out, lse = kernels.block_forward(q, k, v, causal, s)
    dout = torch.randn_like(out)
    fused = kernels.block_backward(dout, q, k, v, out, lse, causal, s)
    plain = kernels.math_backward(dout, q, k, v, out, lse, causal, s)
    for a, b in zip(fused, plain):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("spans", [((0, 1), (2, 3)), ((0, 2), (1, 2)), ((1, 2), (0, 3)), ((1, 3), (0, 2))])
def test_travelling_gradients_add_by_key_chunk(spans):
    """ring attention's dK/dV pieces (span of key chunks, dk, dv) add into their hull, rest zero."""
    import importlib

    ra = importlib.import_module("mpipar.sequence.ring_attention")
    c, like = 2, torch.zeros(1, 3, 8, 4, dtype=torch.float64)  # a block of 4 chunks of 2 keys
    g = torch.Generator().manual_seed(1)
    pieces, dense = [], torch.zeros(2, 1, 8, 3, 4, dtype=torch.float64)
    for a, b in spans:
        dk, dv = (torch.randn(1, (b - a) * c, 3, 4, generator=g, dtype=torch.float64) for _ in range(2))
        pieces.append(((a, b), dk.clone(), dv.clone()))
        dense[0, :, a * c:b * c] += dk
        dense[1, :, a * c:b * c] += dv
    span, dk, dv = ra._combine(pieces[0], pieces[1], like, c)
    lo, hi = min(s[0] for s in spans), max(s[1] for s in spans)
    assert span == (lo, hi)
    torch.testing.assert_close(dk, dense[0, :, lo * c:hi * c], rtol=0, atol=0)
    torch.testing.assert_close(dv, dense[1, :, lo * c:hi * c], rtol=0, atol=0)
    assert ra._combine(None, pieces[1], like, c) is pieces[1] and ra._combine(pieces[0], None, like, c) is pieces[0]
