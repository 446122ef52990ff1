"""Real scheduler runs: the jobs/ scripts submitted with sbatch and qsub to a local SLURM cluster.

Starts the single-node cluster of ../shared/tools/local-slurm.sh (root only),
submits jobs/slurm/study_srun.sbatch and jobs/slurm/study_mpiexec.sbatch with
`sbatch` and jobs/pbs/study.pbs with `qsub` (SLURM's Torque wrappers), each a
tiny study (the collectives driver, --quick, 2 ranks), waits for them, checks
the HDF5 they wrote (provenance attributes, a results table of 2 ranks, read
by h5py, pandas and `h5dump -H`) and stops the cluster. Preemption: a train_gpt job
(sbatch) and a collectives sweep (qsub, the PBS script) signalled with SIGUSR1 mid-run
requeue themselves and resume. Run by `make test-jobs`.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import h5py
import pytest

ROOT = Path(__file__).resolve().parents[2]
SLURM = (ROOT / ".." / "shared" / "tools" / "local-slurm.sh").resolve()
DRIVER = ROOT / "experiments" / "collectives.py"
RANKS = 2
STUDY_ARGS = "--only collectives --quick --silent"

pytestmark = [
    pytest.mark.jobs,
    pytest.mark.skipif(os.geteuid() != 0, reason="the local SLURM cluster needs root"),
    pytest.mark.skipif(not SLURM.is_file(), reason=f"{SLURM} is missing"),
    pytest.mark.skipif(not (ROOT / ".venv" / "bin" / "activate").exists(), reason="needs .venv (make install)"),
    pytest.mark.skipif(not DRIVER.exists(), reason="experiments/collectives.py does not exist yet"),
]


def _slurm(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SLURM), *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def cluster():
    """The local SLURM cluster, up for this module's tests, always stopped afterwards."""
    if _slurm("install").returncode != 0:
        pytest.skip("could not install slurm-wlm/munge/slurm-wlm-torque (apt-get failed)")
    up = _slurm("up")
    try:
        assert up.returncode == 0, f"local-slurm.sh up failed:\n{up.stdout}\n{up.stderr}"
        yield
    finally:
        _slurm("down", timeout=120)


def _submit(kind: str, results: Path, log: Path) -> str:
    """Submit one job script with 2 ranks and no GPU; returns the job id.

    The settings travel in the environment (`--export=ALL` / `qsub -V`): SLURM's
    qsub wrapper cannot pass a `-v` value containing spaces.
    """
    env = {**os.environ, "MPIPAR_RESULTS": str(results), "MPIPAR_STUDY": "jobs-test", "MPIPAR_STUDY_ARGS": STUDY_ARGS}
    if kind == "pbs":
        cmd = ["qsub", "-V", "-l", f"select=1:ncpus={RANKS}:mpiprocs={RANKS}", "-o", str(log), "-j", "oe",
               "jobs/pbs/study.pbs"]
    else:
        script = {"srun": "jobs/slurm/study_srun.sbatch", "mpiexec": "jobs/slurm/study_mpiexec.sbatch"}[kind]
        cmd = ["sbatch", "--parsable", "--nodes=1", f"--ntasks-per-node={RANKS}", "--gpus-per-node=0",
               "--cpus-per-task=1", "-o", str(log), "--export=ALL", script]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=60, env=env)
    assert res.returncode == 0, f"{cmd} failed:\n{res.stdout}\n{res.stderr}"
    return res.stdout.strip().split(";")[0].split(".")[0]


def _check_results(results: Path) -> None:
    """The study folder the job wrote: a complete manifest and a readable, documented HDF5 file."""
    from mpipar.analysis import load
    from mpipar.trace import PROVENANCE_KEYS

    (folder,) = list((results / "jobs-test").iterdir())
    manifest = json.loads((folder / "study.json").read_text())
    assert manifest["np"] == RANKS
    assert manifest["drivers"]["collectives"]["status"] == "ok", manifest
    h5 = folder / manifest["drivers"]["collectives"]["out"]
    with h5py.File(h5, "r") as f:
        missing = [k for k in PROVENANCE_KEYS if k not in f.attrs]
        assert not missing, f"provenance attributes missing: {missing}"
        assert int(f.attrs["world_size"]) == RANKS
        assert len(f["results"]) >= 1
    tables = load([h5])
    assert tables and all(len(df) > 0 for df in tables.values())
    assert (folder / "summary.csv").exists()
    if shutil.which("h5dump"):
        dump = subprocess.run(["h5dump", "-H", str(h5)], capture_output=True, text=True, timeout=60)
        assert dump.returncode == 0, dump.stderr


