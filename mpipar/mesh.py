"""Mesh and Group: named process groups tp/sp/dp/pp over any MPI communicator.

Rank order (Megatron's default): tp varies fastest, then sp, then dp, then pp:
``rank = ((pp*DP + dp)*SP + sp)*TP + tp``. There is no module-level state: every
parallel layer is handed the Group it works on.
"""
from __future__ import annotations

import torch

from . import device as _device
from . import settings as _settings
from .errors import MpiparError
from .flight import job as _flight_job
from .flight.recorder import counts, register, world_ranks

DIMS = ("tp", "sp", "dp", "pp")  # fastest-varying first


class Group:
    """An MPI sub-communicator: `.comm` (mpi4py), `.rank`, `.size`.

    `.p2p` is a private duplicate used for mpipar's internal point-to-point
    traffic (ring collectives), so it can never match a user's send/recv.
    `.owner`: the Mesh it belongs to (its own groups and those split from them,
    which `Mesh.close` frees), or None.
    """

    def __init__(self, comm, name: str = "group", owner: "Mesh | None" = None):
        self.comm = comm
        self.name = name
        self.owner = owner
        self._closers: list = []  # what frees this group's resources when its mesh closes (at_close)
        if owner is not None:
            owner._owned.append(self)
        self.rank = comm.Get_rank()
        self.size = comm.Get_size()
        self._p2p = None
        self._oversubscribed = None
        self.world_ranks = world_ranks(comm)  # the flight recorder's view (mpipar.flight)
        self.flight_counts = counts()  # its calls' sequence numbers: collectives, p2p
        register(comm, self)

    @property
    def p2p(self):
        if self._p2p is None:
            self._p2p = self.comm.Dup()
        return self._p2p

    @property
    def oversubscribed(self) -> bool:
        """True when this node runs more ranks than it has cores (then waits sleep)."""
        if self._oversubscribed is None:
            self._oversubscribed = _device.node_is_oversubscribed()
        return self._oversubscribed

    def split(self, color: int, key: int, name: str) -> "Group | None":
        """Collective over this group: MPI's Split as a Group of the same mesh; None where
        `color` is MPI.UNDEFINED."""
        from mpi4py import MPI

        comm = self.comm.Split(color, key=key)
        return None if comm == MPI.COMM_NULL else Group(comm, name, self.owner)

    def dup(self, name: str) -> "Group":
        """Collective over this group: a duplicate (its own message space) of the same mesh."""
        return Group(self.comm.Dup(), name, self.owner)

    def at_close(self, fn) -> None:
        """Have fn() (collective over this group) run when the group's Mesh closes, before the
        communicators are freed: how a subsystem that attaches resources to a group (the
        symmetric pool's windows) frees them, without the mesh knowing it."""
        self._closers.append(fn)

    def release(self) -> None:
        """Free this group's communicators (its p2p duplicate too); local bookkeeping aside,
        MPI's Comm_free is collective. A communicator freed already (ZeRO's close) is skipped."""
        from mpi4py import MPI

        for comm in (self._p2p, self.comm):
            if comm is not None and comm != MPI.COMM_NULL:
                comm.Free()
        self._p2p = None

    def __repr__(self) -> str:
        return f"Group({self.name}, rank={self.rank}, size={self.size})"


def as_group(group) -> Group:
    """Accept a Group, an mpi4py communicator, or a Mesh (-> its world group)."""
    if isinstance(group, Group):
        return group
    if isinstance(group, Mesh):
        return group.world
    if hasattr(group, "Get_rank") and hasattr(group, "Get_size"):
        return _wrapped(group)
    raise MpiparError(f"expected an mpipar.Group or an mpi4py communicator, got {type(group).__name__}")


_WRAPPED: dict = {}


def _wrapped(comm) -> Group:
    key = id(comm)
    g = _WRAPPED.get(key)
    if g is None or g.comm is not comm:
        g = _WRAPPED[key] = Group(comm, "comm")
    return g


class Mesh:
    """Process groups for tensor, sequence, data and pipeline parallelism.

    dp=None infers dp = world_size // (tp*sp*pp). Any mismatch raises
    MpiparError on every rank (the check uses only values every rank has).
    """

    def __init__(self, tp: int = 1, pp: int = 1, sp: int = 1, dp: int | None = None, comm=None):
        from mpi4py import MPI

        base = MPI.COMM_WORLD if comm is None else comm
        world_size = base.Get_size()
        for name, value in (("tp", tp), ("pp", pp), ("sp", sp), ("dp", dp)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise MpiparError(f"Mesh: {name} must be a positive int, got {value!r}")
        model = tp * sp * pp
        if dp is None:
            if world_size % model:
                raise MpiparError(
                    f"Mesh: world size {world_size} is not divisible by tp*sp*pp = {tp}*{sp}*{pp} = {model}")
            dp = world_size // model
        if tp * sp * dp * pp != world_size:
            raise MpiparError(
                f"Mesh: tp*sp*dp*pp = {tp}*{sp}*{dp}*{pp} = {tp * sp * dp * pp} != world size {world_size}")
        self.shape = {"tp": tp, "sp": sp, "dp": dp, "pp": pp}
        self._owned: list[Group] = []  # every group of this mesh, in creation order (close frees them)
        self._closed = False
        self._comm = base.Dup()
        self.settings = _settings.agree(self._comm)  # read once per Mesh, equal on every rank
        rank = self._comm.Get_rank()
        self.coords = self._coords_of(rank)
        self.world = Group(self._comm, "world", self)
        for dim in DIMS:
            setattr(self, dim, self.world.split(self._color_without(dim), rank, dim))
        local_rank, local_size = _device.sharing_node(self._comm)
        self.local_rank, self.local_size = local_rank, local_size
        _device.note_local_size(local_size)
        self.threads = _device.set_threads(local_size)
        self.device: torch.device = _device.pick_device(local_rank)
        _flight_job.install(self._comm)  # abort on error, watchdog, flight record (once per process)

    def _coords_of(self, rank: int) -> dict:
        coords = {}
        for dim in DIMS:
            coords[dim] = rank % self.shape[dim]
            rank //= self.shape[dim]
        return coords

    def rank_of(self, **coords) -> int:
        """World rank of the given coordinates (missing dims default to this rank's)."""
        c = {**self.coords, **coords}
        return ((c["pp"] * self.shape["dp"] + c["dp"]) * self.shape["sp"] + c["sp"]) * self.shape["tp"] + c["tp"]

    def _color_without(self, dim: str) -> int:
        c = dict(self.coords)
        c[dim] = 0
        return self.rank_of(**c)

    def close(self) -> None:
        """Collective over the mesh: free what its groups hold, and the groups split from
        them (Group.split, Group.dup): their shared-memory windows and communicators, as
        torch.distributed.destroy_process_group does. Nothing built on the mesh may be used
        after (a symmetric tensor's memory is unmapped): close what holds shared memory
        first (`model.buckets.close()`). A sweep that builds one mesh per layout closes each,
        or every layout's windows stay mapped. Idempotent."""
        if self._closed:
            return
        self._closed = True
        # Creation order is program order, the same on every rank, so these collectives
        # (the groups' at_close functions) meet in the same order everywhere.
        for g in self._owned:
            for fn in g._closers:
                fn()
            g._closers = []
        for g in reversed(self._owned):
            g.release()
        self._owned = []

    def __repr__(self) -> str:
        return f"Mesh({self.shape}, coords={self.coords})"
