"""Building the adaptation pair cache of a 100k-document corpus (SmolLM2 tokenizer), with 1 and with N
chunking processes in one run; the caches must be identical.

    python bench/chunking.py --documents 100000 --workers 1 2

The corpus is made from the bundled Wikipedia sample: document d is 2 to 4 consecutive paragraphs starting
at paragraph d mod P (real prose, about 300 words a document).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from report import append_report, machine, markdown_table

from llama2vec.config import PromptConfig
from llama2vec.data import build_pair_cache, wiki_documents
from llama2vec.models import add_placeholder_tokens, load_tokenizer, resolve_model_path
from llama2vec.prompts import resolve_prompt


def write_corpus(path: Path, documents: int) -> int:
    """Write `documents` JSONL documents; returns their words."""
    paragraphs = [p for d in wiki_documents() for p in d.text.split("\n\n") if len(p.split()) >= 30]
    words = 0
    with path.open("w") as fh:
        for d in range(documents):
            start = d % len(paragraphs)
            text = "\n\n".join(paragraphs[start: start + 2 + d % 3])
            words += len(text.split())
            fh.write(json.dumps({"id": str(d), "title": f"Document {d}", "text": text}) + "\n")
    return words


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--documents", type=int, default=100_000)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--chunk-tokens", type=int, default=128)
    parser.add_argument("--output", default="BENCHMARKS.md")
    args = parser.parse_args()

    tok = load_tokenizer(resolve_model_path("smollm2"))
    add_placeholder_tokens(tok, None, resolve_prompt(PromptConfig()).new_tokens())
    rows, caches = [], []
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.jsonl"
        words = write_corpus(corpus, args.documents)
        base = None
        for workers in args.workers:
            start = time.perf_counter()
            folder = build_pair_cache(corpus, tok, Path(tmp) / f"pairs-{workers}", args.chunk_tokens, workers=workers)
            seconds = time.perf_counter() - start
            meta = json.loads((folder / "meta.json").read_text())
            caches.append((folder / "tokens.bin").read_bytes() + (folder / "pairs.npy").read_bytes())
            base = base or seconds
            rows.append([str(workers), f"{seconds:.1f}", f"{args.documents / seconds:,.0f}",
                         f"{meta['tokens'] / seconds:,.0f}", f"{base / seconds:.2f}x", f"{meta['pairs']:,}"])
    same = all(c == caches[0] for c in caches)
    table = markdown_table(["workers", "seconds", "documents/s", "tokens/s", "speed-up", "pairs"], rows)
    append_report(args.output, f"Chunking {args.documents:,} documents into adaptation pairs",
                  f"python bench/chunking.py --documents {args.documents} --workers "
                  f"{' '.join(map(str, args.workers))}",
                  f"{machine()}; {words:,} words, chunks of {args.chunk_tokens} tokens (SmolLM2 tokenizer); "
                  f"the caches are {'identical' if same else 'DIFFERENT'}.", table)


if __name__ == "__main__":
    main()
