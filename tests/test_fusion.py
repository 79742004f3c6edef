"""Fusion of runs and its choice on a dev split: hand-computed scores, the dev guarantee on seeded
synthetic runs, the choice applied unchanged to test, `--fusion` parsing, and the command line."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest

import llama2vec.evaluate as evaluate_mod
from llama2vec.cli import main
from llama2vec.errors import Llama2VecError
from llama2vec.evaluate import fuse_rrf
from llama2vec.formats import Qrels, Run, read_beir, read_run, write_qrels, write_run
from llama2vec.fusion import FusionSpec, candidates, choose_fusion, fuse, parse_fusion
from llama2vec.metrics import evaluate_run

A = {"q": {"x": 3.0, "y": 2.0, "z": 1.0}}
B = {"q": {"y": 0.9, "w": 0.5}}


# ---------------------------------------------------------------------------------------------- by hand


def test_weighted_rrf_by_hand():
    out = fuse([A, B], FusionSpec("rrf", (0.7, 0.3), k=60))["q"]
    want = {"x": 0.7 / 61, "y": 0.7 / 62 + 0.3 / 61, "z": 0.7 / 63, "w": 0.3 / 62}
    assert out == pytest.approx(want, abs=1e-15)
    assert list(out) == sorted(want, key=lambda d: -want[d])  # best first


def test_weighted_sum_by_hand():
    # minmax: A -> x 1, y 0.5, z 0; B -> y 1, w 0; a missing document gets the run's minimum, 0.
    out = fuse([A, B], FusionSpec("wsum", (0.7, 0.3), norm="minmax"))["q"]
    assert out == pytest.approx({"x": 0.7, "y": 0.7 * 0.5 + 0.3, "z": 0.0, "w": 0.0}, abs=1e-15)
    assert list(out) == ["x", "y", "z", "w"]  # a tie goes to the larger doc id, as trec_eval reads it
    # zscore: A -> (3, 2, 1) - 2 over std sqrt(2/3); B -> (0.9, 0.5) - 0.7 over 0.2; missing: the run's minimum.
    za, zb = 1 / math.sqrt(2 / 3), 1.0
    out = fuse([A, B], FusionSpec("wsum", (0.7, 0.3), norm="zscore"))["q"]
    want = {"x": 0.7 * za - 0.3 * zb, "y": 0.3 * zb, "z": -0.7 * za - 0.3 * zb, "w": -0.7 * za - 0.3 * zb}
    assert out == pytest.approx(want, abs=1e-12)


def test_zero_weight_run_adds_no_documents_and_depth_cuts():
    assert list(fuse([A, B], FusionSpec("wsum", (1, 0)))["q"]) == ["x", "y", "z"]
    assert list(fuse([A, B], FusionSpec("rrf", (0, 2)))["q"]) == ["y", "w"]
    assert list(fuse([A, B], FusionSpec("rrf", (1, 1)), depth=2)["q"]) == ["y", "x"]
    assert fuse([A, {"other": {"w": 1.0}}], FusionSpec("rrf", (1, 0))) == fuse([A], FusionSpec("rrf", (1,)))


def test_equal_weight_rrf_equals_ranx():
    a, b, _ = synthetic(0, "random", n_queries=20)
    ours, theirs = fuse([a, b], FusionSpec("rrf", (1, 1)), depth=1000), fuse_rrf([a, b], depth=1000)
    assert ours.keys() == theirs.keys()
    for q in ours:
        assert ours[q] == pytest.approx(theirs[q], abs=1e-12)


# ---------------------------------------------------------------------------------------------- synthetic runs


def run_of(rng: np.random.Generator, relevant: set[int], n_docs: int, depth: int, signal: float) -> dict[str, float]:
    """Gaussian scores, `signal` higher for the relevant documents; the top `depth` kept."""
    scores = rng.standard_normal(n_docs) + signal * np.isin(np.arange(n_docs), list(relevant))
    top = np.argsort(-scores)[:depth]
    return {f"d{j}": float(scores[j]) for j in top}


def synthetic(seed: int, kind: str, n_queries: int = 200, n_docs: int = 300,
              depth: int = 100) -> tuple[Run, Run, Qrels]:
    """Two runs and qrels. kind: 'random' (each system's strength drawn per query), 'noise' (the
    second run knows nothing), 'complementary' (each run is strong on the other's weak half)."""
    rng = np.random.default_rng(seed)
    a: Run = {}
    b: Run = {}
    qrels: Qrels = {}
    for i in range(n_queries):
        q = f"q{i}"
        relevant = {int(j) for j in rng.choice(n_docs, size=int(rng.integers(1, 4)), replace=False)}
        qrels[q] = {f"d{j}": 1 for j in relevant}
        if kind == "random":
            sa, sb = rng.uniform(0, 4, size=2)
        elif kind == "noise":
            sa, sb = rng.uniform(1, 4), 0.0
        else:
            sa, sb = (3.5, 1.5) if i % 2 else (1.5, 3.5)
        a[q], b[q] = run_of(rng, relevant, n_docs, depth, sa), run_of(rng, relevant, n_docs, depth, sb)
    return a, b, qrels


def split(run: dict, qids: list[str]) -> dict:
    return {q: run[q] for q in qids if q in run}


def halves(qrels: Qrels) -> tuple[list[str], list[str]]:
    qids = list(qrels)
    return qids[: len(qids) // 2], qids[len(qids) // 2:]


def ndcg(qrels: Qrels, run: Run) -> float:
    return evaluate_run(qrels, run)["ndcg@10"]


def test_grid():
    grid = [str(c) for c in candidates(2)]
    assert len(grid) == len(set(grid)) == 2 + 9 * 6
    assert grid[:4] == ["wsum:minmax:1,0", "wsum:minmax:0,1", "rrf:60:0.1,0.9", "rrf:10:0.1,0.9"]
    assert len(candidates(3)) == 3 + 63 * 6  # weights summing to 1 in steps of 0.1, two runs weighted at least


@pytest.mark.parametrize("seed, kind", [(1, "random"), (2, "random"), (3, "random"), (4, "random"), (5, "noise"),
                                        (6, "noise"), (7, "complementary")])
def test_choice_never_below_the_better_input_on_dev(seed, kind):
    a, b, qrels = synthetic(seed, kind)
    dev, _ = halves(qrels)
    dev_qrels, dev_runs = split(qrels, dev), [split(a, dev), split(b, dev)]
    spec, table = choose_fusion(dev_runs, dev_qrels)
    assert table[0] == (spec, max(score for _, score in table))
    assert sorted(str(s) for s, _ in table) == sorted(str(c) for c in candidates(2))
    chosen = ndcg(dev_qrels, fuse(dev_runs, spec))
    assert chosen == pytest.approx(table[0][1], abs=1e-12)  # the table's figure is the fused run's
    assert chosen >= max(ndcg(dev_qrels, r) for r in dev_runs)
    scores = dict((str(s), v) for s, v in table)
    assert scores["wsum:minmax:1,0"] == pytest.approx(ndcg(dev_qrels, dev_runs[0]), abs=1e-12)
    assert scores["wsum:minmax:0,1"] == pytest.approx(ndcg(dev_qrels, dev_runs[1]), abs=1e-12)


@pytest.mark.parametrize("seed", [5, 6])
def test_useless_input_is_left_out_or_weighted_near_zero(seed):
    a, b, qrels = synthetic(seed, "noise")
    dev, _ = halves(qrels)
    spec, _ = choose_fusion([split(a, dev), split(b, dev)], split(qrels, dev))
    assert spec.weights[1] / sum(spec.weights) <= 0.1, spec


@pytest.mark.parametrize("seed", [7, 8])
def test_complementary_inputs_fused_beat_both_on_dev_and_test(seed):
    a, b, qrels = synthetic(seed, "complementary")
    dev, test = halves(qrels)
    spec, table = choose_fusion([split(a, dev), split(b, dev)], split(qrels, dev))
    assert spec.single is None
    assert table[0][1] > max(ndcg(split(qrels, dev), split(r, dev)) for r in (a, b)) + 0.05
    fused_test = fuse([split(a, test), split(b, test)], spec)  # the same spec, unchanged
    assert ndcg(split(qrels, test), fused_test) > max(ndcg(split(qrels, test), split(r, test)) for r in (a, b))


def test_ties_go_to_the_simpler_candidate():
    a, _, qrels = synthetic(9, "random", n_queries=40)
    spec, table = choose_fusion([a, a], qrels)  # every candidate ranks as `a`
    assert str(spec) == "wsum:minmax:1,0"
    assert len({round(score, 12) for _, score in table}) == 1
    assert str(table[2][0]) == "rrf:60:0.5,0.5"  # then equal weights, k 60 first


# ---------------------------------------------------------------------------------------------- --fusion


@pytest.mark.parametrize("text, want", [
    ("rrf", FusionSpec("rrf", (1, 1), k=60)),
    ("rrf:10", FusionSpec("rrf", (1, 1), k=10)),
    ("rrf:60:0.7,0.3", FusionSpec("rrf", (0.7, 0.3), k=60)),
    ("wsum", FusionSpec("wsum", (1, 1), norm="minmax")),
    ("wsum:zscore", FusionSpec("wsum", (1, 1), norm="zscore")),
    ("wsum:minmax:1,0", FusionSpec("wsum", (1, 0), norm="minmax")),
])
def test_parse_fusion(text, want):
    spec = parse_fusion(text, 2)
    assert spec == want
    assert parse_fusion(str(spec), 2) == spec
    assert FusionSpec.from_json(json.loads(json.dumps(spec.to_json()))) == spec


@pytest.mark.parametrize("text, bad", [
    ("foo", "unknown method 'foo'"),
    ("auto", "'auto' chooses"),
    ("rrf:x", "k must be a positive integer, got 'x'"),
    ("rrf:0", "k must be a positive integer, got 0"),
    ("wsum:l2", "norm must be minmax or zscore, got 'l2'"),
    ("rrf:60:0.7", "weights: 1 given for 2 runs"),
    ("rrf:60:a,b", "weights must be numbers separated by commas, got 'a,b'"),
    ("wsum:minmax:-1,1", "weights must be non-negative"),
    ("rrf:60:0,0", "weights must not all be 0"),
    ("rrf:60:1,1:2", "3 parameters, at most 2"),
])
def test_parse_fusion_errors(text, bad):
    with pytest.raises(Llama2VecError) as e:
        parse_fusion(text, 2)
    assert str(e.value).startswith(f"--fusion {text!r}: ") and bad in str(e.value)


# ---------------------------------------------------------------------------------------------- command line

WORDS = [f"w{i}" for i in range(150)]


@pytest.fixture
def beir(tmp_path):
    """60 passages of random words; each query is 3 of its passage's words and 2 others; 30 dev
    and 30 test queries."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "beir"
    (folder / "qrels").mkdir(parents=True)
    docs = {f"d{i}": " ".join(rng.choice(WORDS, 12)) for i in range(60)}
    queries = {f"q{i}": " ".join([*rng.choice(docs[f"d{i}"].split(), 3), *rng.choice(WORDS, 2)]) for i in range(60)}
    (folder / "corpus.jsonl").write_text("".join(json.dumps({"_id": d, "title": "", "text": t}) + "\n"
                                                 for d, t in docs.items()))
    (folder / "queries.jsonl").write_text("".join(json.dumps({"_id": q, "text": t}) + "\n"
                                                  for q, t in queries.items()))
    write_qrels(folder / "qrels" / "dev.tsv", {f"q{i}": {f"d{i}": 1} for i in range(30)})
    write_qrels(folder / "qrels" / "test.tsv", {f"q{i}": {f"d{i}": 1} for i in range(30, 60)})
    return folder


def printed_spec(out: str) -> FusionSpec:
    line = next(line for line in out.splitlines() if line.startswith("fusion chosen on dev"))
    return parse_fusion(re.search(r"(rrf|wsum):\w+:[\d.,]+", line).group(0), 2)


def test_evaluate_auto_with_bm25_twice_keeps_bm25(beir, tmp_path, capsys):
    assert main(["evaluate", "--model", "bm25", "--dataset", str(beir), "--fuse", "bm25", "--fusion", "auto",
                 "--dev-split", "dev", "--output", str(tmp_path / "m.json")]) == 0
    assert "bm25 alone (wsum:minmax:1,0)" in capsys.readouterr().out  # equal inputs: the simplest wins
    assert main(["evaluate", "--model", "bm25", "--dataset", str(beir), "--output", str(tmp_path / "bm25.json")]) == 0
    assert json.loads((tmp_path / "m.json").read_text()) == json.loads((tmp_path / "bm25.json").read_text())


def test_evaluate_auto_applies_the_dev_choice_to_test(beir, tmp_path, capsys, monkeypatch):
    real = evaluate_mod.retrieve
    seen = []

    def retrieve(system, data, k=1000, *args, **kwargs):  # 'swapped': BM25 with ranks 1-2, 3-4, ... swapped
        seen.append((system, sorted(data.queries)))
        run = real("bm25", data, k)
        if system != "swapped":
            return run
        out = {}
        for q, docs in run.items():
            ranked = sorted(docs, key=lambda d: -docs[d])
            for r in range(0, len(ranked) - 1, 2):
                ranked[r], ranked[r + 1] = ranked[r + 1], ranked[r]
            out[q] = {d: float(len(ranked) - r) for r, d in enumerate(ranked)}
        return out

    monkeypatch.setattr(evaluate_mod, "retrieve", retrieve)
    assert main(["evaluate", "--model", "swapped", "--dataset", str(beir), "--fuse", "bm25", "--fusion", "auto",
                 "--dev-split", "dev", "--output", str(tmp_path / "m.json")]) == 0
    spec = printed_spec(capsys.readouterr().out)
    assert [s for s, _ in seen] == ["swapped", "bm25"]  # each system retrieves once, dev and test queries together
    assert seen[0][1] == sorted(f"q{i}" for i in range(60))
    test = read_beir(beir, "test")
    runs = [retrieve("swapped", test), retrieve("bm25", test)]
    assert json.loads((tmp_path / "m.json").read_text()) == pytest.approx(
        evaluate_run(test.qrels, fuse(runs, spec)), abs=1e-12)
    dev = read_beir(beir, "dev")
    assert spec == choose_fusion([retrieve("swapped", dev), retrieve("bm25", dev)], dev.qrels)[0]


def test_evaluate_explicit_fusion(beir, tmp_path):
    assert main(["evaluate", "--model", "bm25", "--dataset", str(beir), "--fuse", "bm25", "--fusion",
                 "wsum:zscore:0.7,0.3", "--save-run", str(tmp_path / "f.trec")]) == 0
    test = read_beir(beir, "test")
    bm25 = evaluate_mod.retrieve("bm25", test)
    want = fuse([bm25, bm25], FusionSpec("wsum", (0.7, 0.3), norm="zscore"))
    got = read_run(tmp_path / "f.trec")
    assert {q: list(d) for q, d in got.items()} == {q: list(d) for q, d in want.items()}


@pytest.mark.parametrize("extra, message", [
    (["--fusion", "wsum"], "--fusion 'wsum' needs --fuse"),
    (["--fuse", "bm25", "--fusion", "auto"], "--fusion auto needs --dev-split"),
    (["--fuse", "bm25", "--fusion", "auto", "--dev-split", "test"], "--dev-split 'test' is the evaluated --split"),
    (["--fuse", "bm25", "--dev-split", "dev"], "--dev-split goes with --fusion auto"),
    (["--fuse", "bm25", "--fusion", "rrf:k"], "--fusion 'rrf:k': k must be a positive integer, got 'k'"),
])
def test_evaluate_fusion_errors(beir, capsys, extra, message):
    assert main(["evaluate", "--model", "bm25", "--dataset", str(beir), *extra]) == 2
    assert message in capsys.readouterr().err


def test_search_fuse_run_auto(beir, tmp_path, capsys):
    from llama2vec.embeddings import save_embeddings

    rng = np.random.default_rng(1)
    passages = rng.standard_normal((60, 16)).astype(np.float32)
    queries = (passages + 1.2 * rng.standard_normal((60, 16))).astype(np.float32)  # q_i near d_i
    save_embeddings(tmp_path / "corpus", [f"d{i}" for i in range(60)], passages)
    for name, rows in (("dev", range(30)), ("test", range(30, 60))):
        save_embeddings(tmp_path / name, [f"q{i}" for i in rows], queries[list(rows)])
    assert main(["index", "--embeddings", str(tmp_path / "corpus"), "--output", str(tmp_path / "index")]) == 0
    for name in ("dev", "test"):
        assert main(["search", "--index", str(tmp_path / "index"), "--queries", str(tmp_path / name), "--k", "20",
                     "--output", str(tmp_path / f"dense-{name}.trec")]) == 0
        write_run(tmp_path / f"bm25-{name}.trec", evaluate_mod.retrieve("bm25", read_beir(beir, name), 20))
    capsys.readouterr()
    assert main(["search", "--index", str(tmp_path / "index"), "--queries", str(tmp_path / "test"), "--k", "20",
                 "--fuse-run", str(tmp_path / "bm25-test.trec"), "--fusion", "auto",
                 "--dev-runs", str(tmp_path / "dense-dev.trec"), str(tmp_path / "bm25-dev.trec"),
                 "--dev-qrels", str(beir / "qrels" / "dev.tsv"), "--output", str(tmp_path / "fused.trec")]) == 0
    spec = printed_spec(capsys.readouterr().out)
    dev = read_beir(beir, "dev")
    want_spec, _ = choose_fusion([read_run(tmp_path / "dense-dev.trec"), read_run(tmp_path / "bm25-dev.trec")],
                                 dev.qrels, depth=20)
    assert spec == want_spec
    want = fuse([read_run(tmp_path / "dense-test.trec"), read_run(tmp_path / "bm25-test.trec")], spec, depth=20)
    got = read_run(tmp_path / "fused.trec")
    assert {q: list(d) for q, d in got.items()} == {q: list(d) for q, d in want.items()}
    assert all(got[q] == pytest.approx(want[q], rel=1e-8) for q in want)


@pytest.mark.parametrize("extra, message", [
    (["--fusion", "rrf:60:1,1"], "--fusion 'rrf:60:1,1' needs --fuse-run"),
    (["--fuse-run", "R", "--fusion", "rrf:60:1"], "--fusion 'rrf:60:1': weights: 1 given for 2 runs"),
    (["--fuse-run", "R", "--fusion", "auto", "--dev-runs", "D1", "--dev-qrels", "Q"],
     "--fusion auto needs --dev-qrels and --dev-runs: 2 runs"),
    (["--fuse-run", "R", "--dev-runs", "D1", "D2"], "--dev-runs and --dev-qrels go with --fusion auto"),
])
def test_search_fusion_errors(tmp_path, capsys, extra, message):
    assert main(["search", "--index", "I", "--queries", "Q", "--output", str(tmp_path / "o.trec"), *extra]) == 2
    assert message in capsys.readouterr().err
