#!/usr/bin/env bash
# GPU benchmarks, one script for a lent GPU (under 8 minutes on an H100 or H200; the bundled model and data
# need no network): the adaptation step (joint pass and two passes, MFU against the measured bf16 matmul
# peak) and encoding in bf16 with sdpa, then training through the command line (adapt and finetune in
# bf16-mixed and bf16, finetune with flash-attention where installed, a short --fsdp run with 2+ GPUs), then the
# dry run's memory plan against the CUDA allocator's peak (bench/plan_memory.py --device cuda).
# Results, with the card, go to OUT/BENCHMARKS.md; logs to OUT/log.txt.
#   bash bench/gpu.sh OUT_DIR       (from the repository root, with the .venv that `make install` made)
set -euo pipefail
OUT=${1:?usage: bash bench/gpu.sh OUT_DIR}
PY=${PY:-.venv/bin/python}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
"$PY" bench/suite.py --device cuda --only adapt encode lastlayer --adapt-lengths 128 512 --batch-size 8 --repeats 5 \
  --passages 2048 --encode-batch 128 --output "$OUT/BENCHMARKS.md" 2>&1 | tee "$OUT/log.txt"
"$PY" bench/train_runs.py --device cuda --precision bf16-mixed bf16 --attn sdpa flash_attention_2 --steps 15 \
  --output "$OUT/BENCHMARKS.md" 2>&1 | tee -a "$OUT/log.txt"
"$PY" bench/plan_memory.py --device cuda --output "$OUT/BENCHMARKS.md" 2>&1 | tee -a "$OUT/log.txt"
