"""Padded share of the tokens an adaptation step processes, with and without length grouping, on
the real Wikipedia chunk pairs (SmolLM2 tokenizer). Pure bookkeeping: no model runs.

    python bench/padding.py --lengths 128 512 --batch-size 8
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from report import append_report, markdown_table

from llama2vec.config import PromptConfig
from llama2vec.data import PairDataset, build_pair_cache, build_wiki
from llama2vec.models import load_tokenizer, resolve_model_path
from llama2vec.prompts import prompt_ids, resolve_prompt
from llama2vec.train import EpochSampler, padding_fraction


def measure(lengths: list[int], batch_size: int) -> tuple[list[tuple], int]:
    """([(chunk tokens, pairs, mean text tokens, padding random, padding grouped)], prompt tokens)."""
    tok = load_tokenizer(resolve_model_path("smollm2"))
    spec = resolve_prompt(PromptConfig())
    tok.add_special_tokens({"additional_special_tokens": spec.new_tokens()}, replace_extra_special_tokens=False)
    ids = prompt_ids(spec, tok)
    fixed = len(ids.bos + ids.prefix) + len(ids.self_suffix) + len(ids.next_suffix)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "wiki.jsonl"
        build_wiki(corpus)
        for length in lengths:
            ds = PairDataset(build_pair_cache(corpus, tok, Path(tmp) / f"c{length}", length))
            text_lengths = ds.text_lengths()
            plain = list(EpochSampler(len(ds), 0))
            grouped = list(EpochSampler(len(ds), 0, lengths=text_lengths, batch_size=batch_size))
            rows.append((length, len(ds), text_lengths.mean(),
                         padding_fraction(text_lengths, plain, batch_size, fixed),
                         padding_fraction(text_lengths, grouped, batch_size, fixed)))
    return rows, fixed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--output", default="BENCHMARKS.md")
    args = parser.parse_args()

    rows, fixed = measure(args.lengths, args.batch_size)
    table = markdown_table(
        ["chunk tokens", "pairs", "mean text tokens", "padding, random batches", "padding, length-grouped"],
        [[str(r[0]), str(r[1]), f"{r[2]:.1f}", f"{r[3]:.1%}", f"{r[4]:.1%}"] for r in rows])
    append_report(args.output, f"Padding in adaptation batches (batch {args.batch_size})",
                  f"python bench/padding.py --lengths {' '.join(map(str, args.lengths))} "
                  f"--batch-size {args.batch_size}",
                  f"share of all processed token slots (text plus the {fixed} prompt tokens of the joint layout) "
                  "that are padding, over one epoch of the Wikipedia sample's pairs.", table)


if __name__ == "__main__":
    main()
