"""mpipar.comm.outputs: recycled outputs are reused only once nothing uses their memory."""
import numpy as np
import pytest
import torch
from conftest import requires_cuda

from mpipar.comm import outputs
from mpipar.comm.outputs import MIN_BYTES, OutputPool

N = MIN_BYTES // 4  # float32 elements of the smallest pooled output


def test_a_freed_output_is_reused():
    pool = OutputPool()
    a = pool.empty([N], torch.float32)
    ptr = a.data_ptr()
    del a
    b = pool.empty([N], torch.float32)
    assert b.data_ptr() == ptr and (pool.hits, pool.misses) == (1, 1)


@pytest.mark.parametrize("keep", ["tensor", "view", "numpy", "saved_for_backward", "reshaped"])
def test_memory_in_use_is_never_handed_out_again(keep):
    pool = OutputPool()
    a = pool.empty([N], torch.float32)
    a.fill_(7.0)
    if keep == "tensor":
        held = a
    elif keep == "view":
        held = a[5:9]
    elif keep == "numpy":
        held = a.numpy()
    elif keep == "reshaped":
        held = a.view(2, -1)
    else:
        w = torch.ones(N, requires_grad=True)
        held = (a * w).sum().grad_fn  # autograd saved `a` for the backward of the product
    ptr = a.data_ptr()
    del a
    b = pool.empty([N], torch.float32)
    b.fill_(-1.0)
    assert b.data_ptr() != ptr
    if keep in ("tensor", "view", "reshaped"):
        assert bool((held == 7.0).all())
    elif keep == "numpy":
        assert np.all(held == 7.0)
    del held, b
    pool.empty([N], torch.float32)
    assert pool.misses == 2  # both buffers free again: the next call reuses one


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.int64, torch.bool, torch.uint8])
def test_shapes_and_dtypes(dtype):
    pool = OutputPool()
    shape = [3, MIN_BYTES // dtype.itemsize // 3 + 1]
    a = pool.empty(shape, dtype)
    assert list(a.shape) == shape and a.dtype == dtype and a.is_contiguous()
    ptr = a.data_ptr()
    del a
    b = pool.empty(shape, dtype)
    assert b.data_ptr() == ptr


def test_small_outputs_are_plain_tensors():
    pool = OutputPool()
    a = pool.empty([16], torch.float32)
    assert a.shape == (16,) and not pool.buffers


def test_at_most_max_per_size_buffers(monkeypatch):
    monkeypatch.setattr(outputs, "MAX_PER_SIZE", 2)
    pool = OutputPool()
    held = [pool.empty([N], torch.float32) for _ in range(4)]
    assert len(pool.buffers[N * 4]) == 2 and all(h.shape == (N,) for h in held)
    assert len({h.data_ptr() for h in held}) == 4


def test_free_buffers_beyond_the_limit_are_released(monkeypatch):
    monkeypatch.setenv("MPIPAR_OUTPUT_POOL_BYTES", str(3 * MIN_BYTES))
    pool = OutputPool()
    for k in range(1, 6):  # five sizes, each freed at once; 4 and 5 exceed the limit: plain
        pool.empty([N * k], torch.float32)
        assert sum(b.base.numel() for b in pool.idle()) <= 3 * MIN_BYTES
    assert list(pool.buffers) == [N * 3 * 4]  # the most recent pooled one stays


def test_zero_turns_the_pool_off(monkeypatch):
    monkeypatch.setenv("MPIPAR_OUTPUT_POOL_BYTES", "0")
    pool = OutputPool()
    pool.empty([N], torch.float32)
    assert not pool.buffers


def test_clear_drops_free_buffers_only():
    pool = OutputPool()
    held = pool.empty([N], torch.float32)
    pool.empty([2 * N], torch.float32)
    pool.clear()
    assert list(pool.buffers) == [N * 4] and held.shape == (N,)


@requires_cuda
def test_cuda_outputs_bypass_the_pool():
    a = outputs.empty([N], torch.float32, "cuda")
    assert a.is_cuda
