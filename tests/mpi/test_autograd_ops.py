"""Autograd region operators: adjoint tests and gradients against a serial float64 reference.

Inner products live on the global (distributed) vector space of each tensor:
- "rep" (replicated): every rank holds the same full tensor; it counts ONCE
  (the local inner product, which must agree across ranks);
- "sum" (sharded or partial): each rank holds a different piece; the global
  inner product is the SUM over ranks of the local ones.
For op: X -> Y, autograd's backward must be the adjoint op^T, i.e. with
op^T(y) = d<op(x), y>_local / dx computed by torch.autograd.grad on every rank:
    <op(x), y>_Y == <x, op^T(y)>_X.
Spaces: copy_to_region rep -> sum, reduce_from_region sum -> rep,
scatter_to_region rep -> sum, gather_from_region sum -> rep,
reduce_scatter_to_sequence sum -> sum, gather_from_sequence sum -> sum.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import mpipar
from mpipar import comm

pytestmark = pytest.mark.mpi


def randn(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def split(x, n, dim):
    return torch.tensor_split(x, n, dim=dim)


def inner(world, a, b, kind):
    """Global inner product of two tensors of the given space."""
    local = float((a.double() * b.double()).sum())
    values = world.allgather(local)
    if kind == "rep":
        assert max(values) - min(values) <= 1e-9 * (1 + abs(local)), f"not replicated: {values}"  # same on all ranks
        return local
    return sum(values)


def op_cases(n, r):
    """(name, fn, input x, output seed, in kind, out kind). Sizes 7 and 5 are not divisible by 2..4."""
    rep, mine = 11, 100 + r  # seeds: rep is the same on every rank, mine differs
    seq_sizes = [s.shape[1] for s in split(torch.empty(2, 7, 3), n, 1)]
    col_sizes = [s.shape[-1] for s in split(torch.empty(3, 7), n, -1)]
    return [
        ("copy_to_region", lambda x, g: comm.copy_to_region(x, g), randn((3, 4), rep), mine, "rep", "sum"),
        ("reduce_from_region", lambda x, g: comm.reduce_from_region(x, g), randn((3, 4), mine), rep, "sum", "rep"),
        ("scatter_to_region", lambda x, g: comm.scatter_to_region(x, g, dim=-1), randn((3, 7), rep), mine,
         "rep", "sum"),
        ("scatter_to_region_dim0", lambda x, g: comm.scatter_to_region(x, g, dim=0), randn((7, 3), rep), mine,
         "rep", "sum"),
        ("gather_from_region", lambda x, g: comm.gather_from_region(x, g, dim=-1), randn((3, col_sizes[r]), mine),
         rep, "sum", "rep"),
        ("reduce_scatter_to_sequence", lambda x, g: comm.reduce_scatter_to_sequence(x, g, dim=-2),
         randn((2, 7, 3), mine), mine, "sum", "sum"),
        ("gather_from_sequence", lambda x, g: comm.gather_from_sequence(x, g, dim=-2),
         randn((2, seq_sizes[r], 3), mine), mine, "sum", "sum"),
    ]


@pytest.mark.parametrize("index", range(7), ids=lambda i: op_cases(1, 0)[i][0])
def test_adjoint(world, index):
    name, fn, x, yseed, kin, kout = op_cases(world.size, world.rank)[index]
    x.requires_grad_(True)
    out = fn(x, world)
    y = randn(out.shape, yseed)
    (gx,) = torch.autograd.grad((out * y).sum(), x)
    lhs = inner(world, out.detach(), y, kout)
    rhs = inner(world, x.detach(), gx, kin)
    assert abs(lhs) > 1e-3, "degenerate test"
    assert abs(lhs - rhs) <= 1e-10 * (1 + abs(lhs)), f"{name}: <op x, y> = {lhs}, <x, op^T y> = {rhs}"


def test_forward_values(world, checks):
    """Each operator's forward against its definition (tensor_split order for splits)."""
    n, r = world.size, world.rank
    rep = randn((3, 7), 5)
    parts = [randn((2, 7, 3), 200 + i) for i in range(n)]
    mine = parts[r]
    shards = [split(randn((2, 7, 3), 300 + i), n, 1)[i] for i in range(n)]
    checks.equal(comm.copy_to_region(rep, world), rep, "copy_to_region")
    checks.close(comm.reduce_from_region(mine, world), sum(parts), 1e-12, 1e-12, "reduce_from_region")
    checks.equal(comm.scatter_to_region(rep, world), split(rep, n, -1)[r], "scatter_to_region")
    checks.equal(comm.gather_from_region(split(rep, n, -1)[r], world), rep, "gather_from_region")
    checks.close(comm.reduce_scatter_to_sequence(mine, world), split(sum(parts), n, -2)[r], 1e-12, 1e-12,
                 "reduce_scatter_to_sequence")
    checks.equal(comm.gather_from_sequence(shards[r], world), torch.cat(shards, 1), "gather_from_sequence")
    checks.true(torch.equal(mine, parts[r]), "reduce_from_region modified its input")
    checks.finish()


