# Sourced by every mpipar job script: puts an MPI and the project's Python on PATH.
#
#   MPIPAR_MODULES  "module load" these first (a site MPI, CUDA), e.g. "openmpi/4.1 cuda/12.4"
#   MPIPAR_VENV     the virtual environment to activate (default: .venv in the repo root)
#   MPIFLAGS        extra flags for mpiexec (the scripts pass them through); with Open MPI,
#                   oversubscription (more ranks than cores) is allowed by default here
#
# One rank per GPU: nothing to do here. mpipar.Mesh gives each rank the GPU of its
# node-local rank (MPI_COMM_TYPE_SHARED), so request as many ranks per node as GPUs.
if [ -n "${MPIPAR_MODULES:-}" ]; then
  command -v module >/dev/null 2>&1 || { [ -f /etc/profile.d/modules.sh ] && . /etc/profile.d/modules.sh; }
  # shellcheck disable=SC2086
  module load $MPIPAR_MODULES
fi
MPIPAR_VENV=${MPIPAR_VENV:-.venv}
if [ -f "$MPIPAR_VENV/bin/activate" ]; then
  # shellcheck disable=SC1091
  . "$MPIPAR_VENV/bin/activate"
elif [ -z "${MPIPAR_MODULES:-}" ]; then
  echo "mpipar job: no virtual environment at $MPIPAR_VENV (run 'make install' or set MPIPAR_VENV)" >&2
  exit 2
fi
export PYTHONUNBUFFERED=1
if mpiexec --version 2>/dev/null | grep -q "Open MPI"; then
  export OMPI_MCA_rmaps_base_oversubscribe=${OMPI_MCA_rmaps_base_oversubscribe:-1}
fi
echo "mpipar job: python $(command -v python), mpiexec $(command -v mpiexec || echo none), host $(hostname)"
