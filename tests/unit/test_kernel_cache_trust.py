"""The compiled-kernel cache loads only a library this user owns in a folder only this user can write.

A library planted in the cache under the expected name (one whose constructor would create a
marker file when loaded) is refused with a warning naming the path when the folder is writable by
others or the file belongs to another user; the kernels are rebuilt privately and still work, and
the planted code never runs.
"""
from __future__ import annotations

import os
import subprocess
import warnings

import numpy as np
import pytest
import torch

from mpipar import settings
from mpipar.comm.symmetric import compiled as shm_compiled

pytestmark = pytest.mark.skipif(shm_compiled.compiler() is None, reason="no C compiler (cc or $CC)")

PLANT = '#include <stdio.h>\n__attribute__((constructor)) static void run(void) {{ fopen("{marker}", "w"); }}\n'


def plant(cache, tmp_path):
    marker = tmp_path / "PLANTED_CODE_RAN"
    src = tmp_path / "plant.c"
    src.write_text(PLANT.format(marker=marker))
    target = shm_compiled.cache_path(shm_compiled.compiler())
    assert target.parent == cache
    subprocess.run([shm_compiled.compiler(), "-shared", "-fPIC", "-o", str(target), str(src)], check=True)
    return target, marker


def fresh_library(monkeypatch):
    monkeypatch.setattr(shm_compiled, "_loaded", {})
    return shm_compiled.library()


def works(lib):
    own, peer = np.arange(5, dtype=np.float32), np.ones(5, dtype=np.float32)
    fn = shm_compiled.bind(shm_compiled.kernel(torch.float32, "sum"), own, [peer])
    fn()
    return np.array_equal(own, np.arange(5, dtype=np.float32) + 1) and lib is not None


@pytest.mark.parametrize("how", ["folder writable by others", "file of another user"])
def test_planted_library_is_refused_and_never_runs(how, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o700)
    monkeypatch.setattr(shm_compiled, "cache_dir", lambda: cache)
    target, marker = plant(cache, tmp_path)
    if how == "folder writable by others":
        cache.chmod(0o777)
        expected = "can be written by others"
    else:
        if os.geteuid() != 0:
            pytest.skip("chown to another user needs root")
        os.chown(target, 65534, 65534)
        expected = "owned by uid 65534"
    with pytest.warns(RuntimeWarning, match=f"kernel cache refused: .*{expected}"):
        lib = fresh_library(monkeypatch)
    assert not marker.exists(), "the planted library was loaded"
    assert works(lib)


def test_own_private_cache_is_used(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    with warnings.catch_warnings(), settings.override(kernel_cache=str(cache)):  # through the settings
        warnings.simplefilter("error")
        lib = fresh_library(monkeypatch)
        path = shm_compiled.cache_path(shm_compiled.compiler())
    assert path.parent == cache and path.exists()
    assert shm_compiled.untrusted(path) is None and shm_compiled.untrusted(cache) is None
    assert cache.stat().st_mode & 0o077 == 0 and works(lib)


def _ring():
    from mpipar.flight import ring

    return ring.load()


def _fast():
    from mpipar import native
    from mpipar.comm.agreement import fast

    return native.extension(fast.SOURCE, fast.MODULE, "agreement_fast", fast.FLAGS)


@pytest.mark.parametrize("load,stem,entry", [(_ring, "flight_ring", "state"), (_fast, "agreement_fast", "context")],
                         ids=["flight ring", "fast all-reduce"])
def test_planted_extension_is_refused_and_never_runs(tmp_path, monkeypatch, load, stem, entry):
    """The C extensions (the flight recorder's ring, mpipar.flight.ring; the all-reduce in one
    call, mpipar.comm.agreement.fast) come from the same cache under the same rule: a library
    planted under their name in a folder others can write never loads."""
    import sysconfig

    from mpipar import native

    if not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")):
        pytest.skip("no Python.h: no C extension")
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o700)
    monkeypatch.setattr(native, "cache_dir", lambda: cache)
    assert load() is not None  # builds into the private cache
    (built,) = cache.glob(f"{stem}-*")
    marker = tmp_path / "PLANTED_CODE_RAN"
    src = tmp_path / "plant.c"
    src.write_text(PLANT.format(marker=marker))
    built.unlink()
    subprocess.run([shm_compiled.compiler(), "-shared", "-fPIC", "-o", str(built), str(src)], check=True)
    cache.chmod(0o777)
    with pytest.warns(RuntimeWarning, match="kernel cache refused: .*can be written by others"):
        module = load()
    assert not marker.exists(), "the planted library was loaded"
    assert module is not None and hasattr(module, entry)  # rebuilt privately
