"""Shared pytest fixtures and helpers for mpipar's tests (unit and MPI).

Import the helpers with `from conftest import ...` (pytest puts tests/ on sys.path).
mpi4py is imported lazily, so unit tests that launch `mpiexec` themselves never
initialise MPI in the pytest process.

- `world` fixture: MPI.COMM_WORLD.
- `skip_unless_divisible(n, size, what)`: skip (identically on every rank) when size does not divide n.
- `rank_tensor(shape, dtype, rank, seed)`: deterministic data any rank can rebuild for any other rank.
- `same_on_all_ranks(comm, value)`: True on every rank iff `value` (picklable) is equal on every rank.
- `checks` fixture (`RankChecks`): record comparisons without leaving the test early, then
  fail on every rank together. A rank that asserts and leaves a test while the
  others go on into the next collective would hang the job, so MPI tests that
  compare inside loops of collectives record with `checks` and call `checks.finish()`.
- `shm_counts` fixture (`ShmCounts`): how many collectives ran in shared memory and how many
  copies streamed, counted by wrapping the library's functions for the test.
- `serial_run`, `assert_matches_serial`: the serial reference of the layout tests and the
  comparison of a layout's losses and parameters with it.
- `requires_cuda`: decorator for CUDA-only tests: marked `cuda`, skipped without a GPU.
- `kernel_count()`: a torch dispatch mode counting the eager kernels run inside it, views
  left out (what mpipar.plan charges an op overhead each: its kernel-count constants' tests).
- `_settings_follow_env` (autouse): mpipar reads MPIPAR_* once (mpipar.settings); a test that
  sets one with `monkeypatch.setenv`/`delenv` gets the settings re-read at once, and again
  after the environment is restored.
"""
from __future__ import annotations

import pytest
import torch

