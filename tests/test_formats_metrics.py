"""Retrieval formats (BEIR, training JSONL, TREC runs) and metrics on hand-worked examples."""

from __future__ import annotations

import json
import math

import pytest

from llama2vec.errors import Llama2VecError
from llama2vec.formats import read_beir, read_qrels, read_run, read_train, write_qrels, write_run
from llama2vec.metrics import evaluate_run, format_table


def write_beir(folder, corpus, queries, qrels, split="test"):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "corpus.jsonl").write_text("".join(json.dumps({"_id": k, "title": "", "text": v}) + "\n"
                                                 for k, v in corpus.items()))
    (folder / "queries.jsonl").write_text("".join(json.dumps({"_id": k, "text": v}) + "\n" for k, v in queries.items()))
    write_qrels(folder / "qrels" / f"{split}.tsv", qrels)
    return folder


def test_metrics_by_hand():
    qrels = {"q1": {"d1": 1}, "q2": {"d2": 1, "d3": 1}, "q3": {"d9": 1}}
    run = {
        "q1": {"d5": 3.0, "d1": 2.0, "d4": 1.0},  # relevant at rank 2
        "q2": {"d2": 5.0, "d7": 4.0, "d3": 3.0},  # relevant at ranks 1 and 3
        # q3 missing from the run: scores 0 everywhere
    }
    m = evaluate_run(qrels, run)
    ndcg_q1 = 1 / math.log2(3)
    ndcg_q2 = (1 + 1 / math.log2(4)) / (1 + 1 / math.log2(3))
    assert m["ndcg@10"] == pytest.approx((ndcg_q1 + ndcg_q2) / 3, abs=1e-6)
    assert m["mrr@10"] == pytest.approx((0.5 + 1.0) / 3, abs=1e-6)
    assert m["recall@100"] == pytest.approx((1 + 1) / 3, abs=1e-6)
    assert m["map"] == pytest.approx((0.5 + (1 + 2 / 3) / 2) / 3, abs=1e-6)
    assert set(m) == {"ndcg@10", "mrr@10", "recall@100", "recall@1000", "map"}


def test_mrr_is_cut_at_ten():
    run = {"q": {f"d{i}": 100.0 - i for i in range(20)}}
    assert evaluate_run({"q": {"d12": 1}}, run)["mrr@10"] == 0.0
    assert evaluate_run({"q": {"d9": 1}}, run)["mrr@10"] == pytest.approx(0.1)
    assert "| system | ndcg@10" in format_table({"x": evaluate_run({"q": {"d9": 1}}, run)})


def test_run_and_qrels_round_trip(tmp_path):
    run = {"q1": {"a": 0.5, "b": 0.9}, "q2": {"c": 1.0}}
    write_run(tmp_path / "r.trec", run)
    lines = (tmp_path / "r.trec").read_text().splitlines()
    assert lines[0].split()[:4] == ["q1", "Q0", "b", "1"]
    assert read_run(tmp_path / "r.trec") == run
    write_qrels(tmp_path / "q.tsv", {"q1": {"a": 1}})
    assert (tmp_path / "q.tsv").read_text().startswith("query-id\tcorpus-id\tscore\n")
    assert read_qrels(tmp_path / "q.tsv") == {"q1": {"a": 1}}


@pytest.mark.parametrize("content, message", [
    ("q1 Q0 d1 1 0.5\n", ":1: expected 6 columns"),
    ("q1 Q0 d1 1 high tag\n", ":1: field 'score' must be a number"),
])
def test_bad_run_files(tmp_path, content, message):
    (tmp_path / "r.trec").write_text(content)
    with pytest.raises(Llama2VecError, match=message):
        read_run(tmp_path / "r.trec")


def test_bad_qrels(tmp_path):
    (tmp_path / "q.tsv").write_text("q1\td1\t1\n")
    with pytest.raises(Llama2VecError, match=":1: expected the header"):
        read_qrels(tmp_path / "q.tsv")
    (tmp_path / "q.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\tyes\n")
    with pytest.raises(Llama2VecError, match=":2: field 'score' must be an integer"):
        read_qrels(tmp_path / "q.tsv")


def test_beir_reader_checks_ids(tmp_path):
    folder = write_beir(tmp_path / "b", {"d1": "one", "d2": "two"}, {"q1": "uno", "q2": "dos"}, {"q1": {"d1": 1}})
    data = read_beir(folder, "test")
    assert data.queries == {"q1": "uno"} and data.qrels == {"q1": {"d1": 1}} and len(data.corpus) == 2
    with pytest.raises(Llama2VecError, match="no qrels for split 'dev' \\(found: test\\)"):
        read_beir(folder, "dev")
    write_qrels(folder / "qrels" / "bad.tsv", {"q1": {"d404": 1}})
    with pytest.raises(Llama2VecError, match="corpus ids not in corpus.jsonl: d404"):
        read_beir(folder, "bad")
    (folder / "corpus.jsonl").write_text('{"_id": "d1", "text": "x"}\n{"_id": "d1", "text": "y"}\n')
    with pytest.raises(Llama2VecError, match="corpus.jsonl:2: duplicate _id 'd1'"):
        read_beir(folder, "test")
    (folder / "corpus.jsonl").write_text('{"_id": "d1"}\n')
    with pytest.raises(Llama2VecError, match="corpus.jsonl:1: missing field 'text'"):
        read_beir(folder, "test")


@pytest.mark.parametrize("line, message", [
    ('{"pos": ["p"]}', ":1: missing field 'query'"),
    ('{"query": "q"}', ":1: missing field 'pos'"),
    ('{"query": "q", "pos": "p"}', ":1: field 'pos' must be a list of strings"),
    ('{"query": "q", "pos": []}', ":1: field 'pos' is empty"),
    ('{"query": "", "pos": ["p"]}', ":1: field 'query' is empty"),
    ('{"query": "q", "pos": ["p"], "neg": [1]}', ":1: field 'neg' must be a list of strings"),
    ('{"query": "q", "pos": ["p"], "neg": []}', ":1: field 'neg' has 0 passages, 1 needed"),
])
def test_bad_training_files(tmp_path, line, message):
    (tmp_path / "t.jsonl").write_text(line + "\n")
    with pytest.raises(Llama2VecError, match=message):
        read_train(tmp_path / "t.jsonl", min_negatives=1)


def test_training_file(tmp_path):
    (tmp_path / "t.jsonl").write_text('{"query": "q", "pos": ["p"], "neg": ["n1", "n2"], "extra": 1}\n')
    (example,) = read_train(tmp_path / "t.jsonl")
    assert (example.query, example.pos, example.neg) == ("q", ["p"], ["n1", "n2"])
