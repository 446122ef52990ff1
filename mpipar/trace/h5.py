"""HDF5 files of mpipar: provenance attributes and crash-safe (atomic) updates.

Every file mpipar writes carries the root attributes of `provenance()`
(mpipar_version, git_commit, mpi_library, world_size, mesh, torch_version,
hostnames, created_utc, command, plus python_version and git_dirty).

Crash safety: `atomic_h5(path)` opens a *copy* of the file (or a new file),
lets the caller change it, then fsyncs it and `os.replace`s it over `path`.
A process killed at any instant leaves either the old file or the new one,
never a half-written one. The schema is documented in results/README.md.
"""
from __future__ import annotations

import contextlib
import datetime
import glob
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys

import numpy as np

PROVENANCE_KEYS = ("mpipar_version", "git_commit", "mpi_library", "world_size", "mesh",
                   "torch_version", "hostnames", "created_utc", "command")


def utc_now() -> str:
    """Current UTC time, ISO 8601 with an explicit +00:00 offset."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _git(*args: str) -> str | None:
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        out = subprocess.run(["git", "-C", repo, *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _mesh_dims(obj, size: int) -> dict:
    shape = getattr(obj, "shape", None)
    if isinstance(shape, dict):
        return {k: int(v) for k, v in shape.items()}
    return {"tp": 1, "sp": 1, "dp": size, "pp": 1}  # a bare group: all ranks as data parallel


def local_provenance() -> dict:
    """The per-process part of the provenance (git, versions, command); no communication."""
    import torch
    from mpi4py import MPI

    from .. import __version__

    commit = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {
        "mpipar_version": __version__,
        "git_commit": commit or "unknown",
        "git_dirty": bool(status) if status is not None else False,
        "mpi_library": MPI.Get_library_version().strip().strip("\x00").strip(),
        "torch_version": str(torch.__version__),
        "python_version": sys.version.split()[0],
        "created_utc": utc_now(),
        "command": shlex.join(sys.argv),
    }


def provenance(mesh_or_group) -> dict:
    """Collective over the mesh's world (or the group): the root attributes of a results file.

    Returns the same dict on every rank: rank 0's git commit, versions and
    command, the world size, the mesh dims as JSON and every rank's hostname
    (a JSON list indexed by rank).
    """
    from ..flight.recorder import recorded
    from ..mesh import as_group

    g = as_group(mesh_or_group)
    info = local_provenance() if g.rank == 0 else None
    info = recorded(g, "provenance", g.comm.bcast, info, root=0)
    hosts = recorded(g, "provenance", g.comm.allgather, socket.gethostname())
    info.update(world_size=int(g.size), hostnames=json.dumps(hosts),
                mesh=json.dumps(_mesh_dims(mesh_or_group, g.size)))
    return {k: info[k] for k in (*PROVENANCE_KEYS, "git_dirty", "python_version")}


def attr_value(value):
    """A value h5py can store as an attribute: scalars and strings as is, the rest as JSON."""
    if isinstance(value, str):
        return str(value)  # plain str: h5py cannot store str subclasses (torch.__version__)
    if isinstance(value, (bool, int, float, np.integer, np.floating, np.bool_)):
        return value
    if isinstance(value, np.ndarray) and value.dtype.kind in "biuf":
        return value
    return json.dumps(value, default=str)


def set_attrs(obj, attrs: dict | None, overwrite: bool = True) -> None:
    """Write `attrs` on an h5py object (JSON-encoding dicts, lists and None)."""
    for key, value in (attrs or {}).items():
        if overwrite or key not in obj.attrs:
            obj.attrs[key] = attr_value(value)


def _tmp_pattern(path: str) -> str:
    d, base = os.path.split(os.path.abspath(path))
    return os.path.join(d, f".{base}.{socket.gethostname()}.*.tmp")


def _tmp_path(path: str) -> str:
    return _tmp_pattern(path).replace("*", str(os.getpid()))


def remove_stale_temps(path: str) -> None:
    """Delete temp files of `path` left by killed writers on this host (pid no longer alive)."""
    for tmp in glob.glob(_tmp_pattern(path)):
        try:
            pid = int(tmp.rsplit(".", 2)[-2])
            os.kill(pid, 0)
        except ProcessLookupError:
            with contextlib.suppress(OSError):
                os.remove(tmp)
        except (ValueError, PermissionError):
            continue


def _fsync_dir(path: str) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(os.path.dirname(os.path.abspath(path)) or ".", os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_h5(path: str, durable: bool = True):
    """Yield an h5py.File ("a" mode) whose changes land on `path` atomically on exit.

    The existing file (if any) is copied to a temp file next to it; on a clean
    exit the temp file is closed, fsynced (durable=True) and renamed over
    `path`. On an exception the temp file is removed and `path` is untouched.
    One writer per file: concurrent writers would lose each other's updates.
    """
    import h5py

    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = _tmp_path(path)
    try:
        if os.path.exists(path):
            shutil.copyfile(path, tmp)
        with h5py.File(tmp, "a", track_order=True) as f:
            yield f
        if durable:
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
        if durable:
            _fsync_dir(path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
