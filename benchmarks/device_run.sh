#!/usr/bin/env bash
# The GPU-machine run (one call, < 5 minutes): GPU analysis speed vs PEFT, then the streaming scan with its numerics
# on the GPU (tensors still read one at a time on the host). Results go to $OUT (default benchmarks/results/device).
# Usage from a checkout on a CUDA machine with torch/transformers/peft/safetensors:
#   OUT=dir bash benchmarks/device_run.sh            (PY=python-to-use, default python3)
set -u
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
OUT=${OUT:-benchmarks/results/device}
PY=${PY:-python3}
mkdir -p "$OUT"
{ nvidia-smi -L; nproc; uptime; $PY -c "import torch, transformers, peft; print(torch.__version__, transformers.__version__, peft.__version__)"; } > "$OUT/device_info.txt" 2>&1
cat "$OUT/device_info.txt"
# Both tools on the same GPU; SmolLM2-135M shapes and one Llama-3-8B layer (~1-2 min on an H100/H200).
timeout 150 $PY benchmarks/analysis_speed.py --real --skip-kappatune-loop --device cuda --repeats 2 --out "$OUT/analysis_speed_gpu.txt"
# A 3 GB bf16 checkpoint written to local disk, scanned with the numerics on the GPU (~1-2 min).
timeout 120 $PY benchmarks/stream_scan.py --gb 3 --device cuda --out "$OUT/stream_scan_gpu.txt"
ls -l "$OUT"
