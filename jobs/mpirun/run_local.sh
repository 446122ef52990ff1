#!/usr/bin/env bash
# mpipar study job (mpirun), written by jobs/generate.py.
# Usage: jobs/mpirun/run_local.sh [study.py args]   (NP=ranks, default 4)
# Environment: NP, MPIPAR_ROOT, MPIPAR_VENV, MPIPAR_MODULES, MPIPAR_STUDY,
#   MPIPAR_RESULTS (results root), MPIPAR_STUDY_ARGS (more study.py flags), MPIFLAGS.
# Output: results/<study>/<UTC timestamp>/*.h5, CSV and PNG; see results/README.md.
set -euo pipefail
ROOT=${MPIPAR_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}
cd "$ROOT"
[ -f experiments/study.py ] || { echo "mpipar job: $ROOT is not the mpipar repo (submit from it or set MPIPAR_ROOT)" >&2; exit 2; }
MPIPAR_VENV=${MPIPAR_VENV:-.venv}
MPIPAR_MODULES=${MPIPAR_MODULES:-}
. jobs/env.sh
NP=${NP:-4}
set -x
python experiments/study.py --study "${MPIPAR_STUDY:-scaling}" --results "${MPIPAR_RESULTS:-results}" \
  --np "$NP" --mpiexec "mpiexec ${MPIFLAGS:-}" ${MPIPAR_STUDY_ARGS:-} "$@"