@pytest.mark.timeout(1500)
def test_sbatch_and_qsub_jobs_complete_and_write_hdf5(cluster, tmp_path):
    jobs = {}
    for kind in ("srun", "mpiexec", "pbs"):
        results, log = tmp_path / kind, tmp_path / f"{kind}.out"
        jobs[kind] = (_submit(kind, results, log), results, log)
    for kind, (job, results, log) in jobs.items():
        res = _slurm("wait", job, "600", timeout=700)
        output = log.read_text() if log.exists() else "(no job output)"
        assert res.returncode == 0, f"{kind} job {job}: {res.stdout}{res.stderr}\n{output[-4000:]}"
        _check_results(results)


GPT_STEPS = 40
GPT_PLAN = {"study": "jobs-gpt", "drivers": [
    {"name": "gpt", "script": "experiments/train_gpt.py", "out": "train_gpt.h5", "timeout_s": 400,
     "args": {"--quick": True, "--tp": 2, "--microbatches": 2, "--steps": GPT_STEPS, "--log-every": 1}}]}


def _gpt_job(results: Path, log: Path, plan: Path) -> str:
    env = {**os.environ, "MPIPAR_RESULTS": str(results), "MPIPAR_STUDY": "jobs-gpt",
           "MPIPAR_STUDY_ARGS": f"--config {plan} --no-analysis --silent"}
    cmd = ["sbatch", "--parsable", "--nodes=1", f"--ntasks-per-node={RANKS}", "--gpus-per-node=0",
           "--cpus-per-task=1", "-o", str(log), "--export=ALL", "jobs/slurm/study_mpiexec.sbatch"]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=60, env=env)
    assert res.returncode == 0, f"{cmd} failed:\n{res.stdout}\n{res.stderr}"
    return res.stdout.strip().split(";")[0]


def _gpt_losses(path: Path) -> dict[int, float]:
    try:
        with h5py.File(path, "r") as f:
            g = f["results/train_gpt"]
            steps, losses = g["step"][()].tolist(), g["loss"][()].tolist()
    except (OSError, KeyError):
        return {}
    assert len(steps) == len(set(steps)), f"a step stored twice: {steps}"
    return dict(zip(steps, losses))


def _start_requeued_now(job: str, timeout: float = 120) -> None:
    """Once `job` is back in the queue after its requeue, make it eligible 5 s later: Slurm holds
    a requeued job for its credential lifetime (cred_expire, 120 s by default), idle time on this
    one-node cluster (a real site's scheduler decides when it runs again). Not at once: slurmd
    refuses a credential issued in the same second as the old one's revocation ("Job credential
    revoked", seen in CI)."""
    import time

    import re

    deadline = time.time() + timeout
    while time.time() < deadline:
        info = subprocess.run(["scontrol", "-o", "show", "job", job], capture_output=True, text=True).stdout
        state = (re.search(r"JobState=(\S+)", info) or [None, ""])[1]
        restarts = int((re.search(r"Restarts=(\d+)", info) or [None, "0"])[1])
        if restarts and state == "PENDING":
            subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now+5"], capture_output=True, timeout=60)
            return
        if (restarts and state != "REQUEUED") or state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"):
            return  # already started again (or ended): nothing to hurry
        time.sleep(0.2)  # still running its first time, or REQUEUED on the way back to PENDING


@pytest.mark.timeout(1500)
def test_signalled_job_requeues_resumes_and_matches_uninterrupted(cluster, tmp_path):
    """SIGUSR1 to the batch shell (what --signal=B:USR1@120 sends) mid-training: the job checkpoints,
    requeues itself, resumes from the checkpoint and ends with the losses of an uninterrupted job."""
    import time

    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps(GPT_PLAN))
    ref_job = _gpt_job(tmp_path / "ref", tmp_path / "ref.out", plan)
    res = _slurm("wait", ref_job, "600", timeout=700)
    assert res.returncode == 0, f"{res.stdout}{res.stderr}\n{(tmp_path / 'ref.out').read_text()[-4000:]}"
    reference = _gpt_losses(tmp_path / "ref" / "jobs-gpt" / f"job-{ref_job}" / "train_gpt.h5")
    assert sorted(reference) == list(range(GPT_STEPS))

    job = _gpt_job(tmp_path / "pre", tmp_path / "pre.out", plan)
    folder = tmp_path / "pre" / "jobs-gpt" / f"job-{job}"
    deadline = time.time() + 300
    while len(_gpt_losses(folder / "train_gpt.h5")) < 5:
        assert time.time() < deadline, (tmp_path / "pre.out").read_text()[-4000:]
        time.sleep(0.2)
    sig = subprocess.run(["scancel", "--signal=USR1", "--batch", job], capture_output=True, text=True, timeout=60)
    assert sig.returncode == 0, sig.stderr
    _start_requeued_now(job)
    res = _slurm("wait", job, "900", timeout=1000)
    log = (tmp_path / "pre.out").read_text()
    assert res.returncode == 0, f"{res.stdout}{res.stderr}\n{log[-4000:]}"
    assert "requeueing job" in log, log[-4000:]
    assert "signal 10: saved" in (folder / "gpt.log").read_text()  # train_gpt checkpointed on the signal
    info = subprocess.run(["scontrol", "-o", "show", "job", job], capture_output=True, text=True).stdout
    assert "Restarts=1" in info, info
    manifest = json.loads((folder / "study.json").read_text())
    assert manifest["drivers"]["gpt"]["status"] == "ok" and manifest["drivers"]["gpt"]["runs"] == 2, manifest
    assert _gpt_losses(folder / "train_gpt.h5") == reference  # every step once, bit for bit


