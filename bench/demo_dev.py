"""Dev runs beside a finished demo: fine-tune its adapted (or unadapted) model with other settings and
score the result on its dev sets (BBC dev and Lee dev), never on test. One JSON line per run is printed
and appended to DEMO/dev_runs.jsonl.

    python bench/demo_dev.py --demo runs/demo-full --queries 480 --passage-length 64
    python bench/demo_dev.py --demo runs/demo-full --queries 240 --passage-length 128
    python bench/demo_dev.py --demo runs/demo-full --model-folder runs/demo-full/finetuned/full-lr5e-5/unadapted-n240-s0
    python bench/demo_dev.py --demo runs/demo-full --queries 480 --passage-length 128 --lr 2e-5
    python bench/demo_dev.py --demo runs/demo-full --queries 480 --passage-length 128 --adapt-length 128

With --adapt-length, --adapt-lr or --adapt-steps, the SmolLM2 model is first adapted afresh with those
settings (the demo's own `run_adapt` on its adaptation corpus; the preset's for the rest), scored zero-shot
on the dev sets, and then fine-tuned. With --interpolate A, the fine-tuned weights are mixed with those
of the model they were fine-tuned from (A x fine-tuned + (1 - A) x base; rows of placeholders the base
lacks start from the mean row, as fine-tuning initialised them) and the mix is scored instead:

    python bench/demo_dev.py --demo runs/demo-full --base unadapted --passage-length 128 --interpolate 0.8 \
        --model-folder runs/demo-full/finetuned/full-lr5e-5/unadapted-n480-s0

The fine-tuning is the demo's own (`run_finetune`: its preset's batch, group size, temperature and
precision, the chosen query prompt, lr 5e-5 on all weights, BM25 negatives, one pass), and so is
the scoring (`evaluate_system`, with the preset's backend); --lr changes the peak learning rate, --seed
the seed (0 by default), --query-prompt the query prompt (the demo's chosen one by default).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from llama2vec.demo import FULL_5E5, PRESETS, resolve_speed, run_adapt, run_finetune, steps_for
from llama2vec.demo import evaluate_system as score
from llama2vec.models import resolve_model_path


def interpolate(tuned: Path, base: Path, alpha: float, out: Path) -> Path:
    """A model folder like `tuned` whose weights are alpha x tuned + (1 - alpha) x base."""
    from safetensors.torch import load_file

    from llama2vec.store import atomic_folder

    if (out / "model.safetensors").is_file():
        return out
    a, b = load_file(tuned / "model.safetensors"), load_file(base / "model.safetensors")
    mixed = {}
    for key, w in a.items():
        w0 = b[key].float()
        if w0.shape != w.shape:  # placeholder rows added at fine-tuning, initialised to the mean row
            w0 = torch.cat([w0, w0.mean(0, keepdim=True).expand(w.shape[0] - w0.shape[0], -1)])
        mixed[key] = (alpha * w.float() + (1 - alpha) * w0).to(w.dtype).contiguous()
    with atomic_folder(out) as tmp:
        shutil.copytree(tuned, tmp, dirs_exist_ok=True, ignore=shutil.ignore_patterns("model.safetensors", "logs",
                                                                                        "checkpoints", "log.jsonl"))
        save_file(mixed, tmp / "model.safetensors", metadata={"format": "pt"})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--demo", required=True, help="A finished demo folder.")
    parser.add_argument("--preset", default="full")
    parser.add_argument("--queries", type=int, default=240, help="Training queries (one pass).")
    parser.add_argument("--passage-length", type=int, default=64)
    parser.add_argument("--base", choices=["adapted", "unadapted"], default="adapted")
    parser.add_argument("--model-folder", help="Score this fine-tuned folder instead of training one.")
    parser.add_argument("--lr", type=float, default=FULL_5E5.learning_rate, help="Peak fine-tuning learning rate.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--adapt-length", type=int, help="Adapt afresh on chunks of this many tokens.")
    parser.add_argument("--adapt-lr", type=float, help="Adapt afresh with this peak learning rate.")
    parser.add_argument("--adapt-steps", type=int, help="Adapt afresh for this many steps.")
    parser.add_argument("--query-prompt", choices=["next", "self"],
                        help="Fine-tune and score with this query prompt (default: the demo's chosen one).")
    parser.add_argument("--interpolate", type=float, help="Score A x fine-tuned + (1 - A) x base weights.")
    args = parser.parse_args()
    torch.set_flush_denormal(True)
    demo = Path(args.demo)
    report = json.loads((demo / "report.json").read_text())
    prompt = args.query_prompt or report["settings"]["query_prompt"]
    s = resolve_speed(dataclasses.replace(PRESETS[args.preset], query_prompt=prompt,
                                          passage_max_length=args.passage_length))
    fresh = any(v is not None for v in (args.adapt_length, args.adapt_lr, args.adapt_steps))
    adapted = demo / "adapted"
    row: dict = {}
    if fresh:
        a = dataclasses.replace(s, adapt_max_length=args.adapt_length or s.adapt_max_length,
                                adapt_lr=args.adapt_lr or s.adapt_lr, adapt_steps=args.adapt_steps or s.adapt_steps)
        adapted = demo / "dev_runs" / f"adapted-L{a.adapt_max_length}-lr{a.adapt_lr:g}-s{a.adapt_steps}"
        t = time.time()
        run_adapt(demo / "data" / "adapt_corpus.jsonl", adapted, a)
        row.update(adapted=str(adapted), adapt_s=round(time.time() - t))
        for dev in ("dev", "lee-dev"):
            out = demo / "dev_runs" / f"{adapted.name}-p{args.passage_length}-{dev}.json"
            row[f"zero-shot-{dev}"] = score(str(adapted), demo / "data" / dev, out, s)["ndcg@10"]
    base_tag = adapted.name if fresh else args.base
    name = f"{base_tag}-n{args.queries}-p{args.passage_length}-lr{args.lr:g}-s{args.seed}"
    if args.query_prompt:
        name += f"-q{args.query_prompt}"
    folder = Path(args.model_folder) if args.model_folder else demo / "dev_runs" / name
    t = time.time()
    if not args.model_folder:
        base = str(adapted) if args.base == "adapted" else s.base_model
        recipe = dataclasses.replace(FULL_5E5, learning_rate=args.lr)
        run_finetune(base, demo / "data" / "bbc" / "train.jsonl", args.queries, steps_for(args.queries, s),
                     args.seed, folder, s, recipe)
    row.update({"model": str(folder), "query_prompt": prompt, "queries": args.queries,
                "passage_length": args.passage_length, "lr": args.lr, "seed": args.seed,
                "train_s": round(time.time() - t)})
    if args.interpolate is not None:
        base = str(adapted) if args.base == "adapted" else resolve_model_path(s.base_model)
        mixed = demo / "dev_runs" / f"{folder.name}-a{args.interpolate:g}"
        folder = interpolate(folder, Path(base), args.interpolate, mixed)
        row.update(model=str(folder), interpolate=args.interpolate)
    for dev in ("dev", "lee-dev"):
        out = demo / "dev_runs" / f"{folder.name}-p{args.passage_length}-{dev}.json"
        row[dev] = score(str(folder), demo / "data" / dev, out, s)["ndcg@10"]
    row["mean"] = (row["dev"] + row["lee-dev"]) / 2
    print(json.dumps(row))
    with open(demo / "dev_runs.jsonl", "a") as fh:
        fh.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
