"""ColumnParallelLinear / RowParallelLinear against serial nn.Linear (TP = world size)."""
import pytest
import torch
from mpi4py import MPI

from mpipar import comm, tensor
from mpipar.tensor import ColumnParallelLinear, RowParallelLinear

pytestmark = pytest.mark.mpi

W = MPI.COMM_WORLD
N, R = W.Get_size(), W.Get_rank()
B, S, IN, OUT = 2, 12, 12, 24  # divisible by 1, 2, 3 and 4
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def rand(*shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


def part(t, dim):
    """This rank's contiguous block of t along dim (the reference sharding, written independently)."""
    n = t.shape[dim] // N
    return t.narrow(dim, R * n, n)


def close(a, b, dtype):
    tol = TOL[dtype]
    assert a.shape == b.shape, (a.shape, b.shape)
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def serial_run(lin, x, dy):
    x = x.clone().requires_grad_()
    y = lin(x)
    y.backward(dy)
    return y.detach(), x.grad


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("gather_output,sp", [(False, False), (True, False), (False, True)])
@pytest.mark.parametrize("bias", [True, False])
def test_column_matches_serial(dtype, gather_output, sp, bias):
    ser = tensor.seeded_linear(IN, OUT, bias=bias, seed=7, dtype=dtype)
    par = ColumnParallelLinear(IN, OUT, W, bias=bias, gather_output=gather_output, sequence_parallel=sp,
                               seed=7, dtype=dtype)
    x, dy = rand(B, S, IN, dtype=dtype, seed=1), rand(B, S, OUT, dtype=dtype, seed=2)
    y_ref, dx_ref = serial_run(ser, x, dy)
    xp = (part(x, 1) if sp else x).clone().requires_grad_()
    y = par(xp)
    y.backward(dy if gather_output else part(dy, -1))
    close(y, y_ref if gather_output else part(y_ref, -1), dtype)
    close(xp.grad, part(dx_ref, 1) if sp else dx_ref, dtype)
    close(par.weight.grad, part(ser.weight.grad, 0), dtype)
    if bias:
        close(par.bias.grad, part(ser.bias.grad, 0), dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("input_is_parallel,sp", [(True, False), (False, False), (True, True)])
@pytest.mark.parametrize("bias", [True, False])
def test_row_matches_serial(dtype, input_is_parallel, sp, bias):
    ser = tensor.seeded_linear(IN, OUT, bias=bias, seed=8, dtype=dtype)
    par = RowParallelLinear(IN, OUT, W, bias=bias, input_is_parallel=input_is_parallel, sequence_parallel=sp,
                            seed=8, dtype=dtype)
    x, dy = rand(B, S, IN, dtype=dtype, seed=3), rand(B, S, OUT, dtype=dtype, seed=4)
    y_ref, dx_ref = serial_run(ser, x, dy)
    xp = (part(x, -1) if input_is_parallel else x).clone().requires_grad_()
    y = par(xp)
    y.backward(part(dy, 1) if sp else dy)
    close(y, part(y_ref, 1) if sp else y_ref, dtype)
    close(xp.grad, part(dx_ref, -1) if input_is_parallel else dx_ref, dtype)
    close(par.weight.grad, part(ser.weight.grad, 1), dtype)
    if bias:
        close(par.bias.grad, ser.bias.grad, dtype)


def test_column_then_row_on_tokens_2d():
    """[tokens, hidden] activations: dim -2 is the token dim (sequence parallel splits tokens)."""
    dtype = torch.float64
    c = ColumnParallelLinear(IN, OUT, W, sequence_parallel=True, seed=1, dtype=dtype)
    r = RowParallelLinear(OUT, IN, W, sequence_parallel=True, seed=2, dtype=dtype)
    c_ref, r_ref = tensor.seeded_linear(IN, OUT, seed=1, dtype=dtype), tensor.seeded_linear(OUT, IN, seed=2, dtype=dtype)
    x = rand(S, IN, dtype=dtype, seed=5)
    close(r(c(part(x, 0))), part(r_ref(c_ref(x)), 0).detach(), dtype)


@pytest.mark.parametrize("cls,dim", [(ColumnParallelLinear, 0), (RowParallelLinear, 1)])
def test_seed_is_layout_independent(cls, dim):
    """seed=s on the world group holds exactly the shard of the group-of-1 layer with seed=s."""
    par = cls(IN, OUT, W, seed=11)
    solo = cls(IN, OUT, MPI.COMM_SELF, seed=11)
    ref = tensor.seeded_linear(IN, OUT, seed=11)
    assert torch.equal(solo.weight, ref.weight) and torch.equal(solo.bias, ref.bias)
    assert torch.equal(par.weight, part(solo.weight, dim))
    assert torch.equal(par.bias, part(solo.bias, 0) if cls is ColumnParallelLinear else solo.bias)
    other = cls(IN, OUT, W, seed=12)
    assert not torch.equal(other.weight, par.weight)


@pytest.mark.parametrize("cls", [ColumnParallelLinear, RowParallelLinear])
@pytest.mark.parametrize("bias", [True, False])
def test_from_serial_round_trip(cls, bias):
    torch.manual_seed(5)  # the same serial layer on every rank
    ser = torch.nn.Linear(IN, OUT, bias=bias, dtype=torch.float64)
    par = cls.from_serial(ser, W)
    assert par.weight.dtype == torch.float64
    full = par.full_state_dict()
    ref = ser.state_dict()
    assert full.keys() == ref.keys()
    for k in ref:
        assert torch.equal(full[k], ref[k]), k


def test_column_stride_shards_each_block():
    """stride=3 (fused [q|k|v]): rank r keeps slice r of every block, in block order."""
    torch.manual_seed(6)
    ser = torch.nn.Linear(IN, 3 * OUT, dtype=torch.float64)
    par = ColumnParallelLinear.from_serial(ser, W, stride=3)
    blocks = ser.weight.detach().chunk(3, dim=0)
    assert torch.equal(par.weight, torch.cat([part(b, 0) for b in blocks]))
    assert torch.equal(par.full_state_dict()["weight"], ser.weight.detach())


def test_bf16_runs():
    c = ColumnParallelLinear(IN, OUT, W, seed=3, dtype=torch.bfloat16)
    r = RowParallelLinear(OUT, IN, W, seed=4, dtype=torch.bfloat16)
    x = rand(B, S, IN, dtype=torch.bfloat16, seed=6).requires_grad_()
    y = r(c(x))
    y.float().sum().backward()
    assert y.dtype == torch.bfloat16 and torch.isfinite(y.float()).all()
    ref = tensor.seeded_linear(OUT, IN, seed=4, dtype=torch.float64)(
        tensor.seeded_linear(IN, OUT, seed=3, dtype=torch.float64)(x.detach().double()))
    torch.testing.assert_close(y.double(), ref, rtol=5e-2, atol=5e-2)
    assert torch.isfinite(x.grad.float()).all() and torch.isfinite(c.weight.grad.float()).all()
    assert comm.all_reduce(torch.ones(1), W).item() == N  # the group is still in step


def test_sequence_parallel_column_saves_only_its_shard():
    """Megatron SP: the column layer keeps this rank's sequence shard for backward, not the gathered input."""
    par = ColumnParallelLinear(IN, OUT, W, sequence_parallel=True, seed=1)
    x = rand(B, S // N, IN, dtype=torch.float32, seed=1).requires_grad_()
    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        par(x).sum().backward()
    assert (B, S // N, IN) in saved
    assert N == 1 or (B, S, IN) not in saved
