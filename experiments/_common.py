"""Pieces every experiment driver shares: torch.distributed on gloo beside MPI,
prefix sub-groups for sweeps over group sizes, and the rank-0 results table."""
from __future__ import annotations

import datetime
import os
import socket
import warnings

import torch
from mpi4py import MPI

from mpipar.mesh import Group, as_group


def init_gloo(group, timeout_s: float = 300) -> None:
    """torch.distributed over gloo on the ranks of `group`; rank 0 picks a free port, MPI broadcasts it.

    Works across nodes (rank 0's address is used when hosts differ).
    """
    import torch.distributed as dist

    g = as_group(group)
    hosts = g.comm.allgather(socket.gethostname())
    addr, port = "127.0.0.1", None
    if g.rank == 0:
        if len(set(hosts)) > 1:
            addr = socket.gethostbyname(hosts[0])
        with socket.socket() as s:
            s.bind(("" if len(set(hosts)) > 1 else addr, 0))
            port = s.getsockname()[1]
    addr, port = g.comm.bcast((addr, port), root=0)
    os.environ.update(MASTER_ADDR=addr, MASTER_PORT=str(port))
    dist.init_process_group("gloo", init_method="env://", rank=g.rank, world_size=g.size,
                            timeout=datetime.timedelta(seconds=timeout_s))
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")


def setup_threads(world, threads: int) -> int:
    """torch threads per rank: `threads`, or cores // ranks on this node when 0. Returns it."""
    from mpipar import device

    if not threads:
        threads = device.set_threads(device.ranks_on_node(world)[1])
    torch.set_num_threads(threads)
    return threads


def prefix_groups(world, sizes, name: str) -> dict:
    """{n: Group over world ranks 0..n-1 (None on the other ranks)} for each n in sizes."""
    groups = {}
    for n in sizes:
        comm = world.Split(0 if world.rank < n else MPI.UNDEFINED, world.rank)
        groups[n] = Group(comm, f"{name}{n}") if comm != MPI.COMM_NULL else None
    return groups


def print_table(rows: list[dict], cols: list[str], width: int = 14) -> None:
    """Fixed-width table of the given columns (floats in 4 significant digits)."""
    print(" ".join(f"{c:>{width}}" for c in cols))
    for r in rows:
        vals = [r.get(c, float("nan")) for c in cols]
        print(" ".join(f"{v:>{width}.4g}" if isinstance(v, float) else f"{str(v):>{width}}" for v in vals))


def write_results(out: str | None, name: str, rows: list[dict], units: dict, prov: dict) -> str:
    """Write /results/<name> (rows, units, provenance as root attributes) to `out`, by default
    results/<name>/<UTC stamp>.h5; print and return the path (rank 0's job)."""
    from mpipar import trace

    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = out or f"results/{name}/{stamp}.h5"
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    trace.write_table(out, name, rows, units, root_attrs=prov)
    print(f"wrote {out}")
    return out
