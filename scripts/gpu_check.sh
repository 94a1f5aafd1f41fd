#!/usr/bin/env bash
# Exercise every CUDA path of cnnkit once and print a pass/fail table with timings (details and the
# list of rows: scripts/gpu_check.py). Runs unchanged on a machine without a GPU: the CPU rows run,
# it says so, and exits 0. Exit 1 if any row failed.
#
#   bash scripts/gpu_check.sh [DATA]          # DATA: training/ + testing/ (default: the bundled digits)
#
# It needs cnnkit with the `train` extra and ONE onnxruntime: `pip install -e '.[gpu,train,bench]'` on a
# GPU machine (onnxruntime-gpu, never beside onnxruntime). Budget: about 8 minutes on one GPU with
# Fashion-MNIST (60,000 training PNGs).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if [ -x .venv/bin/python ]; then PY=.venv/bin/python; fi
exec "$PY" scripts/gpu_check.py "$@" --json gpu-check.json
