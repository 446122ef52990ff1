"""mpipar.Mesh: rank order, coords, group membership, dp inference and errors."""
from __future__ import annotations

import itertools

import pytest
import torch
from conftest import same_on_all_ranks, skip_unless_divisible

import mpipar
from mpipar import MpiparError
from mpipar.mesh import Group, as_group

pytestmark = pytest.mark.mpi

DIMS = ("tp", "sp", "dp", "pp")


def factorizations(n):
    """Every (tp, sp, dp, pp) with tp*sp*dp*pp == n."""
    divisors = [d for d in range(1, n + 1) if n % d == 0]
    return [f for f in itertools.product(divisors, repeat=4) if f[0] * f[1] * f[2] * f[3] == n]


def contract_rank(c, shape):
    """The contract's rank = ((pp*DP + dp)*SP + sp)*TP + tp."""
    return ((c["pp"] * shape["dp"] + c["dp"]) * shape["sp"] + c["sp"]) * shape["tp"] + c["tp"]


def test_factorizations_helper():
    assert len(factorizations(1)) == 1 and len(factorizations(2)) == 4
    assert len(factorizations(4)) == 10 and (1, 2, 1, 2) in factorizations(4)


def test_every_factorization(world, checks):
    """For each layout: coords invert the contract's rank formula; each group holds exactly
    the ranks that differ from this one only in that dim, ordered by that dim's coordinate."""
    n, r = world.size, world.rank
    for tp, sp, dp, pp in factorizations(n):
        mesh = mpipar.Mesh(tp=tp, pp=pp, sp=sp, dp=dp, comm=world)
        shape = {"tp": tp, "sp": sp, "dp": dp, "pp": pp}
        checks.true(mesh.shape == shape, f"{shape}: mesh.shape {mesh.shape}")
        c = mesh.coords
        checks.true(set(c) == set(DIMS) and contract_rank(c, shape) == r, f"{shape}: coords {c}")
        checks.true(mesh.rank_of() == r, f"{shape}: rank_of {mesh.rank_of()}")
        checks.true((mesh.world.size, mesh.world.rank) == (n, r), f"{shape}: world group")
        for dim in DIMS:
            group = getattr(mesh, dim)
            checks.true(isinstance(group, Group) and (group.size, group.rank) == (shape[dim], c[dim]),
                        f"{shape} {dim}: size {group.size} rank {group.rank}")
            want = [contract_rank({**c, dim: i}, shape) for i in range(shape[dim])]
            got = group.comm.allgather(r)
            checks.true(got == want, f"{shape} {dim}: members {got}, want {want}")
        coords = world.allgather(tuple(c.get(d, -1) for d in DIMS))
        checks.true(len(set(coords)) == n, f"{shape}: coords repeat {coords}")
        checks.true(coords == sorted(coords, key=lambda x: (x[3], x[2], x[1], x[0])), f"{shape}: not tp fastest")
    checks.finish()


@pytest.mark.parametrize("tp,pp,sp", [(1, 1, 1), (2, 1, 1), (1, 2, 1), (1, 1, 2), (2, 2, 1), (1, 3, 1)])
def test_dp_is_inferred(world, tp, pp, sp):
    n = world.size
    skip_unless_divisible(n, tp * pp * sp, "world size")
    mesh = mpipar.Mesh(tp=tp, pp=pp, sp=sp, comm=world)
    assert mesh.dp.size == n // (tp * pp * sp) == mesh.shape["dp"]


def test_contract_example_positional_order(world):
    """Mesh(tp, pp, sp, dp): the second positional argument is pp, the third sp."""
    if world.size != 4:
        pytest.skip("needs 4 ranks")
    mesh = mpipar.Mesh(2, 2, 1, comm=world)
    assert (mesh.tp.size, mesh.pp.size, mesh.sp.size, mesh.dp.size) == (2, 2, 1, 1)


