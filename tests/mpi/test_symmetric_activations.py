"""Symmetric activations (mpipar.comm.symmetric.activations): the copies that tensor-parallel regions
all-reduce are born in shared memory; results must not change, forced on, off or auto."""
import pytest
import torch
from mpi4py import MPI

from mpipar import MpiparError, comm, models
from mpipar.comm.symmetric import activations
from mpipar.comm.symmetric.pool import pool_of
from mpipar.mesh import as_group
from mpipar.tensor import ParallelMLP, ParallelSelfAttention

pytestmark = pytest.mark.mpi

W = MPI.COMM_WORLD
N = W.Get_size()
B, S, H, FFN, HEADS = 2, 12, 24, 48, 12


def rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def run(module, x, dy):
    x = x.clone().requires_grad_()
    y = module(x)
    y.backward(dy)
    return y.detach(), x.grad


@pytest.mark.parametrize("setting", ["0", "1", ""])
def test_region_ops_exact_and_symmetric_when_asked(monkeypatch, setting):
    monkeypatch.setenv(activations.ENV, setting)
    g = as_group(W)
    x = torch.full((512, 257), float(g.rank + 1), dtype=torch.float64)  # 1.004 MiB: above AUTO_BYTES
    y = comm.reduce_from_region(x, g)
    assert torch.equal(y, torch.full_like(x, N * (N + 1) / 2))
    assert torch.equal(x, torch.full_like(x, float(g.rank + 1))), "the input must stay untouched"
    pool = pool_of(g)
    in_shm = pool is not None and pool.locate(y) is not None
    expected = N > 1 and setting != "0"  # auto: on, one node and above the crossover
    assert in_shm == expected, (setting, in_shm)
    leaf = x.clone().requires_grad_()
    out = comm.copy_to_region(leaf, g)
    (out * (g.rank + 1)).sum().backward()
    assert torch.equal(leaf.grad, torch.full_like(x, N * (N + 1) / 2))


def test_small_activations_stay_plain(monkeypatch):
    monkeypatch.delenv(activations.ENV, raising=False)
    g = as_group(W)
    small = torch.ones(activations.AUTO_BYTES // 8 - 1, dtype=torch.float64)
    y = comm.reduce_from_region(small, g)
    pool = pool_of(g)
    assert pool is None or pool.locate(y) is None


def test_bad_setting_raises(monkeypatch):
    monkeypatch.setenv(activations.ENV, "yes")
    with pytest.raises(MpiparError, match="must be 0 or 1"):
        activations.mode()


@pytest.mark.parametrize("kind", ["mlp", "attention"])
def test_layers_match_serial_with_symmetric_activations(monkeypatch, kind, shm_counts):
    monkeypatch.setenv(activations.ENV, "1")
    if kind == "mlp":
        ser = models.MLP(H, FFN, seed=5, dtype=torch.float64)
        par = ParallelMLP(H, FFN, W, seed=5, dtype=torch.float64)
    else:
        ser = models.SelfAttention(H, HEADS, causal=True, seed=5, dtype=torch.float64)
        par = ParallelSelfAttention(H, HEADS, W, causal=True, seed=5, dtype=torch.float64)
    x, dy = rand(B, S, H, seed=1), rand(B, S, H, seed=2)
    y_ref, dx_ref = run(ser, x, dy)
    for _ in range(3):  # windows come back to the pool and are reused
        y, dx = run(par, x, dy)
        torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(dx, dx_ref, rtol=1e-10, atol=1e-10)
    pool = pool_of(as_group(W))
    if N > 1:
        assert pool is not None and shm_counts.calls(as_group(W), "all_reduce") > 0
