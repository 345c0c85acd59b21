#!/usr/bin/env bash
# The GPU-machine run behind benchmarks/results/*_gpu.txt (one call: GPU speed, streaming scan, CPU speed).
# Usage from a checkout on a CUDA machine with torch/transformers/peft/safetensors: OUT=dir bash benchmarks/device_run.sh
set -u
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
nvidia-smi -L; nproc; python3 -c "import torch, transformers, peft; print(torch.__version__, transformers.__version__, peft.__version__)"
timeout 170 python3 benchmarks/analysis_speed.py --real --skip-kappatune-loop --device cuda --repeats 3 --out "$OUT/analysis_speed_gpu.txt"
timeout 230 python3 benchmarks/stream_scan.py --gb 6 --out "$OUT/stream_scan.txt"
timeout 170 python3 benchmarks/analysis_speed.py --real --skip-kappatune-loop --device cpu --repeats 2 --out "$OUT/analysis_speed_gpu_machine_cpu.txt"
