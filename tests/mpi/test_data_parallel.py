"""GradBuckets: bucketed gradient all-reduce that starts during the backward, averaged over ranks."""
from __future__ import annotations

import copy

import pytest
import torch
from mpi4py import MPI
from torch import nn

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