def mlp_weights(hidden=6, ffn=10):
    return randn((ffn, hidden), 1), randn((hidden, ffn), 2)


def serial_mlp(x, w1, w2):
    return F.gelu(x @ w1.T) @ w2.T


def test_tensor_parallel_mlp_gradients(world, checks):
    """Megatron MLP: copy_to_region -> column shard -> gelu -> row shard -> reduce_from_region."""
    n, r = world.size, world.rank
    w1, w2 = mlp_weights()
    x = randn((4, 6), 3)
    target = randn((4, 6), 4)
    xs = x.clone().requires_grad_(True)
    ws = [w.clone().requires_grad_(True) for w in (w1, w2)]
    ref = serial_mlp(xs, *ws)
    ((ref - target) ** 2).sum().backward()

    xp = x.clone().requires_grad_(True)
    w1p = split(w1, n, 0)[r].clone().requires_grad_(True)   # column parallel: output features
    w2p = split(w2, n, 1)[r].clone().requires_grad_(True)   # row parallel: input features
    h = F.gelu(comm.copy_to_region(xp, world) @ w1p.T)
    out = comm.reduce_from_region(h @ w2p.T, world)
    ((out - target) ** 2).sum().backward()   # replicated loss, the same on every rank

    tol = dict(rtol=1e-10, atol=1e-10)
    checks.close(out.detach(), ref.detach(), msg="output", **tol)
    checks.close(xp.grad, xs.grad, msg="input grad", **tol)
    checks.close(w1p.grad, split(ws[0].grad, n, 0)[r], msg="fc1 grad", **tol)
    checks.close(w2p.grad, split(ws[1].grad, n, 1)[r], msg="fc2 grad", **tol)
    checks.finish()


def test_sequence_parallel_mlp_gradients(world, checks):
    """Megatron-SP MLP: gather_from_sequence -> column -> gelu -> row -> reduce_scatter_to_sequence."""
    n, r = world.size, world.rank
    w1, w2 = mlp_weights()
    x = randn((2, 5, 6), 5)
    target = randn((2, 5, 6), 6)
    xs = x.clone().requires_grad_(True)
    ws = [w.clone().requires_grad_(True) for w in (w1, w2)]
    ref = serial_mlp(xs, *ws)
    ((ref - target) ** 2).sum().backward()

    xp = split(x, n, 1)[r].clone().requires_grad_(True)     # this rank's tokens
    w1p = split(w1, n, 0)[r].clone().requires_grad_(True)
    w2p = split(w2, n, 1)[r].clone().requires_grad_(True)
    h = F.gelu(comm.gather_from_sequence(xp, world, dim=-2) @ w1p.T)
    out = comm.reduce_scatter_to_sequence(h @ w2p.T, world, dim=-2)
    ((out - split(target, n, 1)[r]) ** 2).sum().backward()  # the loss is sharded: its sum over ranks

    tol = dict(rtol=1e-10, atol=1e-10)
    checks.close(out.detach(), split(ref.detach(), n, 1)[r], msg="output", **tol)
    checks.close(xp.grad, split(xs.grad, n, 1)[r], msg="input grad", **tol)
    checks.close(w1p.grad, split(ws[0].grad, n, 0)[r], msg="fc1 grad", **tol)
    checks.close(w2p.grad, split(ws[1].grad, n, 1)[r], msg="fc2 grad", **tol)
    checks.finish()


@pytest.mark.parametrize("dim", [-1, 0])
def test_scatter_gather_region_gradients(world, checks, dim):
    """Replicated x -> scatter -> local nonlinearity -> gather -> replicated loss: grads = serial."""
    n, r = world.size, world.rank
    x = randn((7, 5) if dim == 0 else (3, 7), 7)
    scale = randn(x.shape, 8)
    target = randn(x.shape, 9)
    xs = x.clone().requires_grad_(True)
    ((torch.tanh(xs) * scale) ** 2 * target).sum().backward()

    xp = x.clone().requires_grad_(True)
    local = torch.tanh(comm.scatter_to_region(xp, world, dim=dim)) * split(scale, n, dim)[r]
    full = comm.gather_from_region(local, world, dim=dim)
    loss = (full ** 2 * target).sum()
    loss.backward()
    checks.close(xp.grad, xs.grad, rtol=1e-10, atol=1e-10, msg="input grad")
    checks.finish()


def test_region_ops_on_a_mesh_group(world, checks):
    """The operators take a mesh Group; data flows only inside it (here tp with dp replicas)."""
    n, r = world.size, world.rank
    tp = 2 if n % 2 == 0 else 1
    mesh = mpipar.Mesh(tp=tp, comm=world)
    x = torch.full((3,), float(r), dtype=torch.float64, requires_grad=True)
    out = comm.reduce_from_region(comm.copy_to_region(x, mesh.tp), mesh.tp)
    out.sum().backward()
    members = [mesh.rank_of(tp=i) for i in range(tp)]
    checks.equal(out.detach(), torch.full((3,), float(sum(members)), dtype=torch.float64), "forward")
    checks.equal(x.grad, torch.full((3,), float(tp), dtype=torch.float64), "backward")
    checks.finish()
