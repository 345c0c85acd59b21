#!/usr/bin/env bash
# The study, second edition (configs/study2.yaml): run it across sessions, one committed cell at a time.
#
#   scripts/study2.sh              # run (or continue) the study with $WORKERS workers (default 2: one per core)
#   scripts/study2.sh --report     # rebuild benchmarks/results/study2/study.md from the committed cells only,
#                                  # then the README's study2 tables from it
#   scripts/study2.sh --only full  # extra arguments go to every `kappatune bench` worker
#   scripts/study2.sh --stop-after 2h   # start no new cell after 2 h; the cells in progress finish and are committed
#
# Every worker is a plain `kappatune bench configs/study2.yaml --commit`: the workers share the cells through
# per-cell claims (each cell runs once) and git-commit every finished cell at once. A run skips every cell
# already committed under benchmarks/results/study2/cells, so killing it (or ending the session) loses at most
# the cells in progress, which resume from their run directories if those survived, or start over if not. The
# pre-registered block and the LR-search protocol are fixed by the first committed cell
# (benchmarks/results/study2/cells/protocol.json); a changed block is refused.
set -euo pipefail
cd "$(dirname "$0")/.."
KT=${KAPPATUNE:-.venv/bin/kappatune}
[ -x "$KT" ] || KT=kappatune
if [ "${1:-}" = "--report" ]; then
  shift
  "$KT" bench configs/study2.yaml --report "$@"
  # ... and the README's study2 tables from it (benchmarks/study2_readme.py; a test checks they match)
  PY=${PYTHON:-.venv/bin/python}
  [ -x "$PY" ] || PY=python3
  exec "$PY" benchmarks/study2_readme.py --write README.md
fi
WORKERS=${WORKERS:-2}
mkdir -p runs/study2
pids=()
for i in $(seq 1 "$WORKERS"); do
  "$KT" bench configs/study2.yaml --commit "$@" >"runs/study2/worker-$i.log" 2>&1 &
  pids+=($!)
  sleep 5  # the first worker writes protocol.json before the others look for it
done
echo "study2: $WORKERS workers (logs: runs/study2/worker-*.log)"
status=0
for p in "${pids[@]}"; do wait "$p" || status=$?; done
[ "$status" = 0 ] || { echo "study2: a worker failed (see runs/study2/worker-*.log)" >&2; exit "$status"; }
"$KT" bench configs/study2.yaml --report
