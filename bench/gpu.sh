#!/usr/bin/env bash
# GPU benchmarks: the adaptation step (2) and encoding (3) in bf16 with sdpa on one CUDA GPU, with the
# peak bf16 matmul rate as the MFU reference. Results go to OUT/BENCHMARKS.md and OUT/log.txt.
# About 2-3 minutes on an H100 (most of it loading); the bundled model and data need no network.
#   bash bench/gpu.sh OUT_DIR       (from the repository root, with the .venv that `make install` made)
set -euo pipefail
OUT=${1:?usage: bash bench/gpu.sh OUT_DIR}
PY=${PY:-.venv/bin/python}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
"$PY" bench/suite.py --device cuda --only adapt encode lastlayer --adapt-lengths 128 512 --batch-size 8 --repeats 5 \
  --passages 2048 --encode-batch 128 --output "$OUT/BENCHMARKS.md" 2>&1 | tee "$OUT/log.txt"
