"""`llama2vec mine`: hard negatives from BM25 or from a dense model, sampled from a rank range,
positives never included."""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

from .errors import Llama2VecError
from .formats import Qrels, Run, passage_text, read_beir, read_corpus, read_train, write_jsonl_rows


def sample_negatives(run: Run, positives: dict[str, set[str]], n: int, rank_range: tuple[int, int], seed: int,
                     texts: dict[str, str] | None = None) -> dict[str, list[str]]:
    """Per query, up to n doc ids drawn (seeded, per query) from ranks lo..hi (1-based, inclusive)
    of its ranking with the positives removed. With `texts`, a document whose text equals a
    positive's text counts as a positive too."""
    lo, hi = rank_range
    if not 1 <= lo <= hi:
        raise Llama2VecError(f"rank range must satisfy 1 <= low <= high, got {lo}-{hi}")
    out = {}
    for qid, docs in run.items():
        pos = positives.get(qid, set())
        pos_texts = {texts[p] for p in pos if p in texts} if texts else set()
        ranked = [d for d, _ in sorted(docs.items(), key=lambda kv: -kv[1])
                  if d not in pos and not (texts and texts.get(d) in pos_texts)]
        pool = ranked[lo - 1: hi]
        rng = random.Random(int(hashlib.sha1(f"{seed}:{qid}".encode()).hexdigest(), 16))
        out[qid] = rng.sample(pool, min(n, len(pool)))
    return out


def _depth(qrels: Qrels, rank_range: tuple[int, int]) -> int:
    """Ranks to retrieve: the sampled range plus room for the positives removed from it."""
    return rank_range[1] + max((len(v) for v in qrels.values()), default=0)


def mine_bm25(corpus: dict[str, str], queries: dict[str, str], qrels: Qrels, n: int,
              rank_range: tuple[int, int] = (10, 100), seed: int = 0) -> dict[str, list[str]]:
    from .bm25 import BM25

    index = BM25(list(corpus), list(corpus.values()))
    qids = list(queries)
    run = index.search(qids, [queries[q] for q in qids], k=_depth(qrels, rank_range))
    return sample_negatives(run, {q: set(d) for q, d in qrels.items()}, n, rank_range, seed, corpus)


def mine_dense(encoder, corpus: dict[str, str], queries: dict[str, str], qrels: Qrels, n: int,
               rank_range: tuple[int, int] = (10, 100), seed: int = 0, batch_size: int = 16) -> dict[str, list[str]]:
    from .index import exact_search

    doc_ids, qids = list(corpus), list(queries)
    p = encoder.encode_corpus([corpus[d] for d in doc_ids], batch_size=batch_size)
    q = encoder.encode_queries([queries[x] for x in qids], batch_size=batch_size)
    run = exact_search(q, p, qids, doc_ids, _depth(qrels, rank_range))
    return sample_negatives(run, {x: set(d) for x, d in qrels.items()}, n, rank_range, seed, corpus)


def train_qrels(examples: list, texts: dict[str, str]) -> tuple[dict[str, str], Qrels]:
    """Training examples as queries q0, q1, ... and qrels over `texts` (id -> passage text), a
    positive found by its text. A positive outside `texts` is added to it, so that it can be excluded."""
    by_text = {t: d for d, t in texts.items()}
    queries = {f"q{i}": e.query for i, e in enumerate(examples)}
    qrels: Qrels = {}
    for i, e in enumerate(examples):
        ids = {by_text[p] for p in e.pos if p in by_text}
        qrels[f"q{i}"] = {d: 1 for d in ids}
        if not ids:
            for p in e.pos:
                texts[f"x{len(texts)}"] = p
                qrels[f"q{i}"][f"x{len(texts) - 1}"] = 1
    return queries, qrels


def mine(output: str | Path, train: str | None = None, dataset: str | None = None, split: str = "train",
         corpus: str | None = None, method: str = "bm25", model: str | None = None, negatives: int = 15,
         rank_range: tuple[int, int] = (10, 100), seed: int = 0, batch_size: int = 16) -> int:
    """Write a training JSONL with mined negatives, from a training file (its negatives are
    replaced; candidates are `corpus` or every passage in the file) or from a BEIR split.
    Returns the number of examples written."""
    if (train is None) == (dataset is None):
        raise Llama2VecError("give exactly one of --train FILE or --dataset DIR")
    if dataset is not None:
        beir = read_beir(dataset, split)
        texts = {d: passage_text(doc) for d, doc in beir.corpus.items()}
        queries, qrels = beir.queries, beir.qrels
    else:
        examples = read_train(train)
        if corpus:
            texts = {d: passage_text(doc) for d, doc in read_corpus(Path(corpus)).items()}
        else:
            pool = dict.fromkeys(p for e in examples for p in e.pos + e.neg)
            texts = {f"p{i}": t for i, t in enumerate(pool)}
        queries, qrels = train_qrels(examples, texts)
    if not queries:
        raise Llama2VecError(f"{dataset or train}: no queries to mine negatives for")
    if not texts:
        raise Llama2VecError(f"{corpus or dataset or train}: no passages to mine negatives from")
    if method == "bm25":
        negs = mine_bm25(texts, queries, qrels, negatives, rank_range, seed)
    elif method == "dense":
        if not model:
            raise Llama2VecError("--method dense needs --model")
        from .encoder import Llama2Vec

        negs = mine_dense(Llama2Vec.from_pretrained(model), texts, queries, qrels, negatives, rank_range, seed,
                          batch_size)
    else:
        raise Llama2VecError(f"--method must be bm25 or dense, got {method!r}")
    rows = [{"query_id": q, "query": queries[q], "pos": [texts[d] for d in qrels[q]],
             "neg": [texts[d] for d in negs[q]]} for q in queries]
    write_jsonl_rows(Path(output), rows)
    return len(rows)
