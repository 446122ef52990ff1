"""mpipar.comm.buffers: tensors as MPI buffers (dtype carriers, zero copy, staging). Pure: no MPI."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from mpipar import MpiparError
from mpipar.comm import buffers
from mpipar.comm.buffers import (StagingPool, dtype_code, flat_chunks, host_contiguous, mpi_buffer, needs_staging,
                                 np_view, offsets, reduce_dtype)

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
          torch.int8, torch.uint8, torch.bool, torch.complex64, torch.complex128]


def sample(dtype, shape=(3, 4)):
    g = torch.Generator().manual_seed(0)
    if dtype is torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    if dtype.is_complex or dtype.is_floating_point:
        return torch.randn(shape, generator=g, dtype=torch.complex128 if dtype.is_complex else torch.float64).to(dtype)
    return torch.randint(-100, 100, shape, generator=g).to(dtype) if dtype is not torch.uint8 else \
        torch.randint(0, 255, shape, generator=g).to(dtype)


@pytest.fixture(autouse=True)
def no_forced_staging(monkeypatch):
    monkeypatch.delenv("MPIPAR_FORCE_STAGING", raising=False)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_np_view_is_zero_copy_and_bit_exact(dtype):
    t = sample(dtype)
    v = np_view(t)
    assert v.shape == tuple(t.shape) and v.dtype.itemsize == t.element_size()
    assert v.ctypes.data == t.data_ptr()  # zero copy
    back = torch.from_numpy(v.copy()).view(dtype)
    assert torch.equal(back, t)
    v.reshape(-1)[0] = v.reshape(-1)[1]   # writes through to the tensor
    assert torch.equal(t.reshape(-1)[0], t.reshape(-1)[1])


def test_half_precision_travels_as_raw_bits():
    t = torch.tensor([1.0, -2.5, 3.140625], dtype=torch.bfloat16)
    v = np_view(t)
    assert v.dtype == np.int16
    assert v.tolist() == t.view(torch.int16).tolist()


def test_mpi_buffer_is_a_flat_zero_copy_view():
    t = torch.arange(12.0).reshape(3, 4)
    b = mpi_buffer(t)
    assert b.shape == (12,) and np.shares_memory(b, t.numpy())
    t.requires_grad_(True)
    assert mpi_buffer(t).ctypes.data == t.data_ptr()


def test_dtype_codes():
    codes = [dtype_code(d) for d in DTYPES]
    assert len(set(codes)) == len(codes)
    with pytest.raises(MpiparError):
        dtype_code(torch.float8_e4m3fn)


@pytest.mark.parametrize("dtype,want", [(torch.float16, torch.float32), (torch.bfloat16, torch.float32),
                                        (torch.bool, torch.uint8), (torch.float32, torch.float32),
                                        (torch.float64, torch.float64), (torch.int64, torch.int64),
                                        (torch.uint8, torch.uint8), (torch.int8, torch.int8)], ids=str)
def test_reduce_dtype(dtype, want):
    assert reduce_dtype(dtype) is want


def test_complex_reductions_are_rejected():
    with pytest.raises(MpiparError):
        reduce_dtype(torch.complex64)


@pytest.mark.parametrize("parts", [1, 2, 3, 4, 5])
def test_flat_chunks_follow_tensor_split(parts):
    for numel in range(0, 23):
        want = [c.numel() for c in torch.tensor_split(torch.empty(numel), parts)]
        assert flat_chunks(numel, parts) == want
        assert offsets(want) == [sum(want[:i]) for i in range(parts)]


def test_host_contiguous_zero_copy_for_contiguous_cpu():
    t = torch.arange(6.0)
    with host_contiguous(t) as h:
        assert h.data_ptr() == t.data_ptr()
        h.mul_(2)
    assert torch.equal(t, torch.arange(6.0) * 2)


@pytest.mark.parametrize("write_back", [True, False])
def test_host_contiguous_noncontiguous_copies_and_writes_back(write_back):
    base = torch.arange(12.0).reshape(3, 4)
    t = base.t()
    with host_contiguous(t, write_back=write_back) as h:
        assert h.is_contiguous() and torch.equal(h, t)
        h.add_(100)
    want = torch.arange(12.0).reshape(3, 4) + (100 if write_back else 0)
    assert torch.equal(base, want)


def test_forced_staging_goes_through_the_pool(monkeypatch):
    pool = StagingPool()
    monkeypatch.setattr(buffers, "STAGING", pool)
    monkeypatch.setenv("MPIPAR_FORCE_STAGING", "1")
    t = torch.arange(10.0)
    assert needs_staging(t)
    ptrs = []
    for _ in range(2):
        with host_contiguous(t) as h:
            assert h.data_ptr() != t.data_ptr() and torch.equal(h, t)
            ptrs.append(h.data_ptr())
            h.add_(1)
    assert ptrs[0] == ptrs[1]          # the staging buffer is reused
    assert torch.equal(t, torch.arange(10.0) + 2)


def test_needs_staging_default_cpu():
    assert not needs_staging(torch.zeros(2))


def test_staging_pool_reuse_growth_and_slots():
    pool = StagingPool()
    a = pool.get(10, torch.float32)
    b = pool.get(5, torch.float32)
    assert a.numel() == 10 and b.numel() == 5 and a.data_ptr() == b.data_ptr()
    c = pool.get(100, torch.float32)   # grows
    assert c.numel() == 100
    assert pool.get(100, torch.float32).data_ptr() == c.data_ptr()
    d = pool.get(10, torch.float32, slot=1)
    assert d.data_ptr() != c.data_ptr()
    e = pool.get(10, torch.bfloat16)
    assert e.dtype is torch.bfloat16 and e.data_ptr() not in (c.data_ptr(), d.data_ptr())
    assert pool.get(0, torch.float64).numel() == 0