PBS_SIZES = ["4K", "8K", "16K", "32K", "64K", "128K"]
PBS_PLAN = {"study": "jobs-pbs", "drivers": [
    {"name": "collectives", "script": "experiments/collectives.py", "out": "collectives.h5", "timeout_s": 400,
     "args": {"--quick": True, "--ops": "all_reduce", "--impls": "mpi,ring", "--sizes": ",".join(PBS_SIZES),
              "--rounds": 40}}]}


def _sweep_rows(path: Path) -> list[tuple[int, str]]:
    try:
        with h5py.File(path, "r") as f:
            g = f["results/collectives"]
            return list(zip(g["nbytes"][()].tolist(), g["impl"].asstr()[()].tolist()))
    except (OSError, KeyError):
        return []


@pytest.mark.timeout(900)
def test_signalled_pbs_job_requeues_and_resumes_the_sweep(cluster, tmp_path):
    """jobs/pbs/study.pbs through SLURM's qsub: SIGUSR1 to the batch shell mid-sweep, the collectives
    driver stores the size in hand and stops, the script requeues the job, and the requeued job
    resumes the same study folder: every point stored exactly once, the first run's rows kept."""
    import time

    plan, results, log = tmp_path / "plan.json", tmp_path / "pbs", tmp_path / "pbs.out"
    plan.write_text(json.dumps(PBS_PLAN))
    env = {**os.environ, "MPIPAR_RESULTS": str(results), "MPIPAR_STUDY": "jobs-pbs",
           "MPIPAR_STUDY_ARGS": f"--config {plan} --no-analysis --silent"}
    cmd = ["qsub", "-V", "-r", "y", "-l", f"select=1:ncpus={RANKS}:mpiprocs={RANKS}", "-o", str(log), "-j", "oe",
           "jobs/pbs/study.pbs"]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=60, env=env)
    assert res.returncode == 0, f"{cmd} failed:\n{res.stdout}\n{res.stderr}"
    job = res.stdout.strip().split(".")[0]
    deadline, rows = time.time() + 300, []
    while len(rows) < 2:
        assert time.time() < deadline, log.read_text()[-4000:] if log.exists() else "(no job output)"
        folders = list((results / "jobs-pbs").glob("job-*")) if (results / "jobs-pbs").exists() else []
        rows = _sweep_rows(folders[0] / "collectives.h5") if folders else []
        time.sleep(0.2)
    (folder,) = folders
    sig = subprocess.run(["scancel", "--signal=USR1", "--batch", job], capture_output=True, text=True, timeout=60)
    assert sig.returncode == 0, sig.stderr
    _start_requeued_now(job)
    res = _slurm("wait", job, "600", timeout=700)
    output = log.read_text() if log.exists() else "(no job output)"
    assert res.returncode == 0, f"{res.stdout}{res.stderr}\n{output[-4000:]}"
    # (qsub's output file starts again at the requeue: the study's own log and manifest keep both runs)
    assert "collectives: signal 10: stopped" in (folder / "collectives.log").read_text()
    info = subprocess.run(["scontrol", "-o", "show", "job", job], capture_output=True, text=True).stdout
    assert "Restarts=1" in info, info
    manifest = json.loads((folder / "study.json").read_text())
    entry = manifest["drivers"]["collectives"]
    assert entry["status"] == "ok" and entry["runs"] == 2 and len(manifest["resumed_utc"]) == 1, manifest
    final = _sweep_rows(folder / "collectives.h5")
    assert final[:len(rows)] == rows, "the requeued job rewrote stored points"
    sizes = [int(s[:-1]) * 1024 for s in PBS_SIZES]
    assert sorted(final) == sorted((n, impl) for n in sizes for impl in ("mpi", "ring")), final
