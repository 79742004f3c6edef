"""Readers, the chunker, the pair cache and the bundled Wikipedia corpus."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import make_tokenizer

from llama2vec.cli import main
from llama2vec.data import (
    PairDataset,
    ReadStats,
    build_pair_cache,
    build_wiki,
    chunk_ids,
    clean_wiki,
    read_documents,
    split_sentences,
)
from llama2vec.errors import Llama2VecError


def test_chunks_end_on_sentence_boundaries_and_respect_the_size():
    tok = make_tokenizer()
    text = " ".join(f"Sentence number {i} says the cat sat on the mat." for i in range(20))
    chunks = chunk_ids(text, tok, chunk_tokens=40)
    assert len(chunks) > 3
    assert all(len(c) <= 40 for c in chunks)
    for c in chunks:
        assert tok.decode(c).rstrip().endswith(".")
    assert "".join(tok.decode(c) for c in chunks).replace(".Sentence", ". Sentence") == text


def test_an_overlong_sentence_is_cut_by_tokens():
    tok = make_tokenizer()
    chunks = chunk_ids("word " * 100, tok, chunk_tokens=16)
    assert all(len(c) <= 16 for c in chunks) and sum(len(c) for c in chunks) == len(
        tok(("word " * 100).strip(), add_special_tokens=False)["input_ids"])



def test_pair_cache_pairs_consecutive_chunks_of_one_document(tmp_path):
    tok = make_tokenizer()
    corpus = tmp_path / "c.jsonl"
    docs = [" ".join(f"Doc {d} sentence {i} is here." for i in range(12)) for d in range(3)]
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    folder = build_pair_cache(corpus, tok, tmp_path / "cache", chunk_tokens=24, min_chunk_tokens=4)
    ds = PairDataset(folder)
    per_doc = [chunk_ids(t, tok, 24) for t in docs]
    assert len(ds) == sum(len(c) - 1 for c in per_doc)
    expected = [(c[i], c[i + 1]) for c in per_doc for i in range(len(c) - 1)]
    assert [(ds[i]["text"], ds[i]["next"]) for i in range(len(ds))] == expected
    assert not list(tmp_path.glob("cache.tmp-*"))
    # A second call reuses the finished cache.
    mtime = (folder / "meta.json").stat().st_mtime_ns
    build_pair_cache(corpus, tok, tmp_path / "cache", chunk_tokens=24, min_chunk_tokens=4)
    assert (folder / "meta.json").stat().st_mtime_ns == mtime


def test_readers_of_text_and_parquet(tmp_path):
    txt = tmp_path / "c.txt"
    txt.write_text("First doc line one.\nline two.\n\n\nSecond doc.\n")
    assert [d.text for d in read_documents(txt)] == ["First doc line one.\nline two.", "Second doc."]
    pq_path = tmp_path / "c.parquet"
    pq.write_table(pa.table({"id": ["a", "b", "c"], "text": ["alpha text", "", "gamma"], "title": ["A", "B", "C"]}),
                   pq_path)
    stats = ReadStats()
    docs = list(read_documents(pq_path, stats))
    assert [(d.id, d.title, d.text) for d in docs] == [("a", "A", "alpha text"), ("c", "C", "gamma")]
    assert stats.empty == 1 and "row 2" in stats.where[0]


def test_jsonl_reader_skips_and_counts_empty_texts(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "one"}\n\n{"text": "   "}\n{"_id": 7, "title": "T", "text": "two"}\n')
    stats = ReadStats()
    docs = list(read_documents(path, stats))
    assert [(d.id, d.title, d.text) for d in docs] == [("1", "", "one"), ("7", "T", "two")]
    assert stats.empty == 1 and stats.where == [f"{path}:3"]


@pytest.mark.parametrize("content, message", [
    (b'{"text": "ok"}\n{"text": "broken\n', ":2: invalid JSON"),
    (b'{"text": "ok"}\n{"title": "no text"}\n', ':2: missing field \'text\''),
    (b'{"text": 5}\n', ":1: field 'text' must be a string"),
    (b'["a list"]\n', ":1: expected a JSON object"),
    (b'{"text": "ok"}\n{"text": "caf\xe9"}\n', ":2: bytes that are not UTF-8"),
])
def test_bad_jsonl_names_file_and_line(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content)
    with pytest.raises(Llama2VecError, match=message) as err:
        list(read_documents(path))
    assert str(path) in str(err.value)


def test_unknown_format_and_missing_parquet_column(tmp_path):
    with pytest.raises(Llama2VecError, match="unknown corpus format"):
        list(read_documents(tmp_path / "x.csv"))
    path = tmp_path / "c.parquet"
    pq.write_table(pa.table({"body": ["x"]}), path)
    with pytest.raises(Llama2VecError, match="no column 'text'"):
        list(read_documents(path))


def test_clean_wiki_removes_leftover_markup():
    raw = ("'''Anarchism''' is a ''political'' philosophy ( ; ).\n\n==History==\n\n* A listed point.\n"
           "\n==References==\n* Some book. ISBN 1-2-3\n")
    assert clean_wiki(raw) == "Anarchism is a political philosophy.\n\nA listed point."


def test_bundled_wikipedia_corpus(tmp_path):
    out = tmp_path / "wiki.jsonl"
    assert main(["data", "wiki", "--output", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) > 100
    assert rows[0]["title"] == "Anarchism" and set(rows[0]) == {"id", "title", "text"}
    text = " ".join(r["text"] for r in rows)
    assert len(text.split()) > 300_000
    for leftover in ("'''", "==", "[[", "]]", "{{", "ISBN"):
        assert text.count(leftover) < 20, leftover
    assert build_wiki(tmp_path / "again.jsonl") == len(rows)


def test_split_sentences():
    assert split_sentences("A first one. Then? Yes!\nNew line") == ["A first one.", "Then?", "Yes!", "New line"]


def test_parallel_chunking_and_a_cache_made_ahead(tiny_model_dir, tmp_path):
    from llama2vec.cli import main

    corpus = tmp_path / "c.jsonl"
    docs = [" ".join(f"Doc {d} sentence {i} is here." for i in range(3 + d % 7)) for d in range(300)]
    corpus.write_text("".join(json.dumps({"title": f"T{d}", "text": t}) + "\n" for d, t in enumerate(docs)))
    one = build_pair_cache(corpus, make_tokenizer(), tmp_path / "one", chunk_tokens=24, min_chunk_tokens=4)
    two = build_pair_cache(corpus, make_tokenizer(), tmp_path / "two", chunk_tokens=24, min_chunk_tokens=4,
                           workers=2)
    for name in ("tokens.bin", "offsets.npy", "pairs.npy"):  # the same cache, byte for byte
        assert (one / name).read_bytes() == (two / name).read_bytes(), name

    # Made ahead with `data chunk`, then used by adapt --pairs (same tokenizer and placeholders).
    ahead = tmp_path / "ahead"
    assert main(["data", "chunk", "--corpus", str(corpus), "--model", str(tiny_model_dir), "--output", str(ahead),
                 "--chunk-tokens", "24", "--min-chunk-tokens", "4", "--workers", "2"]) == 0
    out = tmp_path / "adapted"
    assert main(["adapt", "--model", str(tiny_model_dir), "--pairs", str(ahead), "--output", str(out),
                 "--max-steps", "1", "--batch-size", "2", "--max-length", "24"]) == 0
    assert not (out / "data").exists() and (out / "llama2vec_config.json").is_file()
    assert main(["adapt", "--model", str(tiny_model_dir), "--pairs", str(ahead), "--output", str(tmp_path / "p"),
                 "--prompt-preset", "paper", "--max-steps", "1"]) == 2  # other placeholders: other tokenizer
