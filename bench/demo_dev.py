"""Dev runs beside a finished demo: fine-tune its adapted (or unadapted) model with other settings and
score the result on its dev sets (BBC dev and Lee dev), never on test. One JSON line per run is printed
and appended to DEMO/dev_runs.jsonl.

    python bench/demo_dev.py --demo runs/demo-full --queries 480 --passage-length 64
    python bench/demo_dev.py --demo runs/demo-full --queries 240 --passage-length 128
    python bench/demo_dev.py --demo runs/demo-full --model-folder runs/demo-full/finetuned/full-lr5e-5/unadapted-n240-s0

The fine-tuning is the demo's own (`run_finetune`: its preset's batch, group size, temperature and
precision, the chosen query prompt, seed 0, lr 5e-5 on all weights, BM25 negatives, one pass), and so is
the scoring (`evaluate_system`, with the preset's backend).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

from llama2vec.demo import FULL_5E5, PRESETS, resolve_speed, run_finetune, steps_for
from llama2vec.demo import evaluate_system as score


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--demo", required=True, help="A finished demo folder.")
    parser.add_argument("--preset", default="full")
    parser.add_argument("--queries", type=int, default=240, help="Training queries (one pass).")
    parser.add_argument("--passage-length", type=int, default=64)
    parser.add_argument("--base", choices=["adapted", "unadapted"], default="adapted")
    parser.add_argument("--model-folder", help="Score this fine-tuned folder instead of training one.")
    args = parser.parse_args()
    torch.set_flush_denormal(True)
    demo = Path(args.demo)
    report = json.loads((demo / "report.json").read_text())
    s = resolve_speed(dataclasses.replace(PRESETS[args.preset], query_prompt=report["settings"]["query_prompt"],
                                          passage_max_length=args.passage_length))
    name = f"{args.base}-n{args.queries}-p{args.passage_length}"
    folder = Path(args.model_folder) if args.model_folder else demo / "dev_runs" / name
    t = time.time()
    if not args.model_folder:
        base = str(demo / "adapted") if args.base == "adapted" else s.base_model
        run_finetune(base, demo / "data" / "bbc" / "train.jsonl", args.queries, steps_for(args.queries, s), 0,
                     folder, s, FULL_5E5)
    row: dict = {"model": str(folder), "queries": args.queries, "passage_length": args.passage_length,
                 "train_s": round(time.time() - t)}
    for dev in ("dev", "lee-dev"):
        out = demo / "dev_runs" / f"{folder.name}-p{args.passage_length}-{dev}.json"
        row[dev] = score(str(folder), demo / "data" / dev, out, s)["ndcg@10"]
    row["mean"] = (row["dev"] + row["lee-dev"]) / 2
    print(json.dumps(row))
    with open(demo / "dev_runs.jsonl", "a") as fh:
        fh.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