def requires_cuda(test):
    """Mark a test `cuda` (selected by `make test-gpu`) and skip it without a GPU."""
    return pytest.mark.cuda(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")(test))


KERNEL_VIEWS = {"view", "_unsafe_view", "t", "transpose", "split", "detach", "promote_types", "expand", "permute",
                "unsqueeze", "squeeze", "slice", "select", "split_with_sizes", "as_strided", "reshape", "alias"}


def kernel_count():
    """A torch dispatch mode whose `n` counts the kernels dispatched inside it, views left out."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class KernelCount(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.n += func.overloadpacket.__name__ not in KERNEL_VIEWS
            return func(*args, **(kwargs or {}))

    return KernelCount()


def launcher_free_env() -> dict:
    """The caller's environment without MPI launcher variables (a test may run under mpiexec),
    for an mpiexec job that a unit test starts itself."""
    import os

    return {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "PMIX_", "HYDRA_", "MPIR_", "OMPI_"))}


def finish_job(proc, start: float, limit: float):
    """(returncode, output, seconds) of a job started with start_new_session=True; returncode None
    if it ran past `limit` seconds from `start` (then its whole process group is killed)."""
    import os
    import signal
    import subprocess
    import time

    try:
        out, _ = proc.communicate(timeout=max(1.0, limit - (time.monotonic() - start)))
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the job we started, with its ranks
        out, _ = proc.communicate()
        rc = None
    return rc, out, time.monotonic() - start


@pytest.fixture(autouse=True)
def _settings_follow_env(monkeypatch):
    from mpipar import settings

    setenv, delenv = monkeypatch.setenv, monkeypatch.delenv

    def set_and_reload(*args, **kwargs):
        setenv(*args, **kwargs)
        settings.reload()

    def del_and_reload(*args, **kwargs):
        delenv(*args, **kwargs)
        settings.reload()

    monkeypatch.setenv, monkeypatch.delenv = set_and_reload, del_and_reload
    yield
    monkeypatch.undo()
    settings.reload()


class ShmCounts:
    """What shared memory did in this process, counted from outside the library (it keeps no
    counters): `calls(g, op, how)` is how many `op` calls of group g ran as `how` ("shm",
    "hier", or "fused": the compiled all-reduce kernel ran), `streamed` how many copies
    streamed (non-temporal stores). Counted only while the `shm_counts` fixture is active."""

    def __init__(self):
        self.active = False
        self.reset()

    def reset(self) -> None:
        import weakref

        self.by_pool, self.streamed = weakref.WeakKeyDictionary(), 0  # pool -> {(op, how): calls}

    def add(self, pool, op: str, how: str) -> None:
        mine = self.by_pool.setdefault(pool, {})
        mine[(op, how)] = mine.get((op, how), 0) + 1

    def total(self, g, how: str = "shm") -> int:
        """Calls of every op of group g that ran as `how`."""
        from mpipar.comm import symmetric

        assert self.active, "count shared-memory calls under the shm_counts fixture"
        pool = symmetric.pool_of(g)
        return 0 if pool is None else sum(v for (_, h), v in self.by_pool.get(pool, {}).items() if h == how)

    def calls(self, g, op: str, how: str = "shm") -> int:
        from mpipar.comm import symmetric

        assert self.active, "count shared-memory calls under the shm_counts fixture"
        pool = symmetric.pool_of(g)
        return 0 if pool is None else self.by_pool.get(pool, {}).get((op, how), 0)


SHM_COUNTS = ShmCounts()


class _CountingLibrary:
    """The compiled kernel library, counting its streaming copies into a ShmCounts."""

    def __init__(self, lib, counts: ShmCounts):
        self._lib, self._counts = lib, counts

    def stream_copy(self, *args):
        self._counts.streamed += 1
        return self._lib.stream_copy(*args)

    def stream_fanout(self, ptrs, n, *args):
        self._counts.streamed += n
        return self._lib.stream_fanout(ptrs, n, *args)

    def __getattr__(self, name):
        return getattr(self._lib, name)


@pytest.fixture
def shm_counts(monkeypatch):
    """SHM_COUNTS, reset, counting for the test: wraps the function that decides whether a
    collective runs in shared memory (symmetric.collectives.enter), the entry of the flat
    block collectives (symmetric.blocks._enter), the compiled all-reduce plan
    (symmetric.compiled.sum_push_plan) and the kernel library's streaming copies."""
    from mpipar.comm.symmetric import blocks, collectives, compiled

    counts = SHM_COUNTS
    enter, plan, library = collectives.enter, compiled.sum_push_plan, compiled.library
    block_enter, take_prestaged = blocks._enter, collectives.take_prestaged

    def counted_block_enter(g, t, op, *rest):
        taken = block_enter(g, t, op, *rest)  # (pool, window, offset); raises otherwise
        counts.add(taken[0], op, "shm")
        return taken

    def counted_enter(g, t, algorithm, op_name, *rest):
        taken = enter(g, t, algorithm, op_name, *rest)  # (pool, window, offset, how) or None
        if taken is not None:
            counts.add(taken[0], op_name, taken[3])
        return taken

    def counted_plan(pool, *args):
        fused = plan(pool, *args)  # the caller runs it at once
        if fused is not None:
            counts.add(pool, "all_reduce", "fused")
        return fused

    def counted_library():
        lib = library()
        return None if lib is None else _CountingLibrary(lib, counts)

    monkeypatch.setattr(collectives, "enter", counted_enter)
    monkeypatch.setattr(blocks, "_enter", counted_block_enter)

    def counted_prestaged(pool, window):
        counts.add(pool, "all_reduce", "prestaged")
        return take_prestaged(pool, window)
    monkeypatch.setattr(collectives, "take_prestaged", counted_prestaged)
    monkeypatch.setattr(compiled, "sum_push_plan", counted_plan)
    monkeypatch.setattr(compiled, "library", counted_library)
    counts.reset()
    counts.active = True  # (also "prestaged": an all_reduce took the input copied before its agreement)
    yield counts
    counts.active = False


@pytest.fixture
def world():
    """MPI.COMM_WORLD (the communicator every MPI test runs on)."""
    from mpi4py import MPI

    return MPI.COMM_WORLD


def skip_unless_divisible(n: int, size: int, what: str = "size") -> None:
    """pytest.skip unless size divides n (the outcome is the same on every rank)."""
    if size <= 0 or n % size:
        pytest.skip(f"{what} {n} is not divisible by {size}")


def rank_tensor(shape, dtype=torch.float64, rank: int = 0, seed: int = 0) -> torch.Tensor:
    """Deterministic test data of `rank` (every rank can rebuild every other rank's data).

    Floats are multiples of 1/4 in [-16, 16): sums of a few of them are exact in
    float32, so reductions of any float dtype have a single exact reference.
    Integers are in [-50, 50) (uint8: [0, 60)), bools are random.
    """
    gen = torch.Generator().manual_seed(1_000_003 * seed + 7919 * rank + 17)
    if dtype is torch.bool:
        return torch.randint(0, 2, shape, generator=gen).bool()
    if dtype is torch.uint8:
        return torch.randint(0, 60, shape, generator=gen).to(dtype)
    if dtype.is_floating_point:
        return (torch.randint(-64, 64, shape, generator=gen).double() / 4).to(dtype)
    return torch.randint(-50, 50, shape, generator=gen).to(dtype)


def same_on_all_ranks(comm, value) -> bool:
    """Collective: True on every rank iff `value` is equal (==) on every rank of `comm`."""
    values = comm.allgather(value)
    return all(v == values[0] for v in values)


class RankChecks:
    """Per-rank check results, failed together on every rank by `finish()` (collective)."""

    def __init__(self, comm):
        self.comm, self.failures, self.finished = comm, [], False

    def true(self, cond, msg="") -> bool:
        if not cond:
            self.failures.append(str(msg))
        return bool(cond)

    def equal(self, got: torch.Tensor, want: torch.Tensor, msg="") -> bool:
        """Same dtype, shape and values (bit-equal up to NaN placement)."""
        if got.dtype != want.dtype or got.shape != want.shape:
            return self.true(False, f"{msg}: got {got.dtype}{tuple(got.shape)}, want {want.dtype}{tuple(want.shape)}")
        ok = torch.equal(got, want)
        diff = "" if ok else f" max |diff| {(got.double() - want.double()).abs().max().item()}"
        return self.true(ok, f"{msg}: values differ{diff}")

    def close(self, got, want, rtol, atol, msg="") -> bool:
        """Same dtype and shape, |got - want| <= atol + rtol * |want| elementwise."""
        if got.dtype != want.dtype or got.shape != want.shape:
            return self.true(False, f"{msg}: got {got.dtype}{tuple(got.shape)}, want {want.dtype}{tuple(want.shape)}")
        ok = torch.allclose(got, want, rtol=rtol, atol=atol)
        diff = "" if ok else f" max |diff| {(got.double() - want.double()).abs().max().item()}"
        return self.true(ok, f"{msg}: not close (rtol {rtol}, atol {atol}){diff}")

    def finish(self) -> None:
        """Collective: raise AssertionError on every rank if any rank recorded a failure."""
        self.finished = True
        every = self.comm.allgather(self.failures)
        lines = [f"rank {r}: {m}" for r, fs in enumerate(every) for m in fs]
        self.failures = []
        if lines:
            raise AssertionError("\n".join(lines[:20]) + (f"\n... {len(lines) - 20} more" if len(lines) > 20 else ""))


@pytest.fixture
def checks(world):
    """A RankChecks on COMM_WORLD; finished at teardown if the test did not call finish()."""
    c = RankChecks(world)
    yield c
    if not c.finished:
        c.finish()


_SERIAL_RUNS: dict = {}


def serial_run(cfg, batches, m: int, **opts):
    """(losses, final state_dict) of the serial GPT of `cfg` (float64) trained on `batches` with
    AdamW (lr 1e-2, weight decay 0.1) and m microbatches per step: the reference of the
    layout tests (tests/mpi/test_gpt_layouts.py, test_llama_layouts.py); cached per config,
    data and options."""
    from mpipar import models

    data = tuple(hash(t.numpy().tobytes()) for b in batches for t in b)
    key = (tuple(sorted(cfg.to_dict().items())), data, m, tuple(sorted(opts.items())))
    if key not in _SERIAL_RUNS:
        model = models.GPT(cfg, dtype=torch.float64)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
        losses = [models.train_step(model, b, opt, num_microbatches=m, **opts) for b in batches]
        _SERIAL_RUNS[key] = (losses, model.state_dict())
    return _SERIAL_RUNS[key]


def assert_matches_serial(comm, losses, state, reference, loss_tol=1e-9, param_tol=1e-8) -> None:
    """A layout's run (this rank's losses, full state_dict) against serial_run's: the same losses
    on every rank of `comm`, each within loss_tol of the serial one, the same parameter names,
    every parameter within param_tol; and the reference trained (its loss moved)."""
    ref_losses, ref_state = reference
    assert all(row == losses for row in comm.allgather(losses)), "the loss differs between ranks"
    for step, (a, b) in enumerate(zip(losses, ref_losses)):
        assert abs(a - b) < loss_tol, f"step {step}: loss {a} != serial {b}"
    assert list(state) == list(ref_state)
    worst = max(float((state[k] - ref_state[k]).abs().max()) for k in ref_state)
    assert worst < param_tol, f"final parameters differ from the serial model's by {worst}"
    assert ref_losses[-1] != ref_losses[0]


def full_attention_inputs(batch, heads, seq, dim, dtype, seed=0):
    """q, k, v, dout on the full sequence, identical on every rank."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, heads, seq, dim, generator=g, dtype=torch.float64).to(dtype) for _ in range(4)]


def attention_vs_sdpa(fn, comm, causal, layout, dtype, batch=2, heads=3, local=8, dim=8, atol=1e-10,
                      ref_dtype=None, seed=0):
    """Max abs error of fn's out, dq, dk, dv (this rank's part) vs SDPA on the full sequence.

    fn is a sequence-parallel attention (ring_attention, ulysses_attention) called as
    fn(q, k, v, comm, causal=..., layout=...) on this rank's shard of each tensor.
    """
    import torch.nn.functional as F

    from mpipar.sequence import shard_sequence

    q, k, v, dout = full_attention_inputs(batch, heads, local * comm.Get_size(), dim, dtype, seed)
    ref_dtype = ref_dtype or dtype
    full = [t.to(ref_dtype).requires_grad_() for t in (q, k, v)]
    ref = F.scaled_dot_product_attention(*full, is_causal=causal)
    ref_grads = torch.autograd.grad(ref, full, dout.to(ref_dtype))
    mine = [shard_sequence(t, comm, layout=layout).requires_grad_() for t in (q, k, v)]
    out = fn(*mine, comm, causal=causal, layout=layout)
    assert out.shape == mine[0].shape and out.dtype == dtype
    grads = torch.autograd.grad(out, mine, shard_sequence(dout, comm, layout=layout))
    errs = [(a.to(ref_dtype) - shard_sequence(b, comm, layout=layout)).abs().max().item()
            for a, b in zip([out, *grads], [ref.detach(), *ref_grads])]
    if atol is not None:
        assert max(errs) <= atol, f"errors out/dq/dk/dv {errs}"
    return errs


def np_reduce(tensors, op):
    """Elementwise op over ranks in float64/int64 numpy, rounded once to the dtype (int sums wrap)."""
    import numpy as np

    dtype = tensors[0].dtype
    stack = torch.stack([t.double() if dtype.is_floating_point else t.long() for t in tensors]).numpy()
    if dtype is torch.bool:
        out = {"sum": np.any, "max": np.any, "min": np.all}[op](stack, axis=0)
    else:
        out = {"sum": np.sum, "max": np.max, "min": np.min}[op](stack, axis=0)
    return torch.from_numpy(np.asarray(out)).to(dtype)
