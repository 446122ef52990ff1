"""ParallelMLP and ParallelSelfAttention against models.MLP / models.SelfAttention (TP = world size)."""
import collections

import pytest
import torch
from mpi4py import MPI

import mpipar
from mpipar import comm, models
from mpipar.tensor import ParallelMLP, ParallelSelfAttention

pytestmark = pytest.mark.mpi

W = MPI.COMM_WORLD
N, R = W.Get_size(), W.Get_rank()
B, S, H, FFN, HEADS = 2, 12, 24, 48, 12  # divisible by 1, 2, 3 and 4
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def rand(*shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


def part(t, dim, n=None, r=None):
    n, r = n or N, R if r is None else r
    size = t.shape[dim] // n
    return t.narrow(dim, r * size, size)


def close(a, b, dtype):
    assert a.shape == b.shape, (a.shape, b.shape)
    torch.testing.assert_close(a, b, rtol=TOL[dtype], atol=TOL[dtype])


def run(module, x, dy):
    x = x.clone().requires_grad_()
    y = module(x)
    y.backward(dy)
    return y.detach(), x.grad


def heads_rows(t):
    """Rows of the fused [q|k|v] weight (or bias) that hold this rank's heads (reference layout)."""
    return torch.cat([part(block, 0) for block in t.chunk(3, dim=0)])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("sp", [False, True])
def test_mlp_matches_serial(dtype, sp):
    ser = models.MLP(H, FFN, seed=21, dtype=dtype)
    par = ParallelMLP(H, FFN, W, sequence_parallel=sp, seed=21, dtype=dtype)
    x, dy = rand(B, S, H, dtype=dtype, seed=1), rand(B, S, H, dtype=dtype, seed=2)
    y_ref, dx_ref = run(ser, x, dy)
    y, dx = run(par, part(x, 1) if sp else x, part(dy, 1) if sp else dy)
    close(y, part(y_ref, 1) if sp else y_ref, dtype)
    close(dx, part(dx_ref, 1) if sp else dx_ref, dtype)
    close(par.fc1.weight.grad, part(ser.fc1.weight.grad, 0), dtype)
    close(par.fc1.bias.grad, part(ser.fc1.bias.grad, 0), dtype)
    close(par.fc2.weight.grad, part(ser.fc2.weight.grad, 1), dtype)
    close(par.fc2.bias.grad, ser.fc2.bias.grad, dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("sp", [False, True])
@pytest.mark.parametrize("causal", [True, False])
def test_attention_matches_serial(dtype, sp, causal):
    ser = models.SelfAttention(H, HEADS, causal=causal, seed=22, dtype=dtype)
    par = ParallelSelfAttention(H, HEADS, W, causal=causal, seed=22, sequence_parallel=sp, dtype=dtype)
    x, dy = rand(B, S, H, dtype=dtype, seed=3), rand(B, S, H, dtype=dtype, seed=4)
    y_ref, dx_ref = run(ser, x, dy)
    y, dx = run(par, part(x, 1) if sp else x, part(dy, 1) if sp else dy)
    close(y, part(y_ref, 1) if sp else y_ref, dtype)
    close(dx, part(dx_ref, 1) if sp else dx_ref, dtype)
    close(par.qkv.weight.grad, heads_rows(ser.qkv.weight.grad), dtype)
    close(par.qkv.bias.grad, heads_rows(ser.qkv.bias.grad), dtype)
    close(par.proj.weight.grad, part(ser.proj.weight.grad, 1), dtype)
    close(par.proj.bias.grad, ser.proj.bias.grad, dtype)


def test_attention_holds_its_heads():
    ser = models.SelfAttention(H, HEADS, seed=3, dtype=torch.float64)
    par = ParallelSelfAttention.from_serial(ser, W)
    assert torch.equal(par.qkv.weight, heads_rows(ser.qkv.weight.detach()))
    assert par.local_heads == HEADS // N


@pytest.mark.parametrize("kind", ["mlp", "attention"])
def test_seed_and_round_trip(kind):
    """seed=s holds the serial block of seed=s; from_serial(...).full_state_dict() round-trips."""
    if kind == "mlp":
        ser, par = models.MLP(H, FFN, seed=5), ParallelMLP(H, FFN, W, seed=5)
        solo = ParallelMLP(H, FFN, MPI.COMM_SELF, seed=5)
        again = ParallelMLP.from_serial(ser, W)
    else:
        ser, par = models.SelfAttention(H, HEADS, seed=5), ParallelSelfAttention(H, HEADS, W, seed=5)
        solo = ParallelSelfAttention(H, HEADS, MPI.COMM_SELF, seed=5)
        again = ParallelSelfAttention.from_serial(ser, W)
    ref = ser.state_dict()
    for sd in (par.full_state_dict(), solo.full_state_dict(), again.full_state_dict()):
        assert sd.keys() == ref.keys()
        for k in ref:
            assert torch.equal(sd[k], ref[k]), k
    unseeded = models.MLP(H, FFN) if kind == "mlp" else models.SelfAttention(H, HEADS)
    assert not torch.equal(next(iter(unseeded.state_dict().values())), next(iter(ref.values())))


@pytest.fixture
def counter(monkeypatch):
    """Count the data collectives mpipar.comm performs (every namespace they are reachable from)."""
    counts = collections.Counter()
    for name in ("all_reduce", "all_gather", "reduce_scatter"):
        for mod in (mpipar.comm.autograd, mpipar.comm.collectives, mpipar.comm):
            original = getattr(mod, name)

            def wrapped(*args, _orig=original, _name=name, **kwargs):
                counts[_name] += 1
                return _orig(*args, **kwargs)

            monkeypatch.setattr(mod, name, wrapped)
    return counts


@pytest.mark.parametrize("sp", [False, True])
def test_mlp_communicates_once(counter, sp):
    par = ParallelMLP(H, FFN, W, sequence_parallel=sp, seed=1)
    x = rand(B, S // N if sp else S, H, dtype=torch.float32, seed=1).requires_grad_()
    counter.clear()
    y = par(x)
    fwd = dict(counter)
    counter.clear()
    y.sum().backward()
    bwd = dict(counter)
    if sp:
        assert fwd == {"all_gather": 1, "reduce_scatter": 1}
        # all-gathers: fc2's output gradient, fc1's input again (only its shard was saved);
        # reduce-scatter: fc1's input gradient; all-reduce: fc2's bias gradient (it saw only local tokens)
        assert bwd == {"all_gather": 2, "reduce_scatter": 1, "all_reduce": 1}
    else:
        assert fwd == {"all_reduce": 1}
        assert bwd == {"all_reduce": 1}


def test_attention_communicates_once(counter):
    par = ParallelSelfAttention(H, HEADS, W, seed=1)
    x = rand(B, S, H, dtype=torch.float32, seed=1).requires_grad_()
    counter.clear()
    y = par(x)
    assert dict(counter) == {"all_reduce": 1}
    counter.clear()
    y.sum().backward()
    assert dict(counter) == {"all_reduce": 1}  # the input gradient of the column-parallel qkv


@pytest.mark.parametrize("kind", ["mlp", "attention"])
def test_bf16_runs(kind):
    dt = torch.bfloat16
    if kind == "mlp":
        par, ser = ParallelMLP(H, FFN, W, seed=2, dtype=dt), models.MLP(H, FFN, seed=2, dtype=torch.float64)
    else:
        par = ParallelSelfAttention(H, HEADS, W, seed=2, dtype=dt)
        ser = models.SelfAttention(H, HEADS, seed=2, dtype=torch.float64)
    x = rand(B, S, H, dtype=dt, seed=7).requires_grad_()
    y = par(x)
    y.float().sum().backward()
    assert y.dtype == dt and torch.isfinite(x.grad.float()).all()
    torch.testing.assert_close(y.double(), ser(x.detach().double()).detach(), rtol=5e-2, atol=5e-2)


@pytest.mark.parametrize("sp_mode", ["ring", "ulysses"])
@pytest.mark.parametrize("megatron_sp", [False, True])
def test_tp_times_sp_attention(sp_mode, megatron_sp):
    """2-D Mesh(tp=2, sp=2): heads over tp, zigzag sequence over sp (ring / ulysses attention).

    megatron_sp: the sp-local sequence is further split in contiguous blocks over tp.
    """
    if N != 4:
        pytest.skip("needs 4 ranks")
    try:
        from mpipar.sequence import gather_sequence, shard_sequence  # noqa: F401
        from mpipar.sequence import ring_attention, ulysses_attention  # noqa: F401
    except ImportError:
        pytest.skip("mpipar.sequence is not available yet")
    mesh = mpipar.Mesh(tp=2, sp=2)
    dtype = torch.float64
    ser = models.SelfAttention(H, HEADS, seed=9, dtype=dtype)
    par = ParallelSelfAttention(H, HEADS, mesh.tp, seed=9, sp_group=mesh.sp, sp_mode=sp_mode,
                                sequence_parallel=megatron_sp, dtype=dtype)
    x, dy = rand(B, S, H, dtype=dtype, seed=8), rand(B, S, H, dtype=dtype, seed=9)
    y_ref, dx_ref = run(ser, x, dy)
    tp_rank = mesh.tp.rank

    def local(t):
        t = shard_sequence(t, mesh.sp, dim=1, layout="zigzag")
        return part(t, 1, 2, tp_rank) if megatron_sp else t

    y, dx = run(par, local(x), local(dy))
    close(y, local(y_ref), dtype)
    close(dx, local(dx_ref), dtype)
    rows = torch.cat([part(b, 0, 2, tp_rank) for b in ser.qkv.weight.grad.chunk(3, dim=0)])
    # every sp rank holds the gradient of its own tokens: sum over sp for the full gradient
    assert not torch.equal(par.qkv.weight.grad, rows)
    close(comm.all_reduce(par.qkv.weight.grad.clone(), mesh.sp), rows, dtype)
    close(comm.all_reduce(par.proj.weight.grad.clone(), mesh.sp), part(ser.proj.weight.grad, 1, 2, tp_rank), dtype)
