"""mpipar.comm.shm_fused: the compiled add-and-push kernel of the shared-memory all-reduce.

It must give numpy's result bit for bit (the sum in numpy's order: own + peer 0 + peer 1 ...)
in own and in every peer, for every supported dtype, with 1 to 3 peers, at lengths that
are not multiples of a vector or of its internal block, with integer wrap-around and
inf/nan/-0.0. Where a C compiler exists the kernel must build (else this would test nothing).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from mpipar.comm import shm_fused

pytestmark = pytest.mark.skipif(shm_fused.compiler() is None, reason="no C compiler (cc or $CC)")

NP = {torch.float32: np.float32, torch.float64: np.float64, torch.int32: np.int32, torch.int64: np.int64}


def test_the_kernel_builds_where_a_compiler_exists():
    assert shm_fused.library() is not None
    for dtype in NP:
        assert shm_fused.kernel(dtype, "sum") is not None


def test_other_ops_dtypes_and_the_switch_fall_back_to_numpy(monkeypatch):
    assert shm_fused.kernel(torch.float32, "max") is None
    assert shm_fused.kernel(torch.bfloat16, "sum") is None
    assert shm_fused.kernel(torch.int8, "sum") is None
    monkeypatch.setenv("MPIPAR_SHM_FUSED", "0")
    assert shm_fused.kernel(torch.float32, "sum") is None


def inputs(dtype, n, parts, rng):
    kind = NP[dtype]
    if np.issubdtype(kind, np.integer):
        info = np.iinfo(kind)
        arrays = [rng.integers(info.min, info.max, size=n, dtype=kind, endpoint=True) for _ in range(parts)]
        arrays[0][:4] = info.max  # wraps around
    else:
        arrays = [(rng.standard_normal(n) * 10.0 ** rng.integers(-8, 8, size=n)).astype(kind) for _ in range(parts)]
        arrays[0][:5] = [np.inf, -np.inf, np.nan, -0.0, 1e308 if kind is np.float64 else 3e38]
        arrays[1][:5] = [1.0, np.inf, 2.0, -0.0, 1e308 if kind is np.float64 else 3e38]
    return arrays


@pytest.mark.parametrize("dtype", list(NP), ids=str)
@pytest.mark.parametrize("peers", [1, 2, 3])
@pytest.mark.parametrize("n", [0, 1, 7, 2048, 2049, 5000])
def test_matches_numpy_bit_for_bit(dtype, peers, n):
    rng = np.random.default_rng([n, peers])
    own, *others = inputs(dtype, max(n, 8), peers + 1, rng)
    own, others = own[:n].copy(), [p[:n].copy() for p in others]
    expected = own.copy()
    with np.errstate(all="ignore"):
        for p in others:
            np.add(expected, p, out=expected)
    shm_fused.bind(shm_fused.kernel(dtype, "sum"), own, others)()
    for got in (own, *others):
        assert got.tobytes() == expected.tobytes()


def test_bind_refuses_mismatched_arrays():
    fn = shm_fused.kernel(torch.float32, "sum")
    a = np.zeros(10, np.float32)
    with pytest.raises(ValueError):
        shm_fused.bind(fn, a, [np.zeros(9, np.float32)])
    with pytest.raises(ValueError):
        shm_fused.bind(fn, a, [np.zeros(20, np.float32)[::2]])
    with pytest.raises(ValueError):
        shm_fused.bind(fn, a, [np.zeros(10, np.float64)])
    with pytest.raises(ValueError):
        shm_fused.bind(fn, a.view(np.int32), [np.zeros(10, np.int32)])
