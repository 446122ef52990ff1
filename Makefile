# mpipar: one command each on a fresh machine (`make run`, `make test`); `make help` lists targets.
SHELL := /bin/bash
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
MPIEXEC ?= $(VENV)/bin/mpiexec
NP     ?= 4
MPI    ?= wheel
PYTHON ?= python3
# ranks > cores here: MPICH's hydra needs nothing extra; Open MPI needs --oversubscribe
MPIFLAGS ?=
PYTEST_MPI := $(PY) -m pytest --with-mpi -q -p no:randomly --timeout=600
TORCH_PIN := torch==2.13.0

.PHONY: help install test test-unit test-mpi test-gpu test-jobs run bench lint clean

help:  ## list targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'
	@echo "  variables: NP=$(NP) (ranks for run/bench), MPI=wheel|system (install), MPIEXEC=$(MPIEXEC)"

$(VENV)/.installed: pyproject.toml
	$(MAKE) install

install:  ## create .venv with mpi4py, MPI (mpich wheel, or MPI=system), torch 2.13.0, numpy, h5py, transformers, pytest-mpi; mpipar editable
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
ifeq ($(MPI),system)
	@command -v mpicc >/dev/null || { echo "MPI=system needs mpicc on PATH (module load mpi)"; exit 1; }
	$(PIP) install -q --no-binary=mpi4py --no-cache-dir mpi4py
else
	$(PIP) install -q mpich mpi4py
endif
	$(PIP) install -q $(TORCH_PIN) numpy h5py matplotlib pandas tqdm pytest pytest-mpi pytest-timeout transformers safetensors
	$(PIP) install -q --no-deps --no-build-isolation -e .
	@$(PY) -c "import mpi4py.MPI as M, torch, h5py; print('installed:', M.Get_library_version().splitlines()[0], '| torch', torch.__version__)"
	@touch $(VENV)/.installed

test: $(VENV)/.installed  ## unit tests, then MPI tests at 1, 2, 3 and 4 ranks
	$(MAKE) test-unit
	$(MAKE) test-mpi

test-unit: $(VENV)/.installed  ## tests that need no MPI launcher (schedules, simulator, cost, layouts, failure subprocesses)
	$(PY) -m pytest -q --timeout=600 tests/unit

test-mpi: $(VENV)/.installed  ## pytest-mpi suite under mpiexec -n 1, 2, 3, 4
	@set -e; for n in 1 2 3 4; do \
	  echo "== mpiexec -n $$n =="; \
	  timeout 900 $(MPIEXEC) $(MPIFLAGS) -n $$n $(PYTEST_MPI) tests/mpi; \
	done

test-gpu: $(VENV)/.installed  ## the CUDA tests (marked cuda) at 1 and 2 ranks; they skip without a GPU
	@set -e; for n in 1 2; do \
	  echo "== mpiexec -n $$n (cuda) =="; \
	  timeout 480 $(MPIEXEC) $(MPIFLAGS) -n $$n $(PYTEST_MPI) -m cuda -rs tests/mpi; \
	done
	$(PY) -m pytest -q -m cuda -rs --timeout=300 tests/unit

test-jobs: $(VENV)/.installed  ## submit the SLURM and PBS job scripts to a local SLURM cluster (needs root)
	$(PY) -m pytest -q -m jobs --timeout=900 tests/jobs

run: $(VENV)/.installed  ## the default scaling study on NP local ranks -> results/<study>/<timestamp>/
	$(PY) experiments/study.py --np $(NP) --mpiexec $(MPIEXEC)

bench: $(VENV)/.installed  ## collectives benchmark on NP ranks (nccl-tests style table)
	$(MPIEXEC) $(MPIFLAGS) -n $(NP) $(PY) experiments/collectives.py

lint:  ## byte-compile everything and report modules over 300 lines
	$(PY) -m compileall -q mpipar experiments tests
	@find mpipar -name '*.py' | xargs wc -l | awk '$$2!="total" && $$1>300 {print "over 300 lines:", $$2, $$1}'

clean:  ## remove the venv and caches (results are kept)
	rm -rf $(VENV) build *.egg-info
	find . -name __pycache__ -prune -exec rm -rf {} +
