"""The CUDA path: TP layers, ring attention (the CUDA SDPA kernel), the pipeline runner and
host staging on cuda tensors, each against the serial reference. Every test skips without a
GPU; `make test-gpu` runs them (and the other tests marked cuda) at 1 and 2 ranks."""
import pytest
import torch
from mpi4py import MPI
from conftest import requires_cuda

from mpipar import comm, device, settings, tensor
from mpipar.pipeline import PipelineRunner, partition
from mpipar.sequence import ring_attention, shard_sequence

pytestmark = pytest.mark.mpi

W = MPI.COMM_WORLD
N, R = W.Get_size(), W.Get_rank()


def cuda():
    return torch.device("cuda", R % torch.cuda.device_count())


def rand(*shape, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


def part(t, dim):
    n = t.shape[dim] // N
    return t.narrow(dim, R * n, n)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_column_then_row_on_cuda_match_serial_cpu(dtype):
    tol = 1e-10 if dtype is torch.float64 else 1e-4
    hidden, ffn = 8, 16 * N
    col_ser = tensor.seeded_linear(hidden, ffn, bias=True, seed=3, dtype=dtype)
    row_ser = tensor.seeded_linear(ffn, hidden, bias=True, seed=4, dtype=dtype)
    col = tensor.ColumnParallelLinear.from_serial(col_ser, W).to(cuda())
    row = tensor.RowParallelLinear.from_serial(row_ser, W).to(cuda())
    x, dy = rand(2, 6, hidden, seed=1, dtype=dtype), rand(2, 6, hidden, seed=2, dtype=dtype)
    xs = x.clone().requires_grad_()
    y_ref = row_ser(torch.relu(col_ser(xs)))
    y_ref.backward(dy)
    xc = x.to(cuda()).requires_grad_()
    y = row(torch.relu(col(xc)))
    y.backward(dy.to(cuda()))
    assert y.is_cuda
    torch.testing.assert_close(y.cpu(), y_ref.detach(), rtol=tol, atol=tol)
    torch.testing.assert_close(xc.grad.cpu(), xs.grad, rtol=tol, atol=tol)
    torch.testing.assert_close(col.weight.grad.cpu(), part(col_ser.weight.grad, 0), rtol=tol, atol=tol)
    torch.testing.assert_close(row.weight.grad.cpu(), part(row_ser.weight.grad, 1), rtol=tol, atol=tol)


@requires_cuda
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("causal", [True, False])
def test_ring_attention_cuda_kernel_matches_sdpa(dtype, tol, causal):
    q, k, v, dout = (rand(2, 4, 16 * N, 32, seed=s).to(cuda()) for s in range(4))
    full = [t.to(dtype).requires_grad_() for t in (q, k, v)]
    ref = torch.nn.functional.scaled_dot_product_attention(*full, is_causal=causal)
    ref_grads = torch.autograd.grad(ref, full, dout.to(dtype))
    mine = [shard_sequence(t.to(dtype), W).detach().requires_grad_() for t in (q, k, v)]
    out = ring_attention(*mine, W, causal=causal)
    grads = torch.autograd.grad(out, mine, shard_sequence(dout.to(dtype), W))
    for got, want in zip([out, *grads], [ref.detach(), *ref_grads]):
        assert got.is_cuda and got.dtype == dtype
        torch.testing.assert_close(got.float(), shard_sequence(want, W).float(), rtol=tol, atol=tol)


@requires_cuda
@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_pipeline_runner_on_cuda_matches_serial(schedule):
    g = torch.Generator().manual_seed(0)
    layers = []
    for i in range(2 * N + 1):
        lin = torch.nn.Linear(6, 6, dtype=torch.float64)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(6, 6, generator=g, dtype=torch.float64))
            lin.bias.copy_(torch.randn(6, generator=g, dtype=torch.float64))
        layers += [lin, torch.nn.Tanh()]
    x, y = rand(8, 6, seed=1), rand(8, 6, seed=2)
    ref = torch.nn.Sequential(*layers)
    loss_ref = torch.nn.functional.mse_loss(ref(x), y)
    loss_ref.backward()
    want = {id(p): p.grad.clone() for p in ref.parameters()}
    ref.zero_grad(set_to_none=True)  # the stages below are these same modules
    stage = partition(layers, N)[R]
    cpu_params = list(stage.parameters())
    stage = stage.to(cuda())
    runner = PipelineRunner(stage, W, schedule=schedule, num_microbatches=4,
                            loss_fn=torch.nn.functional.mse_loss)
    loss = runner.step(x.to(cuda()), y.to(cuda()))
    assert abs(loss - loss_ref.item()) < 1e-10
    for p_cpu, p in zip(cpu_params, stage.parameters()):
        assert p.is_cuda
        torch.testing.assert_close(p.grad.cpu(), want[id(p_cpu)], rtol=0, atol=1e-10)
    runner.close()


@requires_cuda
@pytest.mark.parametrize("force_staging", ["0", "1"])
def test_collectives_on_cuda_tensors(force_staging):
    with settings.override(force_staging=force_staging):
        x = torch.full((1000,), float(R + 1), device=cuda())
        s = comm.all_reduce(x.clone(), W)
        assert s.is_cuda and torch.equal(s.cpu(), torch.full((1000,), N * (N + 1) / 2))
        gathered = comm.all_gather(x, W)
        assert gathered.is_cuda and gathered.shape == (1000 * N,)


@requires_cuda
def test_cuda_aware_detection_follows_the_setting():
    device.mpi_is_cuda_aware.cache_clear()
    try:
        with settings.override(cuda_aware="0"):
            assert device.mpi_is_cuda_aware() is False
        device.mpi_is_cuda_aware.cache_clear()
        with settings.override(cuda_aware="1"):
            assert device.mpi_is_cuda_aware() is True
    finally:
        device.mpi_is_cuda_aware.cache_clear()
