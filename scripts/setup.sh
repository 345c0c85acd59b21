#!/usr/bin/env bash
# Create .venv and install kappatune with its test extras.
# torch: the CPU wheel torch==2.13.0 is installed first (it is the local wheel on the project machines);
# set KAPPATUNE_TORCH="" to keep whatever torch you bring (e.g. a CUDA build), or another spec to use it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
TORCH_SPEC=${KAPPATUNE_TORCH-torch==2.13.0}
if [ -n "$TORCH_SPEC" ] && ! python -c "import torch" >/dev/null 2>&1; then
  python -m pip install -q "$TORCH_SPEC"
fi
python -m pip install -q -e ".[test]"
# Built-in corpora "control" and "wordnet" and the labelled tasks come from Debian packages (`apt-get download` into
# the kappatune cache; nothing is installed) and from apt's package lists, which a fresh machine may lack.
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && ! apt-cache show r-cran-janeaustenr >/dev/null 2>&1; then
  apt-get update -qq >/dev/null 2>&1 || echo "warning: apt-get update failed; built-in corpora control and wordnet and the labelled tasks cannot be fetched" >&2
fi
python -c "import kappatune, torch; print(f'kappatune {kappatune.__version__} ready (torch {torch.__version__})')"
