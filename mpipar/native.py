"""Compiled code built on first use into this user's private cache, and loaded only from there.

Three sources are built this way: the shared-memory kernels
(mpipar.comm.symmetric.compiled, a ctypes library), and two CPython extensions
(`extension`): the flight recorder's hot path (mpipar.flight.ring) and the
validated all-reduce in one call (mpipar.comm.agreement.fast). All are built with the C
compiler ($CC, else `cc`) into $MPIPAR_KERNEL_CACHE, else $XDG_CACHE_HOME/mpipar,
else ~/.cache/mpipar, under a name that hashes the source, the flags and
whatever else decides the binary (the CPU's feature flags, Python's ABI).

Loading a library runs its code (constructors, module init), so a library is
loaded from the cache only if this user owns it and its folder and nobody else
can write either; otherwise it is rebuilt in a private temporary folder (one
warning naming the refused path). Each process compiles to a temporary name and
renames it into place, so ranks that race all load a complete file.
"""
from __future__ import annotations

import hashlib
import os
import platform
import shutil
import stat
import subprocess
import tempfile
import warnings
from pathlib import Path

from .settings import current


def compiler() -> str | None:
    return shutil.which(current().cc or "cc")


def cpu_features() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return platform.machine() + platform.processor()


def cache_dir() -> Path:
    s = current()
    if s.kernel_cache:
        return Path(s.kernel_cache)
    base = s.xdg_cache_home or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "mpipar"


def cache_name(source: Path, stem: str, suffix: str, *decisive: str) -> str:
    """`stem-<hash>suffix`: the hash of the source and of everything in `decisive`."""
    key = hashlib.sha256(source.read_bytes() + " ".join(decisive).encode()).hexdigest()[:16]
    return f"{stem}-{key}{suffix}"


def untrusted(path: Path) -> str | None:
    """Why `path` (a folder or file of the cache) must not be loaded from, or None if only this user
    owns and can write it. A missing path is fine (it will be created by this user)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    if stat.S_ISLNK(st.st_mode):
        return f"{path} is a symbolic link"
    if st.st_uid != os.getuid():
        return f"{path} is owned by uid {st.st_uid}, not this user ({os.getuid()})"
    if st.st_mode & 0o022:
        return f"{path} can be written by others (mode {st.st_mode & 0o777:o})"
    return None


def build_and_load(source: Path, command: list[str], path: Path, load):
    """load(the library built from `source` at `path`): `command` + ["-o", OUT, source] builds it
    when `path` does not exist yet; a cache folder or file that is not this user's alone is
    refused (warning) and the build goes to a private folder, removed once loaded. Raises
    OSError or subprocess.SubprocessError when the build fails."""
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        why = untrusted(path.parent) or untrusted(path)
    except OSError as e:
        why = f"cannot create {path.parent}: {e}"
    if why:
        private = Path(tempfile.mkdtemp(prefix="mpipar-kernels-"))  # 0700, this user's
        warnings.warn(f"mpipar: kernel cache refused: {why}; building in {private}", RuntimeWarning, stacklevel=3)
        path = private / path.name
    if not path.exists():
        fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}-", suffix=path.suffix, dir=path.parent)
        os.close(fd)
        try:
            subprocess.run([*command, "-o", tmp, str(source)], check=True, capture_output=True, timeout=300)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    try:
        return load(path)
    finally:
        if why:
            shutil.rmtree(path.parent, ignore_errors=True)  # loaded: the mapping outlives the file


def extension(source: Path, module: str, stem: str, flags: tuple):
    """The CPython extension `module` (its PyInit_<module>) built from `source` with `flags`
    for this Python's ABI, or None without a compiler or Python's headers. Raises what
    build_and_load raises when the build fails."""
    import importlib.machinery
    import importlib.util
    import sysconfig

    cc = compiler()
    include = sysconfig.get_paths().get("include")
    if cc is None or not include or not os.path.exists(os.path.join(include, "Python.h")):
        return None
    abi = sysconfig.get_config_var("EXT_SUFFIX") or ".so"

    def load(path: Path):
        loader = importlib.machinery.ExtensionFileLoader(module, str(path))
        spec = importlib.util.spec_from_file_location(module, str(path), loader=loader)
        mod = importlib.util.module_from_spec(spec)
        loader.exec_module(mod)
        return mod

    path = cache_dir() / cache_name(source, stem, abi, cc, *flags, include, abi)
    return build_and_load(source, [cc, *flags, f"-I{include}"], path, load)