def bad_layouts(n):
    yield {"tp": n + 1}                      # larger than the world
    yield {"tp": 1, "dp": n + 1}             # explicit dp that does not fit
    yield {"tp": 0}                          # not positive
    yield {"tp": 1, "pp": -1}
    yield {"tp": 1.5}                        # not an int
    if n > 1:
        yield {"tp": 1, "dp": 1}             # product too small
    if n == 4:
        yield {"tp": 3}                      # does not divide
        yield {"tp": 2, "pp": 2, "dp": 2}


def test_mismatch_raises_same_error_on_every_rank(world):
    for kwargs in bad_layouts(world.size):
        with pytest.raises(MpiparError) as info:
            mpipar.Mesh(comm=world, **kwargs)
        assert isinstance(info.value, ValueError)
        assert same_on_all_ranks(world, str(info.value)), kwargs
    mesh = mpipar.Mesh(tp=1, comm=world)  # the world is still usable
    assert mesh.world.comm.allreduce(1) == world.size


def test_mesh_over_a_subcommunicator(world):
    """comm= may be any communicator: the mesh lives inside it."""
    r = world.rank
    sub = world.Split(r % 2, key=r)
    try:
        tp = 2 if sub.Get_size() % 2 == 0 else 1
        mesh = mpipar.Mesh(tp=tp, comm=sub)
        assert mesh.world.size == sub.Get_size() and mesh.world.rank == sub.Get_rank()
        members = mesh.tp.comm.allgather(r)
        assert all(m % 2 == r % 2 for m in members) and len(members) == tp
    finally:
        sub.Free()


