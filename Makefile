# One command each on a fresh machine:
#   make demo   set up .venv and run the main job (continual KappaTune run on SmolLM2-135M, ~3 min on 2 idle CPU cores once cached)
#   make test   set up .venv and run the test suite
VENV := .venv/bin
.PHONY: setup demo test test-fast bench

setup:
	bash scripts/setup.sh

demo: setup
	$(VENV)/kappatune run configs/demo.yaml

test: setup
	$(VENV)/python -m pytest -q

test-fast: setup
	$(VENV)/python -m pytest -q -m "not slow"

bench: setup
	$(VENV)/python benchmarks/analysis_speed.py
