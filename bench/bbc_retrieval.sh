#!/usr/bin/env bash
# BBC test retrieval table: BM25, all-MiniLM-L6-v2, SmolLM2 without training, and SmolLM2 fine-tuned
# on BBC train without adaptation; with ADAPTED=<adapted model folder>, that model zero-shot too.
# Every figure comes from the commands below, run here.
#   bash bench/bbc_retrieval.sh [OUT_DIR] [FINETUNE_STEPS]
set -euo pipefail
OUT=${1:-runs/bbc}
STEPS=${2:-100}
L2V=${L2V:-.venv/bin/llama2vec}
mkdir -p "$OUT"
start=$(date +%s)
[ -f "$OUT/data/corpus.jsonl" ] || $L2V data bbc --output "$OUT/data"
for system in bm25 minilm smollm2; do
  [ -f "$OUT/$system.json" ] || $L2V evaluate --model $system --dataset "$OUT/data" --split test --output "$OUT/$system.json"
done
$L2V finetune --model smollm2 --train "$OUT/data/train.jsonl" --output "$OUT/smollm2-finetuned" --resume \
  --full --learning-rate 2e-5 --warmup-steps 5 --max-steps "$STEPS" --batch-size 4 --group-size 4 \
  --temperature 0.02 --query-max-length 32 --passage-max-length 128 --logging-steps 5 --save-steps 25
[ -f "$OUT/smollm2-finetuned.json" ] || $L2V evaluate --model "$OUT/smollm2-finetuned" --dataset "$OUT/data" \
  --split test --output "$OUT/smollm2-finetuned.json"
if [ -n "${ADAPTED:-}" ] && [ ! -f "$OUT/smollm2-adapted.json" ]; then
  $L2V evaluate --model "$ADAPTED" --dataset "$OUT/data" --split test --output "$OUT/smollm2-adapted.json"
fi
.venv/bin/python - "$OUT" "$STEPS" "$(( $(date +%s) - start ))" <<'PY'
import json, sys
from pathlib import Path
from llama2vec.metrics import format_table
out, steps, secs = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
names = ("bm25", "minilm", "smollm2", "smollm2-adapted", "smollm2-finetuned")
rows = {n: json.loads((out / f"{n}.json").read_text()) for n in names if (out / f"{n}.json").is_file()}
print(format_table(rows, ("ndcg@10", "mrr@10", "recall@100", "map")))
print(f"smollm2-finetuned: {steps} steps of 4 queries x 4 passages; this run took {secs} s")
PY
