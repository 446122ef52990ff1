"""Jobs that never hang, proven with real `mpiexec` jobs (2-3 ranks) bounded by a timeout.

- An exception in the main thread, or in a worker thread, of one rank of a user's
  script that only builds a Mesh ends the whole job non-zero (MPIPAR_TIMEOUT=0:
  the hooks alone, no watchdog).
- A rank asleep while the others wait (MPIPAR_TIMEOUT=3) in an all-reduce, a
  recv, a shared-memory all-reduce, a pipeline step, ring attention's and
  Ulysses' backward: the watchdog names the rank and the call, every rank writes its
  flight record, and the verdict (`python -m mpipar.flight DIR`) names the
  sleeping rank and what it did last.
- kill -9 of one rank mid-loop ends the job.
- SIGUSR2 writes a live record and the job goes on.
All jobs start together (module fixture) to keep the wall time down.
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

from mpipar.flight.verdict import analyse, load

MPIEXEC = Path(sys.executable).parent / "mpiexec"
REPO = Path(__file__).resolve().parents[2]
LIMIT = 120  # seconds per job: a hang (the failure these tests look for) is killed here

HEAD = r'''
import sys, threading, time
import torch
import mpipar
from mpipar import comm
'''

RAISE_MAIN = HEAD + r'''
m = mpipar.Mesh()
comm.all_reduce(torch.ones(4), m.world)
if m.world.rank == 1:
    raise RuntimeError("boom in the main thread of rank 1")
comm.all_reduce(torch.ones(4), m.world)  # the others wait here unless the job aborts
print(f"UNREACHABLE rank {m.world.rank}", flush=True)
'''

RAISE_THREAD = HEAD + r'''
def work():
    raise RuntimeError("boom in a worker thread of rank 1")

m = mpipar.Mesh()
comm.all_reduce(torch.ones(4), m.world)
if m.world.rank == 1:
    threading.Thread(target=work, name="loader").start()
    time.sleep(120)  # the main thread goes on with something else
comm.all_reduce(torch.ones(4), m.world)
print(f"UNREACHABLE rank {m.world.rank}", flush=True)
'''

HANG_ALL_REDUCE = HEAD + r'''
m = mpipar.Mesh()
for _ in range(3):
    comm.all_reduce(torch.ones(1024), m.world)
if m.world.rank == 1:
    time.sleep(120)
comm.all_reduce(torch.ones(1024), m.world)
print(f"UNREACHABLE rank {m.world.rank}", flush=True)
'''

HANG_RECV = HEAD + r'''
m = mpipar.Mesh()
comm.all_reduce(torch.ones(4), m.world)
if m.world.rank == 1:
    time.sleep(120)
    comm.send(torch.ones(8), 0, m.world)
else:
    comm.recv(torch.empty(8), 1, m.world)
print(f"UNREACHABLE rank {m.world.rank}", flush=True)
'''

HANG_SHM = HEAD + r'''
m = mpipar.Mesh()
x = comm.symmetric_empty((1 << 18,), torch.float32, m.world)
x.fill_(1.0)
comm.all_reduce(x, m.world)
if m.world.rank == 1:
    time.sleep(120)
comm.all_reduce(x, m.world)
print(f"UNREACHABLE rank {m.world.rank}", flush=True)
'''

HANG_PIPELINE = HEAD + r'''
from torch import nn
from mpipar.pipeline import PipelineRunner

class Stage(nn.Module):
    def __init__(self, sleepy):
        super().__init__()
        self.lin, self.sleepy, self.calls = nn.Linear(8, 8), sleepy, 0

    def forward(self, x):
        self.calls += 1
        if self.sleepy and self.calls > 2:  # the second step's first microbatch
            time.sleep(120)
        return self.lin(x)

m = mpipar.Mesh(pp=2)
torch.manual_seed(0)
runner = PipelineRunner(Stage(m.pp.rank == 1), m.pp.comm, schedule="1f1b", num_microbatches=2,
                        loss_fn=nn.functional.mse_loss)
x, y = torch.randn(4, 8), torch.randn(4, 8)
runner.step(x, y)
runner.step(x, y)
print(f"UNREACHABLE rank {m.world.rank}", flush=True)
'''

HANG_RING = HEAD + r'''
from mpipar.sequence import ring_attention

m = mpipar.Mesh(sp=2)
torch.manual_seed(m.sp.rank)
q, k, v = (torch.randn(1, 2, 8, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
out = ring_attention(q, k, v, m.sp)
if m.sp.rank == 1:
    time.sleep(120)
out.sum().backward()
print(f"UNREACHABLE rank {m.world.rank}", flush=True)
'''

HANG_ULYSSES = HEAD + r'''
from mpipar.sequence import ulysses_attention

m = mpipar.Mesh(sp=2)
torch.manual_seed(m.sp.rank)
q, k, v = (torch.randn(1, 2, 8, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
out = ulysses_attention(q, k, v, m.sp)
if m.sp.rank == 1:
    time.sleep(120)
out.sum().backward()
print(f"UNREACHABLE rank {m.world.rank}", flush=True)
'''

KILLED = HEAD + r'''
import os, signal

m = mpipar.Mesh()
for i in range(1000000):
    comm.all_reduce(torch.ones(1024), m.world)
    if i == 100 and m.world.rank == 1:
        os.kill(os.getpid(), signal.SIGKILL)  # kill -9 mid-loop: no hook, no record
print(f"UNREACHABLE rank {m.world.rank}", flush=True)
'''

LIVE_LOOK = HEAD + r'''
import os, signal

m = mpipar.Mesh()
for i in range(200):
    comm.all_reduce(torch.ones(16), m.world)
    if i == 100 and m.world.rank == 0:
        os.kill(os.getpid(), signal.SIGUSR2)  # what `kill -USR2 <pid>` does from outside
time.sleep(1.0)  # the watchdog thread writes the record
print(f"DONE rank {m.world.rank}", flush=True)
'''

SUB_MESH_FIRST = HEAD + r'''
from mpi4py import MPI

w = MPI.COMM_WORLD
sub = w.Split(0 if w.rank < 2 else MPI.UNDEFINED, w.rank)
if w.rank < 2:
    mpipar.Mesh(comm=sub)  # ranks 0-1 build a mesh first; rank 2 none
m = mpipar.Mesh()  # every rank: the job must go on, whatever each built before
comm.all_reduce(torch.ones(4), m.world)
print(f"DONE rank {m.world.rank}", flush=True)
'''

# name -> (ranks, script, MPIPAR_TIMEOUT[, MPIPAR_ABORT_ON_ERROR])
JOBS = {
    "raise_main": (2, RAISE_MAIN, "0"),
    "raise_main_opt_out": (2, RAISE_MAIN, "3", "0"),
    "raise_thread": (3, RAISE_THREAD, "0"),
    "hang_all_reduce": (3, HANG_ALL_REDUCE, "5"),
    "hang_all_reduce_2": (2, HANG_ALL_REDUCE, "5"),  # ranks with their own cores: the C call (agreement/fast.c)
    "hang_recv": (2, HANG_RECV, "5"),
    "hang_shm": (2, HANG_SHM, "5"),
    "hang_pipeline": (2, HANG_PIPELINE, "5"),
    "hang_ring": (2, HANG_RING, "5"),
    "hang_ulysses": (2, HANG_ULYSSES, "5"),
    "killed": (3, KILLED, "5"),
    "live_look": (2, LIVE_LOOK, "3"),
    "sub_mesh_first": (3, SUB_MESH_FIRST, "20"),
}


def job_env(flight_dir: Path, timeout: str, abort_on_error: str = "1") -> dict:
    """The caller's environment without MPI launcher variables (we may run under one), with
    this checkout first on the path."""
    env = launcher_free_env()
    env.update(MPIPAR_TIMEOUT=timeout, MPIPAR_FLIGHT_DIR=str(flight_dir), MPIPAR_THREADS="1",
               MPIPAR_ABORT_ON_ERROR=abort_on_error,
               PYTHONPATH=os.pathsep.join([str(REPO)] + [p for p in [env.get("PYTHONPATH")] if p]))
    return env


class Job:
    def __init__(self, name, tmp: Path):
        n, script, *settings = JOBS[name]
        path = tmp / f"{name}.py"
        path.write_text(script)
        self.name, self.flight = name, tmp / f"{name}-flight"
        self.n, self.start = n, time.monotonic()
        self.proc = subprocess.Popen([str(MPIEXEC), "-n", str(n), sys.executable, str(path)], cwd=tmp,
                                     env=job_env(self.flight, *settings), stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self._result = None

    def result(self):
        """(returncode, output, seconds); returncode None if it ran past LIMIT (then killed)."""
        if self._result is None:
            self._result = finish_job(self.proc, self.start, LIMIT)
        return self._result


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    if not MPIEXEC.exists():
        pytest.skip(f"no mpiexec next to {sys.executable}")
    tmp = tmp_path_factory.mktemp("flight_jobs")
    started = {name: Job(name, tmp) for name in JOBS}
    yield started
    for job in started.values():
        job.result()


def ended_non_zero(job):
    rc, out, secs = job.result()
    print(f"{job.name}: exit {rc} after {secs:.1f} s (all jobs started together)")
    assert rc is not None, f"job hung (killed after {LIMIT} s):\n{out[-3000:]}"
    assert rc != 0, out
    assert "UNREACHABLE" not in out, out
    return out


@pytest.mark.parametrize("name,where", [("raise_main", "the main thread"), ("raise_thread", "a worker thread")])
def test_an_exception_on_one_rank_ends_the_job(jobs, name, where):
    out = ended_non_zero(jobs[name])
    assert f"boom in {where} of rank 1" in out, out
    assert "mpipar watchdog" not in out, out  # the hook ended it (MPIPAR_TIMEOUT=0)
    records = load(str(jobs[name].flight))
    assert records[1]["reason"] == "exception" and "RuntimeError" in records[1]["message"], records.get(1)
    verdict = analyse(records)
    assert verdict.failed == [1] and "verdict: rank 1 failed (unhandled RuntimeError in" in str(verdict), str(verdict)


def test_kill_9_of_one_rank_mid_loop_ends_the_job(jobs):
    """The launcher (or, where it does not, the others' watchdogs) ends the job."""
    ended_non_zero(jobs["killed"])


def test_meshes_on_sub_communicators_before_the_world_mesh(jobs):
    """Building a Mesh is collective over its communicator only: ranks that built different
    meshes before (a sweep over sub-groups) still build the world mesh together."""
    rc, out, secs = jobs["sub_mesh_first"].result()
    assert rc == 0 and all(f"DONE rank {r}" in out for r in range(3)), out


def test_sigusr2_writes_a_live_record_and_the_job_goes_on(jobs):
    rc, out, secs = jobs["live_look"].result()
    assert rc == 0 and "DONE rank 0" in out and "DONE rank 1" in out, out
    records = load(str(jobs["live_look"].flight))
    assert list(records) == [0] and records[0]["reason"] == "signal", records
    calls = records[0]["calls"]
    assert calls[-1]["op"] == "all_reduce" and 101 <= calls[-1]["seq"] <= 200 and calls[-1]["shape"] == [16], calls[-1]


def test_abort_on_error_opt_out_leaves_the_hang_to_the_watchdog(jobs):
    """MPIPAR_ABORT_ON_ERROR=0: Python's own hook; rank 0 waits until its watchdog (3 s) ends the job."""
    out = ended_non_zero(jobs["raise_main_opt_out"])
    assert "boom in the main thread of rank 1" in out, out
    assert re.search(r"^mpipar watchdog: rank 0 waited [\d.]+ s in all_reduce #2 on group \[0, 1\]", out, re.M), out
    assert load(str(jobs["raise_main_opt_out"].flight))[0]["reason"] == "watchdog"


# name -> (the watchdog's op, the sleeping rank, the verdict's kind of finding)
HANGS = {
    "hang_all_reduce": ("all_reduce", 1, "hang"),
    "hang_all_reduce_2": ("all_reduce", 1, "hang"),
    "hang_recv": ("recv", 1, "p2p"),
    "hang_shm": ("all_reduce", 1, "hang"),
    "hang_pipeline": ("pipeline recv", 1, "p2p"),
    "hang_ring": ("ring attention", 1, "p2p"),
    "hang_ulysses": ("all_to_all", 1, "hang"),
}


@pytest.mark.parametrize("name", list(HANGS))
def test_a_sleeping_rank_is_named_by_the_watchdog_and_the_verdict(jobs, name):
    op, sleeper, kind = HANGS[name]
    job = jobs[name]
    out = ended_non_zero(job)
    lines = re.findall(r"^mpipar watchdog: rank (\d+) waited ([\d.]+) s in (.+?) #(\d+) on group \[([\d, ]+)\]",
                       out, flags=re.M)
    assert lines, out
    for rank, waited, call, seq, group in lines:
        assert int(rank) != sleeper and call == op and float(waited) >= 3.0, out
        assert str(sleeper) in group.split(", ") or kind == "p2p", out
    records = load(str(job.flight))
    assert sorted(records) == list(range(job.n)), (sorted(records), out)  # the sleeper's too (SIGUSR2)
    assert records[sleeper]["reason"] == "signal"
    verdict = analyse(records)
    found = [f for f in verdict.findings if f.kind == kind and f.op == op]
    assert found and all(sleeper in f.missing for f in found), str(verdict)
    assert int(lines[0][0]) in found[0].waiting, str(verdict)


def test_the_command_line_verdict_names_the_missing_rank_and_its_last_call(jobs):
    job = jobs["hang_all_reduce"]
    ended_non_zero(job)
    run = subprocess.run([sys.executable, "-m", "mpipar.flight", str(job.flight)], capture_output=True, text=True,
                         env=job_env(job.flight, "0"), timeout=60)
    assert run.returncode == 1, run.stdout + run.stderr
    text = run.stdout
    assert "verdict: all_reduce #4 on group world [0, 1, 2]: ranks [0, 2] waited" in text, text
    assert "ranks [1] never arrived" in text, text
    assert "rank 1 never arrived (its last call on this group: #3); its last call: all_reduce #3" in text, text
