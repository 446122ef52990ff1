"""Whole-job failure behaviour, proven with real `mpiexec` runs bounded by a timeout.

- Bad input (a world size that does not fit the mesh, a tensor whose shape or
  dtype differs across ranks, an unknown op or algorithm on one rank only):
  every rank prints the same MpiparError, and a job that leaves it unhandled exits
  (non-zero) instead of hanging.
- An unhandled exception on one rank while the others wait in a collective
  aborts the whole job with a non-zero exit, under `python -m mpi4py` and with
  mpipar.flight.abort.install_abort_on_exception().
All jobs start together (module fixture) to keep the wall time down; mpiexec is
the one next to sys.executable (the venv's).
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import finish_job, launcher_free_env

MPIEXEC = Path(sys.executable).parent / "mpiexec"
REPO = Path(__file__).resolve().parents[2]
TIMEOUT = 240  # seconds per job: generous for a loaded 2-core machine; a hang still fails

BAD_INPUT = r'''
import sys
import torch
from mpi4py import MPI
import mpipar
from mpipar import MpiparError, comm

w = MPI.COMM_WORLD
n, r = w.size, w.rank
odd = r == n - 1  # the last rank disagrees
log = open(f"{sys.argv[1]}.rank{r}", "w", buffering=1)  # one file per rank: no interleaving


def case(name, call):
    try:
        call()
    except MpiparError as exc:
        log.write(f"CASE {name} rank {r}: MpiparError: {exc}\n")
    else:
        log.write(f"CASE {name} rank {r}: no error\n")


case("mesh_not_divisible", lambda: mpipar.Mesh(tp=2, pp=2, comm=w))
case("mesh_dp_mismatch", lambda: mpipar.Mesh(tp=1, dp=n + 1, comm=w))
case("shape", lambda: comm.all_reduce(torch.zeros(3 + odd), w))
case("dtype", lambda: comm.all_gather(torch.zeros(3, dtype=torch.float64 if odd else torch.float32), w))
case("op", lambda: comm.all_reduce(torch.zeros(3), w, op="avg" if odd else "sum"))
case("algorithm", lambda: comm.reduce_scatter(torch.zeros(3), w, algorithm="tree" if odd else "ring"))
x = comm.all_reduce(torch.ones(2), w)
log.write(f"DONE rank {r} {x.tolist()}\n")
log.close()
mpipar.Mesh(tp=n + 1, comm=w)  # unhandled on every rank: the job must exit, not hang
print(f"UNREACHABLE rank {r}", flush=True)
'''

ONE_RANK_RAISES = r'''
import sys
import torch
from mpi4py import MPI
import mpipar
from mpipar import comm

if "--hook" in sys.argv:
    from mpipar.flight.abort import install_abort_on_exception
    install_abort_on_exception()
w = MPI.COMM_WORLD
comm.all_reduce(torch.ones(4), w)  # everybody is up
if w.rank == 1:
    raise RuntimeError("boom on rank 1")
comm.all_reduce(torch.ones(4), w)  # the others wait here forever unless the job aborts
print(f"UNREACHABLE rank {w.rank}", flush=True)
'''

# name -> (ranks, script, python args before the script, script args)
JOBS = {
    "bad_input_2": (2, BAD_INPUT, [], ["{log}"]),
    "bad_input_3": (3, BAD_INPUT, [], ["{log}"]),
    "abort_mpi4py": (2, ONE_RANK_RAISES, ["-m", "mpi4py"], []),
    "abort_hook": (3, ONE_RANK_RAISES, [], ["--hook"]),
}


class Job:
    def __init__(self, name, tmp: Path):
        n, script, pre, post = JOBS[name]
        path = tmp / f"{name}.py"
        path.write_text(script)
        self.log = tmp / name
        post = [a.format(log=self.log) for a in post]
        cmd = [str(MPIEXEC), "-n", str(n), sys.executable, *pre, str(path), *post]
        self.n, self.start = n, time.monotonic()
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=launcher_free_env(), stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self._result = None

    def rank_logs(self) -> str:
        """What the ranks wrote to their own log files, concatenated in rank order."""
        return "".join(p.read_text() for p in sorted(self.log.parent.glob(self.log.name + ".rank*")))

    def result(self):
        """(returncode, output, seconds); returncode None if it ran past TIMEOUT (then killed)."""
        if self._result is None:
            self._result = finish_job(self.proc, self.start, TIMEOUT)
        return self._result


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    if not MPIEXEC.exists():
        pytest.skip(f"no mpiexec next to {sys.executable}")
    tmp = tmp_path_factory.mktemp("failure_jobs")
    started = {name: Job(name, tmp) for name in JOBS}
    yield started
    for job in started.values():
        job.result()


@pytest.mark.parametrize("name", ["bad_input_2", "bad_input_3"])
def test_bad_input_same_error_on_every_rank(jobs, name):
    rc, out, secs = jobs[name].result()
    n = jobs[name].n
    assert rc is not None, f"job hung (killed after {TIMEOUT} s):\n{out[-3000:]}"
    logs = jobs[name].rank_logs()
    lines = re.findall(r"^CASE (\w+) rank (\d+): (.*)$", logs, flags=re.M)
    by_case = {}
    for case, rank, msg in lines:
        by_case.setdefault(case, {})[int(rank)] = msg
    assert set(by_case) == {"mesh_not_divisible", "mesh_dp_mismatch", "shape", "dtype", "op", "algorithm"}, logs
    for case, msgs in by_case.items():
        assert sorted(msgs) == list(range(n)), (case, msgs)
        assert len(set(msgs.values())) == 1, (case, msgs)
        assert next(iter(msgs.values())).startswith("MpiparError: "), (case, msgs)
    # every rank went on working after the errors, then the unhandled one ended the job
    for r in range(n):
        assert f"DONE rank {r} [{float(n)}, {float(n)}]" in logs, logs
    assert "UNREACHABLE" not in out
    assert rc != 0, out
    assert out.count("mpipar.errors.MpiparError: Mesh:") >= 1, out


@pytest.mark.parametrize("name", ["abort_mpi4py", "abort_hook"])
def test_unhandled_exception_on_one_rank_aborts_the_job(jobs, name):
    rc, out, secs = jobs[name].result()
    assert rc is not None, f"job hung (killed after {TIMEOUT} s):\n{out[-3000:]}"
    assert rc != 0, out
    assert "boom on rank 1" in out, out
    assert "UNREACHABLE" not in out, out


def test_abort_hook_unlinks_only_the_shared_memory_files_this_process_maps(tmp_path):
    """MPICH leaves its /dev/shm files behind after MPI_Abort; the hook unlinks the ones this
    process maps (mpipar.flight.abort.unlink_mapped_shm) before aborting, and no others."""
    import mmap

    from mpipar.flight.abort import unlink_mapped_shm

    base = Path("/dev/shm") if Path("/dev/shm").is_dir() else tmp_path
    prefix = str(base / f"mpipar_test_{os.getpid()}_")
    mapped, other = Path(prefix + "mapped"), Path(prefix + "not_mapped")
    for p in (mapped, other):
        p.write_bytes(b"\0" * 4096)
    try:
        with open(mapped, "r+b") as f, mmap.mmap(f.fileno(), 4096) as m:
            assert unlink_mapped_shm(prefix) == [str(mapped)]
            assert not mapped.exists() and other.exists()
            m[:4] = b"live"  # the mapping outlives the name, as MPI's does until the abort
            assert m[:4] == b"live"
        assert unlink_mapped_shm(prefix) == []
    finally:
        for p in (mapped, other):
            p.unlink(missing_ok=True)
