"""GradBuckets: bucketed gradient all-reduce that starts during the backward, averaged over ranks;
plain (MPI Iallreduce) and symmetric (shared-memory) flat buffers."""
from __future__ import annotations

import copy

import pytest
import torch
from conftest import SHM_COUNTS
from mpi4py import MPI
from torch import nn

from mpipar.comm.symmetric import pool as symmetric
from mpipar.errors import MpiparError
from mpipar.mesh import Group
from mpipar.models.data_parallel import GradBuckets

WORLD = MPI.COMM_WORLD


def make_model(dtype=torch.float64):
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(8, 8, dtype=dtype) for _ in range(6)])


def local_input(seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(100 * WORLD.rank + seed)
    return torch.randn(5, 8, generator=g).to(dtype)


def reference_grads(model, passes, dtype=torch.float64):
    """Mean over ranks of each rank's accumulated gradients, computed without buckets."""
    ref = copy.deepcopy(model)
    for p in ref.parameters():
        p.grad = None
    for s in range(passes):
        ref(local_input(s, dtype)).pow(2).sum().backward()
    out = []
    for p in ref.parameters():
        g = p.grad.double()
        out.append(sum(WORLD.allgather(g)) / WORLD.Get_size())
    return out


@pytest.mark.mpi
@pytest.mark.parametrize("passes", [1, 3])
def test_mean_gradients_and_overlap(passes):
    model = make_model()
    ref = reference_grads(model, passes)
    buckets = GradBuckets(model.parameters(), WORLD, bucket_bytes=8 * 8 * 8)  # one layer per bucket
    assert len(buckets.buckets) == 6
    launched_when_first_layer_done = []
    model[0].weight.register_post_accumulate_grad_hook(
        lambda p: launched_when_first_layer_done.append(buckets._next))
    buckets.start(passes)
    for s in range(passes):
        model(local_input(s)).pow(2).sum().backward()
        if s < passes - 1:
            assert buckets._next == 0  # nothing is reduced before the last microbatch
    buckets.finish()
    for p, r in zip(model.parameters(), ref):
        assert torch.allclose(p.grad, r, rtol=1e-13, atol=1e-13)
    if WORLD.Get_size() > 1:
        # the last layers' buckets were already on the wire while layer 0 was still in backward
        assert launched_when_first_layer_done[-1] >= 4
    buckets.close()


@pytest.mark.mpi
def test_bf16_gradients_reduced_in_float32():
    model = make_model(torch.bfloat16)
    ref = reference_grads(model, 1, torch.bfloat16)
    buckets = GradBuckets(model.parameters(), WORLD)
    buckets.start(1)
    model(local_input(0, torch.bfloat16)).float().pow(2).sum().backward()
    buckets.finish()
    for p, r in zip(model.parameters(), ref):
        assert p.grad.dtype == torch.bfloat16
        assert torch.allclose(p.grad.double(), r, rtol=2e-2, atol=2e-2)


@pytest.mark.mpi
def test_unused_parameter_counts_as_zero_and_unarmed_is_inert():
    model = make_model()
    extra = nn.Parameter(torch.ones(3, dtype=torch.float64))
    buckets = GradBuckets(list(model.parameters()) + [extra], WORLD)
    model(local_input(0)).sum().backward()  # not armed: gradients stay local
    local = model[0].weight.grad.clone()
    buckets.start(1)
    buckets.finish()  # nothing accumulated during the step: everything launches at finish
    if WORLD.Get_size() > 1:  # (a group of one rank is left alone)
        assert torch.equal(extra.grad, torch.zeros(3, dtype=torch.float64))
    mean = sum(WORLD.allgather(local)) / WORLD.Get_size()
    assert torch.allclose(model[0].weight.grad, mean, rtol=1e-13, atol=1e-13)


# ---- symmetric (shared-memory) buckets ---------------------------------------------------------


@pytest.fixture
def dp_group():
    """A Group of its own over a Dup of WORLD (its own symmetric pool), freed at teardown."""
    g = Group(WORLD.Dup(), "dp-test")
    yield g
    symmetric.free_symmetric(g)
    g.comm.Free()


def shm_calls(g, how="shm") -> int:
    """All-reduces of g in shared memory (a test that asks takes the shm_counts fixture)."""
    return SHM_COUNTS.calls(g, "all_reduce", how)


def run_step(model, group, passes, symmetric_flag, data, bucket_bytes=8 * 8 * 8):
    """One bucketed step over `passes` microbatches; returns the grads and which buckets were symmetric."""
    buckets = GradBuckets(model.parameters(), group, bucket_bytes=bucket_bytes, symmetric=symmetric_flag)
    flags = [b.symmetric for b in buckets.buckets]
    buckets.start(passes)
    for s in range(passes):
        data(model, s).backward()
    buckets.finish()
    buckets.close()
    return [p.grad.clone() for p in model.parameters()], flags


def model_loss(model, s):
    return model(local_input(s)).pow(2).sum()


@pytest.mark.mpi
@pytest.mark.parametrize("passes", [1, 3])
def test_symmetric_buckets_match_plain(dp_group, passes, shm_counts):
    model = make_model()
    ref = reference_grads(model, passes)
    plain, plain_flags = run_step(copy.deepcopy(model), dp_group, passes, False, model_loss)
    assert not any(plain_flags) and shm_calls(dp_group) == 0
    sym, sym_flags = run_step(copy.deepcopy(model), dp_group, passes, True, model_loss)
    assert sym_flags == [WORLD.Get_size() > 1] * 6
    if WORLD.Get_size() > 1:
        assert shm_calls(dp_group) == 1  # all six float64 buckets: one run, one shm all-reduce
    for a, b, r in zip(plain, sym, ref):
        assert torch.allclose(b, r, rtol=1e-13, atol=1e-13)
        if WORLD.Get_size() <= 2:  # a + b is a + b: bit-identical
            assert torch.equal(a, b)
        else:  # the summation order may differ: last bit
            assert torch.allclose(a, b, rtol=1e-14, atol=1e-15)
    # identical on every rank
    for g in sym:
        assert all(torch.equal(g, other) for other in WORLD.allgather(g))


def dyadic_loss(model, s):
    """sum(p * c) with per-rank dyadic c: the gradients are c, sums of them exact in any order."""
    total = 0
    for i, p in enumerate(model.parameters()):
        gen = torch.Generator().manual_seed(1000 * WORLD.rank + 10 * i + s)
        c = torch.randint(-64, 65, p.shape, generator=gen).double() / 32
        total = total + (p * c).sum()
    return total


@pytest.mark.mpi
@pytest.mark.parametrize("passes", [1, 2])
def test_symmetric_bit_identical_to_plain_exact_data(dp_group, passes, shm_counts):
    model = make_model()
    plain, _ = run_step(copy.deepcopy(model), dp_group, passes, False, dyadic_loss)
    sym, _ = run_step(copy.deepcopy(model), dp_group, passes, True, dyadic_loss)
    for a, b in zip(plain, sym):
        assert torch.equal(a, b)
    if WORLD.Get_size() > 1:
        assert shm_calls(dp_group) == 1


@pytest.mark.mpi
def test_symmetric_buckets_ready_in_different_orders(dp_group):
    """Each rank produces the gradients in its own order: same results, no deadlock."""
    model = make_model()
    params = list(model.parameters())
    sym = GradBuckets(params, dp_group, bucket_bytes=8 * 8 * 8, symmetric=True)
    order = torch.randperm(len(params), generator=torch.Generator().manual_seed(WORLD.rank)).tolist()
    coef = [torch.full(p.shape, float(WORLD.rank + i + 1), dtype=torch.float64) for i, p in enumerate(params)]
    sym.start(1)
    for i in order:
        (params[i] * coef[i]).sum().backward()
    sym.finish()
    n = WORLD.Get_size()
    for i, p in enumerate(params):
        mean = (sum(r + i + 1 for r in range(n)) / n) if n > 1 else float(i + 1)
        assert torch.equal(p.grad, torch.full(p.shape, mean, dtype=torch.float64))
    sym.close()


@pytest.mark.mpi
def test_symmetric_mixed_dtypes_unused_and_bf16(dp_group, shm_counts):
    """float32, float64 and bf16 buckets (bf16 reduced in float32), an unused parameter."""
    torch.manual_seed(1)
    layers = [nn.Linear(8, 8, dtype=dt) for dt in (torch.float32, torch.float64, torch.bfloat16, torch.float64)]
    extra = nn.Parameter(torch.ones(3, dtype=torch.float32))
    params = [q for m in layers for q in m.parameters()] + [extra]
    runs = []
    for flag in (False, True):
        ps = [nn.Parameter(q.detach().clone()) for q in params]
        buckets = GradBuckets(ps, dp_group, bucket_bytes=1, symmetric=flag)  # one parameter per bucket
        buckets.start(1)
        gen = torch.Generator().manual_seed(WORLD.rank)
        sum((q.float() * torch.randn(q.shape, generator=gen)).sum() for q in ps[:-1]).backward()
        buckets.finish()
        runs.append([q.grad for q in ps])
        buckets.close()
    if WORLD.Get_size() == 1:  # a group of one rank is left alone
        return
    for a, b in zip(*runs):
        assert a.dtype == b.dtype
        tol = 1e-2 if a.dtype == torch.bfloat16 else 1e-6  # (a last-bit float32 difference may round apart)
        assert torch.allclose(a.double(), b.double(), rtol=tol, atol=tol)
        if WORLD.Get_size() <= 2:
            assert torch.equal(a, b)
    assert torch.equal(runs[1][-1], torch.zeros(3))
    assert shm_calls(dp_group) == 2  # one run per reduction dtype: float32 (and bf16), float64


@pytest.mark.mpi
def test_symmetric_auto_and_env(dp_group, monkeypatch):
    model = make_model()  # buckets of 576 bytes: below the shm crossover
    monkeypatch.delenv("MPIPAR_SYMMETRIC_BUCKETS", raising=False)
    auto = GradBuckets(model.parameters(), dp_group, bucket_bytes=8 * 8 * 8)
    assert not any(b.symmetric for b in auto.buckets)
    auto.close()
    monkeypatch.setenv("MPIPAR_SHM_CROSSOVER_ALL_REDUCE", "512")
    auto = GradBuckets(model.parameters(), dp_group, bucket_bytes=8 * 8 * 8)
    one_node = symmetric.pool_of(dp_group) is not None and symmetric.pool_of(dp_group).one_node
    # 8x8 weights (512 bytes) and the 8 biases share buckets of 576 bytes: all at the crossover
    assert [b.symmetric for b in auto.buckets] == [WORLD.Get_size() > 1 and one_node] * 6
    auto.close()
    monkeypatch.setenv("MPIPAR_SYMMETRIC_BUCKETS", "0")
    off = GradBuckets(model.parameters(), dp_group, bucket_bytes=8 * 8 * 8)
    assert not any(b.symmetric for b in off.buckets)
    off.close()
    monkeypatch.setenv("MPIPAR_SHM_CROSSOVER_ALL_REDUCE", str(1 << 30))
    monkeypatch.setenv("MPIPAR_SYMMETRIC_BUCKETS", "1")
    on = GradBuckets(model.parameters(), dp_group, bucket_bytes=8 * 8 * 8)
    assert all(b.symmetric for b in on.buckets) == (WORLD.Get_size() > 1)
    on.close()
    monkeypatch.setenv("MPIPAR_SYMMETRIC_BUCKETS", "yes")
    if WORLD.Get_size() > 1:
        with pytest.raises(MpiparError, match="MPIPAR_SYMMETRIC_BUCKETS"):
            GradBuckets(model.parameters(), dp_group)


@pytest.mark.mpi
def test_symmetric_buckets_across_fake_nodes(monkeypatch, shm_counts):
    """A group spanning (fake) nodes: auto stays plain; forced reduces hierarchically, same numbers."""
    monkeypatch.setenv("MPIPAR_FAKE_RANKS_PER_NODE", "2")
    monkeypatch.setenv("MPIPAR_SHM_CROSSOVER_ALL_REDUCE", "0")
    g = Group(WORLD.Dup(), "dp-fake")
    try:
        model = make_model()
        auto = GradBuckets(model.parameters(), g, bucket_bytes=8 * 8 * 8)
        spans = WORLD.Get_size() > 2
        assert [b.symmetric for b in auto.buckets] == [WORLD.Get_size() == 2] * 6
        auto.close()
        plain, _ = run_step(copy.deepcopy(model), g, 1, False, dyadic_loss)
        sym, _ = run_step(copy.deepcopy(model), g, 1, True, dyadic_loss)
        assert all(torch.equal(a, b) for a, b in zip(plain, sym))
        if spans:
            assert shm_calls(g, "hier") == 1
    finally:
        symmetric.free_symmetric(g)
        g.comm.Free()
