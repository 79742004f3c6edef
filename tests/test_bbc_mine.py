"""The BBC builder's protocol, the BM25 baseline it must reproduce, and negative mining."""

from __future__ import annotations

import json

import pytest

from llama2vec.bbc import read_articles, split_of
from llama2vec.cli import main
from llama2vec.errors import Llama2VecError
from llama2vec.evaluate import evaluate
from llama2vec.mine import mine, sample_negatives


@pytest.fixture(scope="module")
def bbc(tmp_path_factory):
    out = tmp_path_factory.mktemp("bbc")
    assert main(["data", "bbc", "--output", str(out), "--negatives", "5"]) == 0
    return out


def test_bbc_protocol(bbc):
    articles = read_articles()
    assert len(articles) == 2089  # 2,225 files, 136 repeated bodies dropped
    assert len({a.body for a in articles}) == 2089
    counts = {s: sum(a.split == s for a in articles) for s in ("train", "dev", "test")}
    assert counts == {"train": 1464, "dev": 222, "test": 403}
    assert articles[0].id == "business-001" and articles[0].headline == "Ad sales boost Time Warner profit"
    assert "  " not in articles[0].body and "\n" not in articles[0].body
    assert split_of("business-001") == articles[0].split
    corpus = [json.loads(line) for line in (bbc / "corpus.jsonl").read_text().splitlines()]
    assert len(corpus) == 2089
    assert corpus[0] == {"_id": "business-001", "title": "", "text": articles[0].body, "category": "business"}
    assert {c["category"] for c in corpus} == {"business", "entertainment", "politics", "sports", "tech"}
    for split, n in counts.items():
        assert len((bbc / "qrels" / f"{split}.tsv").read_text().splitlines()) == n + 1


def test_bbc_duplicates_keep_the_first_in_path_order():
    ids = [a.id for a in read_articles()]
    assert ids == sorted(ids)  # sorted path order (categories, then file numbers)
    kept = set(ids)
    # Every dropped article repeats a kept, earlier one.
    from llama2vec.bbc import bbc_folder

    all_ids = sorted(f"{p.parent.name}-{p.stem}" for p in bbc_folder().glob("*/*.txt"))
    assert len(all_ids) == 2225 and len(set(all_ids) - kept) == 136


def test_bm25_baseline_reproduces_the_reference(bbc, tmp_path):
    metrics = evaluate(output=str(tmp_path / "m.json"), model="bm25", dataset=str(bbc), split="test")
    assert metrics["ndcg@10"] == pytest.approx(0.820, abs=0.01)
    assert metrics["recall@100"] == pytest.approx(0.985, abs=0.01)
    assert json.loads((tmp_path / "m.json").read_text()) == metrics


def test_bbc_training_file_has_hard_negatives_but_never_the_positive(bbc):
    rows = [json.loads(line) for line in (bbc / "train.jsonl").read_text().splitlines()]
    assert len(rows) == 1464
    for row in rows:
        assert len(row["pos"]) == 1 and len(row["neg"]) == 5
        assert row["pos"][0] not in row["neg"]


def test_sample_negatives_respects_ranks_and_positives():
    run = {"q": {f"d{i}": 100.0 - i for i in range(1, 51)}}  # d1 ranks first
    negs = sample_negatives(run, {"q": {"d3"}}, n=5, rank_range=(10, 20), seed=1)["q"]
    remaining = [f"d{i}" for i in range(1, 51) if i != 3]
    assert len(negs) == 5 and set(negs) <= set(remaining[9:20]) and "d3" not in negs
    assert negs == sample_negatives(run, {"q": {"d3"}}, 5, (10, 20), seed=1)["q"]  # seeded
    same_text = sample_negatives(run, {"q": {"d3"}}, 50, (1, 50), 0, texts={"d3": "x", "d7": "x", "d8": "y"})["q"]
    assert "d7" not in same_text and "d8" in same_text  # a copy of a positive is a positive
    with pytest.raises(Llama2VecError, match="rank range"):
        sample_negatives(run, {}, 1, (0, 5), 0)


def test_mine_from_a_training_file(tmp_path):
    passages = [f"passage {i} about topic {i % 3} with words {' '.join(str(j) for j in range(i))}" for i in range(30)]
    rows = [{"query": f"topic {i % 3} words {i}", "pos": [passages[i]], "neg": []} for i in range(5)]
    rows.append({"query": "other", "pos": ["a positive outside the pool"], "neg": passages[5:]})
    train = tmp_path / "t.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "mined.jsonl"
    assert mine(out, train=str(train), negatives=3, rank_range=(1, 10)) == 6
    mined = [json.loads(line) for line in out.read_text().splitlines()]
    for row in mined:
        assert len(row["neg"]) == 3 and not set(row["neg"]) & set(row["pos"])
    with pytest.raises(Llama2VecError, match="exactly one of"):
        mine(out)