def test_a_mesh_on_one_rank_counts_the_job_on_its_node(world, monkeypatch):
    """A mesh over MPI_COMM_SELF shares the node's cores (and devices) with every rank of the job:
    threads and oversubscription follow the job's ranks on the node, not the mesh's one rank.
    The launcher's figures stand in for the job here (set, so that every launcher is covered)."""
    import os

    from mpi4py import MPI

    from mpipar import device, settings
    from mpipar.settings import LOCAL_RANK_VARS, LOCAL_SIZE_VARS

    environ, noted, before = dict(os.environ), list(device._noted_local_size), torch.get_num_threads()
    for v in LOCAL_SIZE_VARS + LOCAL_RANK_VARS:
        monkeypatch.delenv(v, raising=False)
    monkeypatch.delenv("MPIPAR_THREADS", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("MPI_LOCALNRANKS", str(4 * device.cores_on_node()))   # crowded, whatever the host
    monkeypatch.setenv("MPI_LOCALRANKID", str(world.rank))
    try:
        mesh = mpipar.Mesh(comm=MPI.COMM_SELF)
        assert (mesh.local_rank, mesh.local_size) == (world.rank, 4 * device.cores_on_node())
        assert mesh.threads == 1 and torch.get_num_threads() == 1
        assert device.node_is_oversubscribed()
        mesh.close()
        monkeypatch.setenv("MPI_LOCALNRANKS", "0")     # not a count: the mesh's own ranks on the node
        mesh = mpipar.Mesh(comm=MPI.COMM_SELF)
        assert (mesh.local_rank, mesh.local_size) == (0, 1)
        mesh.close()
    finally:
        settings.reload(environ)
        device._noted_local_size[:] = noted
        device.node_is_oversubscribed.cache_clear()
        torch.set_num_threads(before)


def test_device_and_as_group(world):
    mesh = mpipar.Mesh(tp=1, comm=world)
    assert isinstance(mesh.device, torch.device)
    if not torch.cuda.is_available():
        assert mesh.device == torch.device("cpu")
    assert as_group(mesh.tp) is mesh.tp
    assert as_group(mesh) is mesh.world
    g = as_group(world)
    assert (g.rank, g.size, g.comm) == (world.rank, world.size, world)
    assert as_group(world) is g  # cached: one wrapper (and one private p2p comm) per communicator
    with pytest.raises(MpiparError):
        as_group("tp")


@pytest.mark.mpi
def test_settings_that_differ_across_ranks_raise_on_every_rank(world, monkeypatch):
    if world.Get_size() == 1:
        pytest.skip("needs 2 ranks")
    monkeypatch.setenv("MPIPAR_VALIDATE", "0" if world.Get_rank() == world.Get_size() - 1 else "1")
    with pytest.raises(MpiparError, match=f"ranks \\[{world.Get_size() - 1}\\]"):
        mpipar.Mesh()
    monkeypatch.setenv("MPIPAR_VALIDATE", "1")
    assert mpipar.Mesh().settings.validate == "1"


def _shared_maps() -> tuple[int, int]:
    """(count, bytes) of this process's shared-memory mappings (MPI shared windows)."""
    n = size = 0
    with open("/proc/self/maps") as f:
        for line in f:
            if "mpich_shar_tmp" in line or "/dev/shm/" in line:
                lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
                n, size = n + 1, size + hi - lo
    return n, size


def _train_one_step(mesh, zero: int):
    from mpipar import models

    cfg = models.GPTConfig(vocab_size=64, seq_len=8, hidden=32, num_heads=4, num_layers=2)
    model = models.GPT(cfg, mesh, zero=zero)
    opt = models.optimizer(model, torch.optim.SGD, lr=0.1)
    batch = 2 * mesh.shape["dp"]
    tokens = torch.arange(batch * 8).reshape(batch, 8) % 64
    loss = models.train_step(model, (tokens, tokens), opt, mesh, 2)
    return model, loss


@pytest.mark.parametrize("zero", [0, 1])
def test_close_frees_every_window_and_communicator(world, checks, zero):
    """A sweep that closes each layout's model and mesh maps no more shared memory at its
    tenth mesh than at its first (not closing them grows it per mesh), frees the groups'
    communicators (those split by the model too), and training on a new mesh after it gives
    the same loss. close() twice is fine."""
    import gc

    from mpi4py import MPI

    if world.size < 2:
        pytest.skip("a mesh of one rank has no gradient reduction")
    maps, losses = [], []
    for k in range(10):
        mesh = mpipar.Mesh(dp=world.size, comm=world)
        model, loss = _train_one_step(mesh, zero)
        data_group = model.data_group
        model.close()
        mesh.close()
        mesh.close()
        groups = [mesh.world, mesh.dp, mesh.tp, data_group]
        checks.true(all(g.comm == MPI.COMM_NULL for g in groups), f"mesh {k}: a communicator was not freed")
        losses.append(loss)
        del model, mesh, data_group, groups
        gc.collect()
        maps.append(_shared_maps())
    checks.true(maps[-1] == maps[0], f"shared mappings grew over 10 closed meshes: {maps}")
    checks.true(all(x == losses[0] for x in losses), f"losses differ: {losses}")
    checks.finish()


def test_without_close_the_windows_stay(world, checks):
    """The other side of the test above, so that it can fail: meshes left open keep their
    shared-memory windows mapped (checked where the gradient buckets take shared memory)."""
    import gc

    if world.size < 2:
        pytest.skip("a mesh of one rank has no gradient reduction")
    kept, before = [], None
    for k in range(3):
        mesh = mpipar.Mesh(dp=world.size, comm=world)
        model, _ = _train_one_step(mesh, 0)
        kept.append((mesh, model))
        gc.collect()
        if k == 0:
            before = _shared_maps()
    after = _shared_maps()
    shared = model.buckets.arena is not None
    for mesh, model in kept:
        model.close()
        mesh.close()
    if not same_on_all_ranks(world, shared) or not shared:
        pytest.skip("the gradient buckets did not take shared memory here")
    checks.true(after[1] > before[1], f"open meshes kept no more shared memory: {before} -> {after}")
    checks.finish()
