"""Retrieval file formats: BEIR folders, training JSONL, TREC run files, embedding files.

- BEIR folder: ``corpus.jsonl`` ({"_id", "title", "text"}), ``queries.jsonl`` ({"_id", "text"}),
  ``qrels/<split>.tsv`` (header ``query-id corpus-id score``, then tab-separated rows).
- Training JSONL: {"query": str, "pos": [str, ...], "neg": [str, ...]} per line (the FlagEmbedding /
  Tevatron layout; extra keys are kept but ignored).
- TREC run: ``qid Q0 docid rank score tag`` per line, whitespace separated.

Every reader names the file, line and field of anything wrong.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .data import _field, _lines, read_objects
from .errors import Llama2VecError
from .store import atomic_write, check_text, write_lines

if TYPE_CHECKING:
    import numpy as np

Qrels = dict[str, dict[str, int]]  # query id -> {doc id: relevance}
Run = dict[str, dict[str, float]]  # query id -> {doc id: score}


# --------------------------------------------------------------------------------------------
# JSONL helpers


def write_jsonl_rows(path: Path, rows: Iterable[dict]) -> int:
    """Write rows as JSONL atomically; returns the row count."""
    return write_lines(path, (json.dumps(r, ensure_ascii=False) for r in rows))


# --------------------------------------------------------------------------------------------
# BEIR


@dataclass
class BeirDataset:
    corpus: dict[str, dict[str, str]]  # doc id -> {"title", "text"}
    queries: dict[str, str]  # query id -> text
    qrels: Qrels  # of one split


def read_corpus(path: Path) -> dict[str, dict[str, str]]:
    corpus: dict[str, dict[str, str]] = {}
    for where, obj in read_objects(path):
        doc_id = _field(obj, "_id", where, required=True)
        if doc_id in corpus:
            raise Llama2VecError(f"{where}: duplicate _id {doc_id!r}")
        corpus[doc_id] = {"title": _field(obj, "title", where, required=False),
                          "text": _field(obj, "text", where, required=True)}
    return corpus


def read_queries(path: Path) -> dict[str, str]:
    queries: dict[str, str] = {}
    for where, obj in read_objects(path):
        qid = _field(obj, "_id", where, required=True)
        if qid in queries:
            raise Llama2VecError(f"{where}: duplicate _id {qid!r}")
        queries[qid] = _field(obj, "text", where, required=True)
    return queries


def read_qrels(path: Path) -> Qrels:
    """A BEIR qrels TSV (with header) or a TREC qrels file (qid 0 docid rel)."""
    qrels: Qrels = {}
    first = True
    for number, line in _lines(path):
        if not line.strip():
            continue
        parts = line.split()
        if first and path.suffix == ".tsv":
            first = False
            if parts[:2] == ["query-id", "corpus-id"]:
                continue
            raise Llama2VecError(f"{path}:{number}: expected the header 'query-id corpus-id score'")
        first = False
        if len(parts) == 4:  # TREC qrels: qid iteration docid relevance
            parts = [parts[0], parts[2], parts[3]]
        if len(parts) != 3:
            raise Llama2VecError(f"{path}:{number}: expected 3 columns (query-id corpus-id score), got {len(parts)}")
        try:
            score = int(parts[2])
        except ValueError:
            raise Llama2VecError(f"{path}:{number}: field 'score' must be an integer, got {parts[2]!r}") from None
        qrels.setdefault(parts[0], {})[parts[1]] = score
    return qrels


def write_qrels(path: Path, qrels: Qrels) -> None:
    rows = ["query-id\tcorpus-id\tscore\n"]
    rows += [f"{q}\t{d}\t{s}\n" for q, docs in qrels.items() for d, s in docs.items()]
    atomic_write(path, "".join(rows))


def _beir_folder(folder: str | Path) -> Path:
    folder = Path(folder)
    if not folder.is_dir():
        raise Llama2VecError(f"{folder}: BEIR folder not found")
    return folder


def beir_corpus(folder: str | Path) -> dict[str, dict[str, str]]:
    """The corpus of a BEIR folder; queries and qrels may be absent."""
    return read_corpus(_beir_folder(folder) / "corpus.jsonl")


def corpus_offsets(folder: str | Path, ids: list[str]) -> tuple[Path, np.ndarray]:
    """(a BEIR folder's corpus.jsonl, the byte offset of the line of each of `ids`, -1 where absent): the
    file scanned once and every line checked as `beir_corpus` checks it, without holding its texts."""
    import numpy as np

    from .data import objects_at

    path = _beir_folder(folder) / "corpus.jsonl"
    position = {doc_id: n for n, doc_id in enumerate(ids)}
    offsets = np.full(len(ids), -1, dtype=np.int64)
    for (start, _), where, obj in objects_at(path):
        doc_id = _field(obj, "_id", where, required=True)
        _field(obj, "title", where, required=False)
        _field(obj, "text", where, required=True)
        n = position.get(doc_id)
        if n is not None:
            if offsets[n] >= 0:
                raise Llama2VecError(f"{where}: duplicate _id {doc_id!r}")
            offsets[n] = start
    return path, offsets


def beir_queries(folder: str | Path, split: str) -> dict[str, str]:
    """The queries of `split` (those with qrels there), or every query when the folder has no
    qrels for it (queries to search, not to evaluate)."""
    folder = _beir_folder(folder)
    queries = read_queries(folder / "queries.jsonl")
    qrels_path = folder / "qrels" / f"{split}.tsv"
    if not qrels_path.is_file():
        return queries
    qrels = read_qrels(qrels_path)
    return {q: queries[q] for q in queries if q in qrels}


def read_beir(folder: str | Path, split: str) -> BeirDataset:
    """Corpus, the queries that have qrels in `split`, and those qrels."""
    folder = _beir_folder(folder)
    qrels_path = folder / "qrels" / f"{split}.tsv"
    if not qrels_path.is_file():
        found = sorted(p.stem for p in (folder / "qrels").glob("*.tsv"))
        raise Llama2VecError(f"{qrels_path}: no qrels for split {split!r} (found: {', '.join(found) or 'none'})")
    corpus = read_corpus(folder / "corpus.jsonl")
    all_queries = read_queries(folder / "queries.jsonl")
    qrels = read_qrels(qrels_path)
    missing = [q for q in qrels if q not in all_queries]
    if missing:
        raise Llama2VecError(f"{qrels_path}: query ids not in queries.jsonl: {', '.join(missing[:5])}")
    unknown = [d for docs in qrels.values() for d in docs if d not in corpus]
    if unknown:
        raise Llama2VecError(f"{qrels_path}: corpus ids not in corpus.jsonl: {', '.join(unknown[:5])}")
    return BeirDataset(corpus, {q: all_queries[q] for q in qrels}, qrels)


def passage_text(doc: dict[str, str]) -> str:
    """The text a passage is encoded from: the title, when there is one, then the body."""
    return f"{doc['title']}\n{doc['text']}" if doc.get("title") else doc["text"]


# --------------------------------------------------------------------------------------------
# Training JSONL


@dataclass
class TrainExample:
    query: str
    pos: list[str]
    neg: list[str]


def read_train(path: str | Path, min_negatives: int = 0, limit: int | None = None) -> list[TrainExample]:
    """Training examples (the first `limit` only, when given: the rest is not read); each needs a non-empty
    query, at least one positive and `min_negatives` negatives."""
    path = Path(path)
    out: list[TrainExample] = []
    for where, obj in read_objects(path):
        if limit is not None and len(out) >= limit:
            break
        query = _field(obj, "query", where, required=True)
        if not query.strip():
            raise Llama2VecError(f"{where}: field 'query' is empty")
        lists = {}
        for name in ("pos", "neg"):
            value = obj.get(name, [] if name == "neg" else None)
            if value is None:
                raise Llama2VecError(f"{where}: missing field {name!r}")
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise Llama2VecError(f"{where}: field {name!r} must be a list of strings")
            for v in value:
                check_text(v, f"{where}: field {name!r}")
            lists[name] = value
        if not lists["pos"]:
            raise Llama2VecError(f"{where}: field 'pos' is empty")
        if len(lists["neg"]) < min_negatives:
            raise Llama2VecError(f"{where}: field 'neg' has {len(lists['neg'])} passages, {min_negatives} needed")
        out.append(TrainExample(query, lists["pos"], lists["neg"]))
    if not out:
        raise Llama2VecError(f"{path}: no training examples")
    return out


# --------------------------------------------------------------------------------------------
# TREC runs


def read_run(path: str | Path) -> Run:
    path = Path(path)
    run: Run = {}
    for number, line in _lines(path):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 6:
            raise Llama2VecError(f"{path}:{number}: expected 6 columns (qid Q0 docid rank score tag), got {len(parts)}")
        try:
            score = float(parts[4])
        except ValueError:
            raise Llama2VecError(f"{path}:{number}: field 'score' must be a number, got {parts[4]!r}") from None
        if not math.isfinite(score):
            raise Llama2VecError(f"{path}:{number}: field 'score' must be a finite number, got {parts[4]!r}")
        run.setdefault(parts[0], {})[parts[2]] = score
    return run


def write_run(path: str | Path, run: Run, tag: str = "llama2vec") -> None:
    """Write a TREC run, each query's documents by descending score."""
    lines = []
    for qid, docs in run.items():
        ranked = sorted(docs.items(), key=lambda kv: -kv[1])
        lines += [f"{qid} Q0 {d} {r} {s:.9g} {tag}\n" for r, (d, s) in enumerate(ranked, start=1)]
    atomic_write(Path(path), "".join(lines))
