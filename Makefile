# One command each on a fresh machine:
#   make demo   set up .venv and run the main job (continual KappaTune run on SmolLM2-135M, ~3 min on 2 idle CPU cores once cached)
#   make test   set up .venv and run the test suite
#   make study  set up .venv and run the forgetting study (README "Results"; 10 methods x 3 seeds, see configs/study.yaml)
VENV := .venv/bin
# test processes (pytest-xdist, whole files per process): 2 = this 2-core machine; PYTEST_WORKERS=0 runs in one process
PYTEST_WORKERS ?= 2
.PHONY: setup demo test test-fast bench study study2

setup:
	bash scripts/setup.sh

demo: setup
	$(VENV)/kappatune run configs/demo.yaml

test: setup
	$(VENV)/python -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile

test-fast: setup
	$(VENV)/python -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile -m "not slow"

bench: setup
	$(VENV)/python benchmarks/analysis_speed.py

study: setup
	$(VENV)/kappatune bench configs/study.yaml

study2: setup  # the study, second edition: hours; resumes from committed cells (configs/study2.yaml)
	scripts/study2.sh
