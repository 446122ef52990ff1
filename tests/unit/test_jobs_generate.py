"""jobs/generate.py: the committed job scripts are its output, valid bash, one rank per GPU; run in
bash with a stand-in study, qrerun and scontrol, the SLURM and PBS scripts pass SIGUSR1/SIGTERM on to the
study and requeue their job (PBS: qrerun; under SLURM's qsub wrapper: scontrol) only after SIGUSR1."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("jobs_generate", ROOT / "jobs" / "generate.py")
gen = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = gen  # dataclasses look their module up
spec.loader.exec_module(gen)


@pytest.mark.parametrize("name", sorted(gen.SCHEDULERS))
def test_committed_script_is_the_generated_default_and_valid_bash(name):
    path = ROOT / "jobs" / gen.SCHEDULERS[name][0]
    assert path.read_text() == gen.render(gen.default_configs()[name]), \
        f"{path} differs from `python jobs/generate.py --write-defaults`"
    assert path.stat().st_mode & 0o111, f"{path} is not executable"
    res = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_scheduler_directives():
    slurm = gen.render(gen.JobConfig("slurm", nodes=2, ranks_per_node=8, gpus_per_node=8, partition="gpu"))
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --partition=gpu", 'srun --mpi=pmi2'):
        assert line in slurm
    pbs = gen.render(gen.JobConfig("pbs", nodes=3, ranks_per_node=4, gpus_per_node=4, cpus_per_rank=2))
    assert "#PBS -l select=3:ncpus=8:mpiprocs=4:ngpus=4" in pbs and "PBS_NODEFILE" in pbs
    cpu = gen.render(gen.JobConfig("slurm", gpus_per_node=0))
    assert "#SBATCH --gpus-per-node" not in cpu


@pytest.mark.parametrize("bad", [dict(gpus_per_node=2), dict(nodes=0), dict(scheduler="lsf"),
                                 dict(scheduler="mpirun", nodes=2, gpus_per_node=0)])
def test_inconsistent_requests_are_refused(bad):
    with pytest.raises(ValueError):
        gen.render(gen.JobConfig(**{"gpus_per_node": 4, **bad}))


def test_cli_writes_a_script(tmp_path):
    out = tmp_path / "x.sbatch"
    assert gen.main(["--scheduler", "slurm-mpiexec", "--nodes", "2", "--gpus-per-node", "4",
                     "--study-args", "--only tensor", "-o", str(out)]) == 0
    text = out.read_text()
    assert "#SBATCH --nodes=2" in text and "--only tensor" in text and 'mpiexec ${MPIFLAGS:-}' in text
    assert gen.main(["--scheduler", "pbs", "--gpus-per-node", "3"]) == 2


# -- preemption and requeue, run for real in bash with a stand-in study and scheduler commands --------
STUB_STUDY = '''
import os, signal, sys, time
got = []
for s in (signal.SIGUSR1, signal.SIGTERM):
    signal.signal(s, lambda n, _f: got.append(n))
with open(os.environ["STUB_LOG"], "a") as f:
    f.write("study " + " ".join(sys.argv[1:]) + "\\n")
t0 = time.time()
while not got and time.time() - t0 < 60:
    time.sleep(0.02)
with open(os.environ["STUB_LOG"], "a") as f:
    f.write(f"got {got}\\n")
sys.exit(128 + got[0] if got else 0)
'''


def _stand_in(tmp_path: Path) -> tuple[Path, Path]:
    """A repo whose study.py waits for a signal and exits 128 + it, an env.sh that only puts this
    Python on PATH, and qrerun/scontrol that log their arguments. Returns (repo, log)."""
    repo, bin_dir, log = tmp_path / "repo", tmp_path / "bin", tmp_path / "calls.log"
    (repo / "experiments").mkdir(parents=True)
    (repo / "experiments" / "study.py").write_text(STUB_STUDY)
    (repo / "jobs").mkdir()
    (repo / "jobs" / "env.sh").write_text(f'export PATH="{Path(sys.executable).parent}:$PATH"\n')
    bin_dir.mkdir()
    for tool in ("qrerun", "scontrol"):
        (bin_dir / tool).write_text(f'#!/bin/sh\necho "{tool} $*" >> "{log}"\n')
        (bin_dir / tool).chmod(0o755)
    log.touch()
    return repo, log


@pytest.mark.timeout(120)
@pytest.mark.parametrize("scheduler,env,sig,requeue", [
    ("pbs", {"PBS_JOBID": "42.pbs-server"}, "USR1", "qrerun 42.pbs-server"),
    ("pbs", {"PBS_JOBID": "42.pbs-server"}, "TERM", None),
    ("pbs", {"PBS_JOBID": "42", "SLURM_JOB_ID": "42"}, "USR1", "scontrol requeue 42"),  # SLURM's qsub wrapper
    ("slurm", {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "2"}, "USR1", "scontrol requeue 7"),
], ids=["pbs-USR1-qrerun", "pbs-TERM-no-requeue", "pbs-under-slurm-USR1", "slurm-USR1"])
def test_a_signalled_job_passes_the_signal_on_and_requeues_after_usr1(tmp_path, scheduler, env, sig, requeue):
    """The job script's traps: the signal reaches the study, the script exits with the study's
    code, and only after SIGUSR1 (the time limit is near) it requeues its own job, whose study
    folder (results/<study>/job-<id>) is the same after the requeue."""
    import signal
    import time

    text = gen.render(gen.JobConfig(scheduler, gpus_per_node=0))
    assert "#PBS -r y" in text if scheduler == "pbs" else "#SBATCH --requeue" in text
    script = tmp_path / "job.sh"
    script.write_text(text)
    repo, log = _stand_in(tmp_path)
    nodes = tmp_path / "nodefile"
    nodes.write_text("localhost\nlocalhost\n")
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("PBS_", "SLURM_", "MPIPAR_"))}
    run_env = {**clean, "PATH": f"{tmp_path / 'bin'}:{clean.get('PATH', '/usr/bin:/bin')}", "MPIPAR_ROOT": str(repo),
               "STUB_LOG": str(log), "PBS_NODEFILE": str(nodes), **env}
    proc = subprocess.Popen(["bash", str(script)], env=run_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    t0 = time.time()
    while "study " not in log.read_text():
        assert proc.poll() is None and time.time() - t0 < 60, proc.communicate()[0]
        time.sleep(0.05)
    time.sleep(0.2)  # the script reaches its `wait` (a signal before its traps would end it)
    proc.send_signal(getattr(signal, "SIG" + sig))
    out = proc.communicate(timeout=60)[0]
    num = int(getattr(signal, "SIG" + sig))
    assert proc.returncode == 128 + num, out
    calls = log.read_text().splitlines()
    job = env.get("PBS_JOBID", env.get("SLURM_JOB_ID"))
    assert calls[0].startswith("study ") and f"--dir results/scaling/job-{job} " in calls[0] + " ", calls
    assert "--np 2 " in calls[0], calls
    assert calls[1] == f"got [{num}]", calls  # the study got the signal itself
    assert calls[2:] == ([requeue] if requeue else []), calls
    assert ("requeueing job" in out) == bool(requeue), out
