"""jobs/generate.py: the committed job scripts are its output, valid bash, one rank per GPU."""
from __future__ import annotations

import importlib.util
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
