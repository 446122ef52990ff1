#!/usr/bin/env python3
"""Write an mpipar job script (mpirun, hostfile, SLURM or PBS) from a study config.

    python jobs/generate.py --scheduler slurm --nodes 2 --ranks-per-node 4 \\
        --gpus-per-node 4 --time 01:00:00 --study-args "--only tensor,pipeline" -o my.sbatch
    python jobs/generate.py --write-defaults     # rewrite the scripts committed in jobs/

Every script cds to the repository, activates the venv (or `module load`s an
MPI), and runs `experiments/study.py`, which launches each experiment driver
with the scheduler's launcher and writes HDF5 under results/<study>/<UTC time>/.
One rank per GPU: ask for as many ranks per node as GPUs; mpipar.Mesh picks
each rank's GPU from its node-local rank. Needs only the standard library.

Preemption (SLURM and PBS scripts): the scheduler's warning signal (SLURM
`--signal=B:USR1@<signal_s>`) and SIGTERM are trapped by the script and passed
to the study, whose drivers checkpoint and stop; after SIGUSR1 the script
requeues the job (`scontrol requeue`, PBS `qrerun`). The study folder is
results/<study>/job-<job id>/ (`study.py --dir`), the same after a requeue, so
the requeued job resumes it: train_gpt continues from its checkpoint.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

JOBS_DIR = Path(__file__).resolve().parent

# scheduler -> (committed file, launcher command, how the script finds the repo)
SCHEDULERS = {
    "mpirun": ("mpirun/run_local.sh", "mpiexec ${MPIFLAGS:-}",
               '$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)'),
    "hostfile": ("mpirun/run_hostfile.sh", 'mpiexec -hostfile $HOSTFILE ${MPIFLAGS:-}',
                 '$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)'),
    "slurm": ("slurm/study_srun.sbatch", "srun --mpi=pmi2 ${MPIFLAGS:-}", "${SLURM_SUBMIT_DIR:-$PWD}"),
    "slurm-mpiexec": ("slurm/study_mpiexec.sbatch", "mpiexec ${MPIFLAGS:-}", "${SLURM_SUBMIT_DIR:-$PWD}"),
    "pbs": ("pbs/study.pbs", 'mpiexec -hostfile $PBS_NODEFILE ${MPIFLAGS:-}', "${PBS_O_WORKDIR:-$PWD}"),
}


@dataclasses.dataclass
class JobConfig:
    """What a job script asks the scheduler for and which study it runs."""

    scheduler: str = "slurm"
    nodes: int = 1
    ranks_per_node: int = 4
    gpus_per_node: int = 0
    cpus_per_rank: int = 1
    time: str = "00:30:00"
    job_name: str = "mpipar-study"
    partition: str = ""
    account: str = ""
    study: str = "scaling"
    study_args: str = ""
    venv: str = ".venv"
    modules: str = ""
    signal_s: int = 120  # SLURM sends SIGUSR1 this many seconds before the time limit (0: none)

    def check(self) -> None:
        """Raise ValueError on an inconsistent request."""
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"unknown scheduler {self.scheduler!r}; one of {sorted(SCHEDULERS)}")
        if min(self.nodes, self.ranks_per_node, self.cpus_per_rank) < 1 or self.gpus_per_node < 0:
            raise ValueError("nodes, ranks_per_node, cpus_per_rank must be >= 1 and gpus_per_node >= 0")
        if self.gpus_per_node and self.gpus_per_node != self.ranks_per_node:
            raise ValueError(f"one rank per GPU: ranks_per_node ({self.ranks_per_node}) must equal "
                             f"gpus_per_node ({self.gpus_per_node})")
        if self.scheduler == "mpirun" and self.nodes != 1:
            raise ValueError("scheduler 'mpirun' runs on this node only; use 'hostfile' for several")


def _slurm_header(c: JobConfig) -> list[str]:
    lines = [f"#SBATCH --job-name={c.job_name}", f"#SBATCH --nodes={c.nodes}",
             f"#SBATCH --ntasks-per-node={c.ranks_per_node}", f"#SBATCH --cpus-per-task={c.cpus_per_rank}"]
    if c.gpus_per_node:
        lines.append(f"#SBATCH --gpus-per-node={c.gpus_per_node}")
    lines += [f"#SBATCH --time={c.time}", f"#SBATCH --output={c.job_name}-%j.out", "#SBATCH --open-mode=append",
              "#SBATCH --requeue"]
    lines += [f"#SBATCH --signal=B:USR1@{c.signal_s}"] if c.signal_s else []
    lines += [f"#SBATCH --partition={c.partition}"] if c.partition else []
    lines += [f"#SBATCH --account={c.account}"] if c.account else []
    return lines


def _pbs_header(c: JobConfig) -> list[str]:
    select = f"select={c.nodes}:ncpus={c.ranks_per_node * c.cpus_per_rank}:mpiprocs={c.ranks_per_node}"
    select += f":ngpus={c.gpus_per_node}" if c.gpus_per_node else ""
    lines = [f"#PBS -N {c.job_name}", f"#PBS -l {select}", f"#PBS -l walltime={c.time}", "#PBS -j oe",
             "#PBS -r y"]
    lines += [f"#PBS -q {c.partition}"] if c.partition else []
    lines += [f"#PBS -A {c.account}"] if c.account else []
    return lines


_USAGE = {
    "mpirun": ["Usage: jobs/mpirun/run_local.sh [study.py args]   (NP=ranks, default {np})"],
    "hostfile": ["Usage: HOSTFILE=hosts jobs/mpirun/run_hostfile.sh [study.py args]   (NP=ranks, default {np})",
                 "The hostfile lists the nodes with their slots: MPICH 'node1:4', Open MPI 'node1 slots=4'."],
    "slurm": ["Usage (from the repo root): sbatch jobs/slurm/study_srun.sbatch [study.py args]",
              "Ranks are launched by srun --mpi=pmi2 (PMI-2 works with MPICH, Open MPI and Intel MPI).",
              "CPU-only nodes: sbatch --gpus-per-node=0 --ntasks-per-node=N ..."],
    "slurm-mpiexec": ["Usage (from the repo root): sbatch jobs/slurm/study_mpiexec.sbatch [study.py args]",
                      "Ranks are launched by the MPI's own mpiexec, which reads the SLURM allocation.",
                      "CPU-only nodes: sbatch --gpus-per-node=0 --ntasks-per-node=N ..."],
    "pbs": ["Usage (from the repo root): qsub jobs/pbs/study.pbs   (study.py flags: export MPIPAR_STUDY_ARGS=...; qsub -V ...)",
            "Ranks come from $PBS_NODEFILE (one line per mpiproc); mpiexec launches them."],
}


def _np_lines(c: JobConfig) -> list[str]:
    total = c.nodes * c.ranks_per_node
    if c.scheduler == "mpirun":
        return [f"NP=${{NP:-{total}}}"]
    if c.scheduler == "hostfile":
        return ['[ -f "$HOSTFILE" ] || { echo "mpipar job: no hostfile $HOSTFILE (set HOSTFILE)" >&2; exit 2; }',
                f"NP=${{NP:-{total}}}"]
    if c.scheduler == "pbs":
        return ['if [ -z "${PBS_NODEFILE:-}" ] && command -v generate_pbs_nodefile >/dev/null; then',
                '  PBS_NODEFILE=$(generate_pbs_nodefile)   # SLURM\'s qsub wrapper sets none',
                '  trap \'rm -f "$PBS_NODEFILE"\' EXIT', "fi",
                'NP=${NP:-$(wc -l < "${PBS_NODEFILE:?not inside a PBS job}")}']
    return ['NP=${NP:-${SLURM_NTASKS:?not inside a SLURM job}}']


# the job id that survives a requeue, and how the script requeues itself
_REQUEUE = {"slurm": ("${SLURM_JOB_ID:?not inside a SLURM job}", 'scontrol requeue "$SLURM_JOB_ID"'),
            "pbs": ("${PBS_JOBID:-${SLURM_JOB_ID:?not inside a PBS job}}",
                    'if [ -n "${SLURM_JOB_ID:-}" ]; then scontrol requeue "$SLURM_JOB_ID"; '
                    'else qrerun "$PBS_JOBID" || echo "mpipar job: qrerun refused (some sites allow it only to '
                    'operators); resume with: MPIPAR_STUDY_DIR=$STUDY_DIR qsub -V <this script>" >&2; fi')}


def _study_lines(c: JobConfig, launcher: str, extra: str) -> list[str]:
    """Run the study; under a scheduler in the background, with the preemption traps and the requeue."""
    run = [f'python experiments/study.py --study "${{MPIPAR_STUDY:-{c.study}}}" '
           f'--results "${{MPIPAR_RESULTS:-results}}" \\',
           f'  --np "$NP" --mpiexec "{launcher}"{extra} ${{MPIPAR_STUDY_ARGS:-}} "$@"']
    kind = {"slurm": "slurm", "slurm-mpiexec": "slurm", "pbs": "pbs"}.get(c.scheduler)
    if kind is None:
        return ["set -x", *run]
    job_id, requeue = _REQUEUE[kind]
    run[0] = run[0].replace(" \\", ' --dir "$STUDY_DIR" \\')
    return [f"JOB_ID={job_id}",
            "# Same folder after a requeue (same job id): the requeued job resumes the study there.",
            'STUDY_DIR=${MPIPAR_STUDY_DIR:-${MPIPAR_RESULTS:-results}/${MPIPAR_STUDY:-' + c.study + '}/job-${JOB_ID}}',
            "set -x", *[ln + (" &" if i == len(run) - 1 else "") for i, ln in enumerate(run)],
            "{ set +x; } 2>/dev/null",
            "STUDY_PID=$! SIGNALLED=",
            "# SIGUSR1 (the time limit is near) and SIGTERM: the study's drivers checkpoint and stop.",
            "trap 'SIGNALLED=USR1; kill -USR1 $STUDY_PID 2>/dev/null' USR1",
            "trap 'SIGNALLED=TERM; kill -TERM $STUDY_PID 2>/dev/null' TERM",
            "set +e",
            'while :; do wait "$STUDY_PID"; RC=$?; kill -0 "$STUDY_PID" 2>/dev/null || break; done',
            'if [ "$SIGNALLED" = USR1 ] && [ "$RC" -ne 0 ]; then',
            '  echo "mpipar job: stopped by SIGUSR1, checkpointed in $STUDY_DIR; requeueing job $JOB_ID" >&2',
            f"  {requeue}",
            "fi",
            'exit "$RC"']


def render(c: JobConfig) -> str:
    """The text of the job script for config `c`."""
    c.check()
    _, launcher, root = SCHEDULERS[c.scheduler]
    total = c.nodes * c.ranks_per_node
    shebang = "#!/usr/bin/env bash" if c.scheduler in ("mpirun", "hostfile") else "#!/bin/bash"
    header = {"slurm": _slurm_header, "slurm-mpiexec": _slurm_header, "pbs": _pbs_header}.get(
        c.scheduler, lambda _: [])(c)
    extra = f" {c.study_args}" if c.study_args else ""
    lines = [shebang, *header,
             f"# mpipar study job ({c.scheduler}), written by jobs/generate.py.",
             *[f"# {u.format(np=total)}" for u in _USAGE[c.scheduler]],
             "# Environment: NP, MPIPAR_ROOT, MPIPAR_VENV, MPIPAR_MODULES, MPIPAR_STUDY,",
             "#   MPIPAR_RESULTS (results root), MPIPAR_STUDY_ARGS (more study.py flags), MPIFLAGS.",
             "# Output: results/<study>/<UTC timestamp>/*.h5, CSV and PNG; see results/README.md.",
             "set -euo pipefail",
             f"ROOT=${{MPIPAR_ROOT:-{root}}}",
             *(['HOSTFILE=$(readlink -f "${HOSTFILE:-hosts}")   # relative to where you run it']
               if c.scheduler == "hostfile" else []),
             'cd "$ROOT"',
             '[ -f experiments/study.py ] || { echo "mpipar job: $ROOT is not the mpipar repo '
             '(submit from it or set MPIPAR_ROOT)" >&2; exit 2; }',
             f'MPIPAR_VENV=${{MPIPAR_VENV:-{c.venv}}}',
             f'MPIPAR_MODULES=${{MPIPAR_MODULES:-{c.modules}}}',
             ". jobs/env.sh",
             *_np_lines(c),
             *_study_lines(c, launcher, extra), ""]
    return "\n".join(lines)


def default_configs() -> dict[str, JobConfig]:
    """The configs of the committed scripts: one node, 4 ranks (4 GPUs under a scheduler)."""
    gpus = {"mpirun": 0, "hostfile": 0}
    return {name: JobConfig(scheduler=name, gpus_per_node=gpus.get(name, 4)) for name in SCHEDULERS}


def write(c: JobConfig, path: Path) -> Path:
    """Write the script for `c` to `path`, executable."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render(c))
    path.chmod(0o755)
    return path


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for f in dataclasses.fields(JobConfig):
        flag = "--" + f.name.replace("_", "-")
        p.add_argument(flag, type=type(f.default), default=f.default,
                       choices=sorted(SCHEDULERS) if f.name == "scheduler" else None)
    p.add_argument("-o", "--output", help="write here (default: stdout)")
    p.add_argument("--write-defaults", action="store_true", help="rewrite the scripts committed in jobs/")
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    if args.write_defaults:
        for name, cfg in default_configs().items():
            print(write(cfg, JOBS_DIR / SCHEDULERS[name][0]))
        return 0
    cfg = JobConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(JobConfig)})
    try:
        text = render(cfg)
    except ValueError as e:
        print(f"generate.py: {e}", file=sys.stderr)
        return 2
    if args.output:
        write(cfg, Path(args.output))
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
