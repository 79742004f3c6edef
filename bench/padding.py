"""Padded share of the tokens an adaptation step processes, with and without length grouping, on
the real Wikipedia chunk pairs (SmolLM2 tokenizer). Pure bookkeeping: no model runs.

    python bench/padding.py --lengths 128 512 --batch-size 8
"""

from __future__ import annotations

import argparse
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from llama2vec.config import PromptConfig
from llama2vec.data import PairDataset, build_pair_cache, build_wiki
from llama2vec.models import load_tokenizer, resolve_model_path
from llama2vec.prompts import prompt_ids, resolve_prompt
from llama2vec.train import EpochSampler


def fraction(lengths: np.ndarray, order: list[int], batch: int, fixed: int) -> float:
    """Padding over all processed token slots; every row also carries `fixed` prompt tokens."""
    pad = slots = 0
    for start in range(0, len(order) - batch + 1, batch):
        rows = lengths[order[start: start + batch]]
        pad += int(rows.max() * batch - rows.sum())
        slots += int((rows.max() + fixed) * batch)
    return pad / slots


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--output", default="BENCHMARKS.md")
    args = parser.parse_args()

    tok = load_tokenizer(resolve_model_path("smollm2"))

    spec = resolve_prompt(PromptConfig())
    tok.add_special_tokens({"additional_special_tokens": spec.new_tokens()}, replace_extra_special_tokens=False)
    ids = prompt_ids(spec, tok)
    fixed = len(ids.bos + ids.prefix) + len(ids.self_suffix) + len(ids.next_suffix)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "wiki.jsonl"
        build_wiki(corpus)
        for length in args.lengths:
            ds = PairDataset(build_pair_cache(corpus, tok, Path(tmp) / f"c{length}", length))
            lengths = ds.text_lengths()
            plain = list(EpochSampler(len(ds), 0))
            grouped = list(EpochSampler(len(ds), 0, lengths=lengths, batch_size=args.batch_size))
            rows.append((length, len(ds), lengths.mean(), fraction(lengths, plain, args.batch_size, fixed),
                         fraction(lengths, grouped, args.batch_size, fixed)))
    table = ("| chunk tokens | pairs | mean text tokens | padding, random batches | padding, length-grouped |\n"
             "|---|---|---|---|---|\n" + "".join(
                 f"| {r[0]} | {r[1]} | {r[2]:.1f} | {r[3]:.1%} | {r[4]:.1%} |\n" for r in rows))
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    report = (f"\n## Padding in adaptation batches (batch {args.batch_size})\n\n{stamp}; "
              f"`python bench/padding.py --lengths {' '.join(map(str, args.lengths))} --batch-size {args.batch_size}`; "
              f"share of all processed token slots (text plus the {fixed} prompt tokens of the joint layout) "
              f"that are padding, over one epoch of the Wikipedia sample's pairs.\n\n{table}")
    print(report)
    with open(args.output, "a") as fh:
        fh.write(report)


if __name__ == "__main__":
    main()
