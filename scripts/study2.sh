#!/usr/bin/env bash
# The study, second edition (configs/study2.yaml): run it across sessions, one committed cell at a time.
#
#   scripts/study2.sh              # run (or continue) the study; every finished cell is git-committed at once
#   scripts/study2.sh --report     # rebuild benchmarks/results/study2/study.md from the committed cells only
#   scripts/study2.sh --only full  # extra arguments go to `kappatune bench` (e.g. one method at a time)
#
# A run skips every cell already committed under benchmarks/results/study2/cells, so killing it (or ending the
# session) loses at most the cell in progress, which resumes from its run directory if that survived, or starts
# over if not. The pre-registered block and the LR-search protocol are fixed by the first committed cell
# (benchmarks/results/study2/cells/protocol.json); a changed block is refused.
set -euo pipefail
cd "$(dirname "$0")/.."
KT=${KAPPATUNE:-.venv/bin/kappatune}
[ -x "$KT" ] || KT=kappatune
if [ "${1:-}" = "--report" ]; then
  shift
  exec "$KT" bench configs/study2.yaml --report "$@"
fi
"$KT" bench configs/study2.yaml --commit "$@"
"$KT" bench configs/study2.yaml --report
