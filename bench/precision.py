"""Training and encoding steps of the bundled SmolLM2 in float32 against bfloat16, side by side.

The steps are the real ones: an adaptation step (the joint EBAE + EBAR pass on real Wikipedia windows)
and a fine-tuning step (InfoNCE over real BBC headlines and articles, 4 queries x 4 passages), each with
forward, backward and AdamW on float32 weights, the bfloat16 variant under autocast as
`--precision bf16-mixed` runs it; and an encoding batch (16 passages) with float32 and bfloat16 weights as
`--backend torch` and `--backend torch-bfloat16` run it. Variants alternate; each figure is the median of
the repeats. Results are printed and appended to BENCHMARKS.md.

    python bench/precision.py --lengths 64 128 --repeats 3
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from contextlib import nullcontext
from dataclasses import replace

import torch
from adapt_step import passages
from report import append_report, machine, markdown_table

from llama2vec.bbc import read_articles
from llama2vec.collate import PretextCollator, excluded_target_ids
from llama2vec.config import ModelConfig, PromptConfig
from llama2vec.finetune import ContrastiveCollator, ContrastiveModel
from llama2vec.losses import PretextModel, PretextWeights, last_states
from llama2vec.models import add_placeholder_tokens, load_causal_lm
from llama2vec.prompts import prompt_ids, resolve_prompt


def timed(fn, repeats: int) -> dict[str, float]:
    """fn(variant) for the variants float32 and bfloat16, alternating, after one warm-up round."""
    times: dict[str, list[float]] = {"float32": [], "bfloat16": []}
    for r in range(repeats + 1):
        for variant in times:
            t = time.perf_counter()
            fn(variant)
            if r:
                times[variant].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def measure(lengths: list[int], repeats: int) -> list[list[str]]:
    tok, model, _ = load_causal_lm(ModelConfig(device="cpu", dtype="float32"))
    spec = resolve_prompt(PromptConfig())
    add_placeholder_tokens(tok, model, spec.new_tokens())
    ids = prompt_ids(spec, tok)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-7)
    articles = read_articles()[:16]
    weights = {"float32": model, "bfloat16": copy.deepcopy(model).to(torch.bfloat16)}  # as torch-bfloat16 loads

    def autocast(variant: str):
        return torch.autocast("cpu", dtype=torch.bfloat16) if variant == "bfloat16" else nullcontext()

    def train_step(module, batch):
        def step(variant: str) -> None:
            with autocast(variant):
                out = module(**batch)
            out["loss"].backward()
            opt.step()
            opt.zero_grad()

        return step

    rows = []
    for length in lengths:
        model.train()
        windows = passages(tok, length, 9)
        pretext = PretextCollator(ids, tok.pad_token_id, excluded_target_ids(tok, ids), length, joint=True)
        batch = pretext([{"text": windows[i], "next": windows[i + 1]} for i in range(8)])
        rows.append(("adaptation step (batch 8)", length,
                     timed(train_step(PretextModel(model, PretextWeights()), batch), repeats)))
        short = replace(spec, query_task="self", query_max_length=32, max_length=length)
        collate = ContrastiveCollator(tok, ids, short)
        batch = collate([{"query": articles[4 * i].headline, "passages": [a.body for a in articles[4 * i: 4 * i + 4]]}
                         for i in range(4)])
        batch.pop("n_tokens")
        contrastive = ContrastiveModel(model, ids.k, spec.pooling, 0.02, 4, cross_device=False)
        rows.append(("fine-tuning step (4 x 4)", length, timed(train_step(contrastive, batch), repeats)))

        model.eval()
        p = {k.removeprefix("p_"): v for k, v in batch.items() if k.startswith("p_")}

        def encode(variant: str, p: dict = p) -> None:
            with torch.no_grad():
                last_states(weights[variant], p["input_ids"], p["position_ids"], p["attention_mask"], ids.k)

        rows.append(("encoding 16 passages", length, timed(encode, repeats)))
    return [[name, str(length), f"{t['float32']:.2f}", f"{t['bfloat16']:.2f}", f"{t['float32'] / t['bfloat16']:.2f}x"]
            for name, length, t in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", default="BENCHMARKS.md")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_flush_denormal(True)
    table = markdown_table(["step", "passage tokens", "float32 (s)", "bfloat16 (s)", "bfloat16 speed-up"],
                           measure(args.lengths, args.repeats))
    append_report(args.output, "Training and encoding in bfloat16 on the CPU (SmolLM2-135M)",
                  f"python bench/precision.py --lengths {' '.join(map(str, args.lengths))} --repeats {args.repeats}",
                  f"{machine()}; median of {args.repeats} per variant, variants alternating; training steps "
                  "(forward, backward, AdamW on float32 weights) in float32 or under bfloat16 autocast "
                  "(`--precision bf16-mixed`); encoding with float32 or bfloat16 weights "
                  "(`--backend torch` / `torch-bfloat16`).", table)


if __name__ == "__main__":
    main()
