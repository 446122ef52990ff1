"""mpipar.comm.symmetric.compiled: the compiled kernels of the shared-memory collectives.

sum_push (all-reduce) must give numpy's result bit for bit (the sum in numpy's order:
own + peer 0 + peer 1 ...) in own and in every peer, for every supported dtype, with 1 to
3 peers, at lengths that are not multiples of a vector or of its internal block, with
integer wrap-around and inf/nan/-0.0. stream_copy must copy every byte and nothing else
at any alignment and length; `copy` streams from its threshold only. Where a C compiler
exists the kernels must build (else this would test nothing).
"""
from __future__ import annotations

import platform

import numpy as np
import pytest
import torch

from mpipar.comm.symmetric import compiled as shm_compiled

pytestmark = pytest.mark.skipif(shm_compiled.compiler() is None, reason="no C compiler (cc or $CC)")

NP = {torch.float32: np.float32, torch.float64: np.float64, torch.int32: np.int32, torch.int64: np.int64}


def test_the_kernel_builds_where_a_compiler_exists():
    assert shm_compiled.library() is not None
    for dtype in NP:
        assert shm_compiled.kernel(dtype, "sum") is not None


def test_other_ops_dtypes_and_the_switch_fall_back_to_numpy(monkeypatch):
    assert shm_compiled.kernel(torch.float32, "max") is None
    assert shm_compiled.kernel(torch.bfloat16, "sum") is None
    assert shm_compiled.kernel(torch.int8, "sum") is None
    monkeypatch.setenv("MPIPAR_SHM_COMPILED", "0")
    assert shm_compiled.kernel(torch.float32, "sum") is None


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
    shm_compiled.bind(shm_compiled.kernel(dtype, "sum"), own, others)()
    for got in (own, *others):
        assert got.tobytes() == expected.tobytes()


def test_bind_refuses_mismatched_arrays():
    fn = shm_compiled.kernel(torch.float32, "sum")
    a = np.zeros(10, np.float32)
    with pytest.raises(ValueError):
        shm_compiled.bind(fn, a, [np.zeros(9, np.float32)])
    with pytest.raises(ValueError):
        shm_compiled.bind(fn, a, [np.zeros(20, np.float32)[::2]])
    with pytest.raises(ValueError):
        shm_compiled.bind(fn, a, [np.zeros(10, np.float64)])
    with pytest.raises(ValueError):
        shm_compiled.bind(fn, a.view(np.int32), [np.zeros(10, np.int32)])


# -- streaming copy -----------------------------------------------------------------------------
@pytest.mark.parametrize("n", [0, 1, 63, 64, 255, 256, 257, 4096 + 33, 100_000])
@pytest.mark.parametrize("dst_off,src_off", [(0, 0), (1, 0), (0, 5), (17, 63), (63, 1)])
def test_stream_copy_copies_every_byte_at_any_alignment(n, dst_off, src_off):
    lib = shm_compiled.library()
    rng = np.random.default_rng([n, dst_off, src_off])
    src = rng.integers(0, 256, size=n + 128, dtype=np.uint8)
    dst = np.zeros(n + 128, dtype=np.uint8)
    lib.stream_copy(dst[dst_off:].ctypes.data, src[src_off:].ctypes.data, n)
    assert dst[dst_off:dst_off + n].tobytes() == src[src_off:src_off + n].tobytes()
    assert not dst[:dst_off].any() and not dst[dst_off + n:].any()  # nothing outside


def test_copy_streams_from_the_threshold_only(monkeypatch, shm_counts):
    monkeypatch.setenv("MPIPAR_SHM_STREAM_BYTES", "4096")
    src = np.arange(2048, dtype=np.float32)
    for n, streams in ((1023, False), (1024, True)):
        dst = np.zeros(n, np.float32)
        before = shm_counts.streamed
        shm_compiled.copy(dst, src[:n])
        assert np.array_equal(dst, src[:n])
        assert shm_counts.streamed - before == (streams and shm_compiled.streaming())
    before = shm_counts.streamed
    dst = np.zeros((2, 1024), np.float32)
    shm_compiled.copy(dst[:, ::2], np.ones((2, 512), np.float32))  # strided: numpy's copy
    assert (dst[:, ::2] == 1).all() and not dst[:, 1::2].any()
    monkeypatch.setenv("MPIPAR_SHM_COMPILED", "0")
    shm_compiled.copy(np.zeros(2048, np.float32), src)
    assert shm_counts.streamed == before


def test_this_x86_build_streams():
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("streaming stores are built for x86 only")
    assert shm_compiled.library().stream_width() in (16, 32, 64)


# -- streaming fan-out (one source into several destinations) ----------------------------------
@pytest.mark.parametrize("n", [0, 1, 63, 128, 129, 4096 + 33, 100_000])
@pytest.mark.parametrize("offs", [(0, 0, 0), (5, 5, 5), (17, 17), (3, 64 + 3, 128 + 3), (0, 1, 2)])
def test_stream_fanout_copies_every_byte_into_every_destination(n, offs):
    """Destinations equally misaligned share one aligned body; differently aligned ones
    (the last case) take a stream_copy each. Nothing outside [off, off + n) is written."""
    lib = shm_compiled.library()
    rng = np.random.default_rng([n, *offs])
    src = rng.integers(0, 256, size=n + 7, dtype=np.uint8)[7:]
    dsts = [np.zeros(n + 256, dtype=np.uint8) for _ in offs]
    ptrs = (shm_compiled.ctypes.c_void_p * len(offs))(*[d[o:].ctypes.data for d, o in zip(dsts, offs)])
    lib.stream_fanout(ptrs, len(offs), src.ctypes.data, n)
    for d, o in zip(dsts, offs):
        assert d[o:o + n].tobytes() == src.tobytes()
        assert not d[:o].any() and not d[o + n:].any()


def test_fanout_streams_from_the_threshold_only(monkeypatch, shm_counts):
    monkeypatch.setenv("MPIPAR_SHM_STREAM_BYTES", "4096")
    src = np.arange(2048, dtype=np.float32)
    for n, streams in ((1023, False), (1024, True)):
        dsts = [np.zeros(n, np.float32) for _ in range(3)]
        before = shm_counts.streamed
        shm_compiled.fanout(dsts, src[:n])
        assert all(np.array_equal(d, src[:n]) for d in dsts)
        assert shm_counts.streamed - before == (3 if streams and shm_compiled.streaming() else 0)
    dsts = [np.zeros(1024, np.float32), np.zeros(2048, np.float32)[::2]]  # one strided: copy each
    shm_compiled.fanout(dsts, src[:1024])
    assert all(np.array_equal(d, src[:1024]) for d in dsts)
