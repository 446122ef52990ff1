#!/usr/bin/env bash
# mpipar study job (hostfile), written by jobs/generate.py.
# Usage: HOSTFILE=hosts jobs/mpirun/run_hostfile.sh [study.py args]   (NP=ranks, default 4)
# The hostfile lists the nodes with their slots: MPICH 'node1:4', Open MPI 'node1 slots=4'.
# Environment: NP, MPIPAR_ROOT, MPIPAR_VENV, MPIPAR_MODULES, MPIPAR_STUDY,
#   MPIPAR_RESULTS (results root), MPIPAR_STUDY_ARGS (more study.py flags), MPIFLAGS.
# Output: results/<study>/<UTC timestamp>/*.h5, CSV and PNG; see results/README.md.
set -euo pipefail
ROOT=${MPIPAR_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}
HOSTFILE=$(readlink -f "${HOSTFILE:-hosts}")   # relative to where you run it
cd "$ROOT"
[ -f experiments/study.py ] || { echo "mpipar job: $ROOT is not the mpipar repo (submit from it or set MPIPAR_ROOT)" >&2; exit 2; }
MPIPAR_VENV=${MPIPAR_VENV:-.venv}
MPIPAR_MODULES=${MPIPAR_MODULES:-}
. jobs/env.sh
[ -f "$HOSTFILE" ] || { echo "mpipar job: no hostfile $HOSTFILE (set HOSTFILE)" >&2; exit 2; }
NP=${NP:-4}
set -x
python experiments/study.py --study "${MPIPAR_STUDY:-scaling}" --results "${MPIPAR_RESULTS:-results}" \
  --np "$NP" --mpiexec "mpiexec -hostfile $HOSTFILE ${MPIFLAGS:-}" ${MPIPAR_STUDY_ARGS:-} "$@"
