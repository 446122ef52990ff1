"""A study driver signalled mid-sweep (a real `mpiexec -n 2` job, bounded by a timeout).

experiments/collectives.py traps SIGTERM and SIGUSR1 (mpipar.models.preempt.trap) before
its Mesh, so once its results file exists both ranks have the trap. The signal goes to
mpiexec, which forwards it to the ranks, as soon as that file appears (before the first
size is measured): the size in hand is measured and stored, then every rank stops at the
same point and exits 128 + signal. A rerun with the same --out finishes the sweep and
repeats no point. The other drivers (tensor_parallel, pipeline, sequence_parallel, zero)
call the same two functions (`trap`, then `check` or `agreed` between points).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import pytest
from conftest import finish_job, launcher_free_env

MPIEXEC = Path(sys.executable).parent / "mpiexec"
REPO = Path(__file__).resolve().parents[2]
SIZES = ["4K", "16K", "64K"]
IMPLS = ["mpi", "ring"]
LIMIT = 120  # seconds per job

pytestmark = pytest.mark.skipif(not MPIEXEC.exists(), reason=f"no mpiexec next to {sys.executable}")


def start(out: Path) -> subprocess.Popen:
    env = launcher_free_env()
    env.update(MPIPAR_THREADS="1", PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join([str(REPO)] + [p for p in [env.get("PYTHONPATH")] if p]))
    cmd = [str(MPIEXEC), "-n", "2", sys.executable, str(REPO / "experiments" / "collectives.py"), "--quick",
           "--ops", "all_reduce", "--impls", ",".join(IMPLS), "--sizes", ",".join(SIZES), "--rounds", "3",
           "--out", str(out)]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def stored(out: Path) -> list[tuple[int, str]]:
    """(nbytes, impl) of each stored row, in the order written."""
    with h5py.File(out, "r") as f:
        g = f["results/collectives"]
        return list(zip(g["nbytes"][()].tolist(), g["impl"].asstr()[()].tolist()))


@pytest.mark.timeout(2 * LIMIT + 30)
@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM], ids=["SIGUSR1", "SIGTERM"])
def test_a_signalled_sweep_stores_the_size_in_hand_and_exits_128_plus_signal(tmp_path, sig):
    out = tmp_path / "sweep.h5"
    t0 = time.monotonic()
    proc = start(out)
    while not out.exists():
        assert proc.poll() is None and time.monotonic() - t0 < LIMIT, proc.communicate()[0][-3000:]
        time.sleep(0.02)
    proc.send_signal(sig)  # to mpiexec, which forwards it to both ranks
    rc, text, _ = finish_job(proc, t0, LIMIT)
    assert rc == 128 + sig, f"exit {rc}:\n{text[-3000:]}"
    assert f"collectives: signal {int(sig)}: stopped" in text, text[-3000:]
    first = stored(out)
    assert len(first) == len(IMPLS) and {n for n, _ in first} == {4096}, first  # the first size, whole
    assert sorted(impl for _, impl in first) == sorted(IMPLS)

    t0 = time.monotonic()
    rc, text, _ = finish_job(start(out), t0, LIMIT)  # the same --out: the rest of the sweep
    assert rc == 0, text[-3000:]
    rows = stored(out)
    assert rows[:len(first)] == first, "the rerun rewrote stored points"
    assert sorted(rows) == sorted((n, impl) for n in (4096, 16384, 65536) for impl in IMPLS), rows
