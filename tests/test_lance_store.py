"""The LanceDB store (`index --store lancedb`): the passages, their fields and vectors in one table, searched
as FAISS searches, with filters on the fields."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("lancedb")

from llama2vec.cli import main  # noqa: E402
from llama2vec.embeddings import save_embeddings  # noqa: E402
from llama2vec.errors import Llama2VecError  # noqa: E402
from llama2vec.formats import read_run, write_jsonl_rows  # noqa: E402
from llama2vec.index import search_shards  # noqa: E402
from llama2vec.lance_store import build_store, is_store, search_store  # noqa: E402

CATEGORIES = ("sport", "music", "politics", "business")


def clustered(n: int, dim: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((32, dim))
    x = centres[rng.integers(0, 32, n)] + 0.6 * rng.standard_normal((n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A BEIR corpus of 3,000 passages with a category and a year, its embeddings (in 3 shards, stored in
    another order than the corpus's lines) and 200 query vectors."""
    root = tmp_path_factory.mktemp("lance")
    n, dim = 3000, 32
    vectors = clustered(n + 200, dim, 0)
    docs = [{"_id": f"d{i}", "title": f"Title {i}" if i % 3 else "", "text": f"passage {i} about {CATEGORIES[i % 4]}",
             "category": CATEGORIES[i % 4], "year": 2000 + i % 20} for i in range(n)]
    write_jsonl_rows(root / "data" / "corpus.jsonl", docs)
    order = np.random.default_rng(1).permutation(n)
    emb = root / "emb"
    save_embeddings(emb, [f"d{i}" for i in order], vectors[order])
    # three shards: split the one-shard folder's array so the store streams several
    from llama2vec.embeddings import FORMAT
    from llama2vec.store import read_json, write_json

    meta = read_json(emb / "meta.json")
    (emb / "shards" / f"{meta['shards'][0]}.npy").unlink()
    names = []
    for s, part in enumerate(np.array_split(vectors[order], 3)):
        np.save(emb / "shards" / f"shard-{s:05d}.npy", part)
        names.append(f"shard-{s:05d}")
    write_json(emb / "meta.json", {**meta, "format": FORMAT, "shards": names})
    return {"root": root, "data": root / "data", "emb": emb, "queries": vectors[n:], "docs": docs,
            "order": order, "vectors": vectors[:n]}


def test_exact_search_through_the_store_equals_faiss_flat(corpus, tmp_path):
    store, flat = tmp_path / "store", tmp_path / "flat"
    assert main(["index", "--embeddings", str(corpus["emb"]), "--output", str(store), "--store", "lancedb",
                 "--dataset", str(corpus["data"])]) == 0
    assert main(["index", "--embeddings", str(corpus["emb"]), "--output", str(flat)]) == 0
    assert is_store(store) and not is_store(flat)
    qids = [f"q{i}" for i in range(len(corpus["queries"]))]
    want = search_shards([flat], qids, corpus["queries"], 10)
    got = search_shards([store], qids, corpus["queries"], 10)
    for q in qids:
        assert list(got[q]) == list(want[q]), q  # the same passages in the same order
        assert max(abs(got[q][d] - want[q][d]) for d in want[q]) <= 1e-5
    # The table holds each passage's title, text and fields, typed as the corpus has them.
    from llama2vec.lance_store import open_table

    table, meta = open_table(store)
    rows = {r["id"]: r for r in table.to_arrow().select(["id", "title", "text", "category", "year"]).to_pylist()}
    assert len(rows) == 3000 and meta["fields"] == {"category": "string", "year": "int64"}
    for doc in corpus["docs"][:50]:
        assert rows[doc["_id"]] == {"id": doc["_id"], "title": doc["title"], "text": doc["text"],
                                    "category": doc["category"], "year": doc["year"]}


def test_a_filter_keeps_the_passages_it_names_and_a_bad_one_is_an_error(corpus, tmp_path, capsys):
    store = build_store(corpus["emb"], corpus["data"], tmp_path / "store")
    scores, hits = search_store(store, corpus["queries"][:20], 10, where="category = 'sport' AND year >= 2010")
    by_id = {d["_id"]: d for d in corpus["docs"]}
    assert all(len(h) == 10 for h in hits)
    assert all(by_id[d]["category"] == "sport" and by_id[d]["year"] >= 2010 for h in hits for d in h)
    # exact search over the passages the filter keeps
    keep = [i for i, d in enumerate(corpus["docs"]) if d["category"] == "sport" and d["year"] >= 2010]
    exact = corpus["queries"][:20] @ corpus["vectors"][keep].T
    best = [[corpus["docs"][keep[j]]["_id"] for j in np.argsort(-row, kind="stable")[:10]] for row in exact]
    assert hits == best
    for where, says in (("colour = 'red'", "colour"), ("category = 'sport'; DROP TABLE passages", "cannot be applied"),
                        ("category = ", "cannot be applied"), ("1", "cannot be applied")):
        with pytest.raises(Llama2VecError, match="the filter .* cannot be applied") as e:
            search_store(store, corpus["queries"][:1], 5, where=where)
        assert says in str(e.value) and "the fields: id, title, text, category, year" in str(e.value)
    assert search_store(store, corpus["queries"][:1], 5)[1][0]  # the table is still whole
    qfolder = tmp_path / "q"
    save_embeddings(qfolder, [f"q{i}" for i in range(5)], corpus["queries"][:5])
    flat = tmp_path / "flat"
    assert main(["index", "--embeddings", str(corpus["emb"]), "--output", str(flat)]) == 0
    assert main(["search", "--index", str(flat), "--queries", str(qfolder), "--where", "year > 2001",
                 "--output", str(tmp_path / "run")]) == 2
    assert "a FAISS index folder has none" in capsys.readouterr().err
    assert main(["search", "--index", str(store), "--queries", str(qfolder), "--where", "category = 'music'",
                 "--k", "3", "--output", str(tmp_path / "run")]) == 0
    run = read_run(tmp_path / "run")
    assert all(by_id[d]["category"] == "music" for docs in run.values() for d in docs) and len(run) == 5


def recall_at(hits: list[list[str]], truth: list[list[str]], k: int = 10) -> float:
    return float(np.mean([len(set(h[:k]) & set(t[:k])) / k for h, t in zip(hits, truth)]))


def test_an_ivf_pq_store_has_the_lists_and_codes_of_faiss(corpus, tmp_path):
    """IVF-PQ (16 lists, 8 sub-vectors) trained on the FAISS path's seeded sample: at each nprobe the store's
    recall@10 against exact search equals (within 0.02) that of FAISS's IVF-PQ holding the same lists and codes,
    its hits' scores are FAISS's, and it is no worse than the FAISS folder `index --factory IVF16,PQ8` gives."""
    import faiss

    from llama2vec.embeddings import Embeddings
    from llama2vec.lance_store import open_table

    store = tmp_path / "store"
    assert main(["index", "--embeddings", str(corpus["emb"]), "--output", str(store), "--store", "lancedb",
                 "--dataset", str(corpus["data"]), "--index-type", "ivf_pq", "--partitions", "16",
                 "--sub-vectors", "8", "--train-size", "2000", "--seed", "3"]) == 0
    table, meta = open_table(store)
    assert meta["index_type"] == "ivf_pq" and meta["metric"] == "l2"
    assert any(i.index_type == "IvfPq" for i in table.list_indices())
    folder = tmp_path / "faiss"
    assert main(["index", "--embeddings", str(corpus["emb"]), "--output", str(folder), "--factory", "IVF16,PQ8",
                 "--train-size", "2000", "--seed", "3"]) == 0
    # FAISS's IVF-PQ for squared L2 (the ranking of inner products on unit vectors), trained on the same sample
    ids = [f"d{i}" for i in range(3000)]
    same = faiss.index_factory(32, "IVF16,PQ8", faiss.METRIC_L2)
    same.train(Embeddings(corpus["emb"]).sample(2000, 3))
    same.add(corpus["vectors"])
    queries, qids = corpus["queries"], [f"q{i}" for i in range(200)]
    exact = [[ids[j] for j in row] for row in np.argsort(-(queries @ corpus["vectors"].T), axis=1)[:, :10]]
    for nprobe in (1, 4):
        scores, hits = search_store(store, queries, 10, nprobes=nprobe)
        faiss.extract_index_ivf(same).nprobe = nprobe
        distances, rows = same.search(queries, 10)
        theirs = [[ids[j] for j in row] for row in rows]
        ours, want = recall_at(hits, exact), recall_at(theirs, exact)
        assert abs(ours - want) <= 0.02, (nprobe, ours, want)
        agree = [q for q in range(200) if hits[q] == theirs[q]]
        assert len(agree) >= 180, len(agree)  # the same hits in the same order, but for near ties
        inner = ((queries ** 2).sum(axis=1, keepdims=True) + 1.0 - distances) / 2.0
        assert max(np.abs(scores[q] - inner[q]).max() for q in agree) <= 1e-4
        run = search_shards([folder], qids, queries, 10, params=f"nprobe={nprobe}")
        folder_recall = recall_at([list(run[q]) for q in qids], exact)
        print(f"nprobe {nprobe}: recall@10 store {ours:.3f}, FAISS same lists and codes {want:.3f}, "
              f"FAISS folder IVF16,PQ8 {folder_recall:.3f}")
        assert ours >= folder_recall - 0.02
    _, hits = search_store(store, corpus["vectors"][:200], 1, nprobes=4)
    assert np.mean([h[0] == f"d{i}" for i, h in enumerate(hits)]) >= 0.9  # a passage's own vector finds it
    # Vectors of other lengths would be ranked by L2, not by inner product: refused, the table left as it was.
    longer = tmp_path / "longer"
    save_embeddings(longer, ["d0", "d1"], 2.0 * corpus["vectors"][:2])
    from llama2vec.lance_store import update_store

    with pytest.raises(Llama2VecError, match="not of unit length"):
        update_store(store, add=longer, dataset=corpus["data"])
    assert open_table(store)[0].count_rows() == 3000


def test_float16_vectors_and_bad_inputs(corpus, tmp_path):
    store = build_store(corpus["emb"], corpus["data"], tmp_path / "half", float16=True)
    scores, hits = search_store(store, corpus["queries"][:10], 5)
    exact = np.sort(corpus["queries"][:10] @ corpus["vectors"].T, axis=1)[:, ::-1][:, :5]
    assert np.abs(scores - exact).max() <= 2e-3
    # Embeddings of passages the corpus lacks: an error, and no folder left behind.
    other = tmp_path / "other"
    (other).mkdir()
    write_jsonl_rows(other / "corpus.jsonl", corpus["docs"][:10])
    with pytest.raises(Llama2VecError, match=r"2990 passages of .* are not in the corpus"):
        build_store(corpus["emb"], other, tmp_path / "partial")
    assert not (tmp_path / "partial").exists()
    bad = tmp_path / "bad"
    bad.mkdir()
    write_jsonl_rows(bad / "corpus.jsonl", [{**corpus["docs"][0], "vector": [1, 2]}])
    with pytest.raises(Llama2VecError, match="the field 'vector' is the store's own"):
        build_store(corpus["emb"], bad, tmp_path / "x")
    assert main(["index", "--embeddings", str(corpus["emb"]), "--output", str(tmp_path / "y"), "--index-type",
                 "hnsw"]) == 2
    meta = json.loads((store / "meta.json").read_text())
    assert meta["vector_dtype"] == "float16" and meta["count"] == 3000
    half = build_store(corpus["emb"], corpus["data"], tmp_path / "half-ivf", index_type="ivf_pq", float16=True,
                       partitions=8, sub_vectors=4)  # FAISS's lists and codes, in float16
    _, hits = search_store(half, corpus["vectors"][:100], 1, nprobes=8)
    assert np.mean([h[0] == f"d{i}" for i, h in enumerate(hits)]) >= 0.9
    few = tmp_path / "few"
    save_embeddings(few, [f"d{i}" for i in range(100)], corpus["vectors"][:100])
    with pytest.raises(Llama2VecError, match="at least 256 passages, got 100"):
        build_store(few, corpus["data"], tmp_path / "few-store", index_type="ivf_pq")
    assert not (tmp_path / "few-store").exists()


def test_serve_searches_a_store_with_filters_and_sees_its_updates(tiny_model_dir, tmp_path, monkeypatch):
    """`serve --index STORE`: /v1/search equals the store's search (titles and texts from the table), `where`
    filters, a bad filter is a 400 naming it, and a committed add is seen without a restart."""
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("fastapi")
    from conftest import SENTENCES
    from test_serve import running

    from llama2vec.encoder import Llama2Vec
    from llama2vec.lance_store import update_store
    from llama2vec.serve import Searcher, Settings, StoreSearcher, create_app

    model = Llama2Vec.from_pretrained(str(tiny_model_dir), device="cpu")
    docs = [{"_id": f"p{i}", "title": f"T{i}", "text": t, "category": "even" if i % 2 == 0 else "odd"}
            for i, t in enumerate(SENTENCES)]
    write_jsonl_rows(tmp_path / "data" / "corpus.jsonl", docs)
    save_embeddings(tmp_path / "emb", [d["_id"] for d in docs], model.encode_corpus(docs))
    store = build_store(tmp_path / "emb", tmp_path / "data", tmp_path / "store")
    query = "Who won the final?"
    qv = model.encode_queries([query])
    with running(create_app(model, Settings(name="m"), StoreSearcher(store, model.dim, refresh_seconds=0))) as url:
        r = httpx.post(f"{url}/v1/search", json={"query": query, "k": 3})
        assert r.status_code == 200, r.text
        scores, ids = search_store(store, qv, 3)
        hits = r.json()["data"][0]["results"]
        assert [h["id"] for h in hits] == ids[0]
        assert np.abs(np.array([h["score"] for h in hits]) - scores[0]).max() < 1e-5
        by_id = {d["_id"]: d for d in docs}
        assert all(h["text"] == by_id[h["id"]]["text"] and h["title"] == by_id[h["id"]]["title"] for h in hits)
        r = httpx.post(f"{url}/v1/search", json={"query": query, "k": 3, "where": "category = 'odd'"})
        assert r.status_code == 200 and all(by_id[h["id"]]["category"] == "odd" for h in r.json()["data"][0]["results"])
        for where in ("colour = 'red'", "category = 'odd'; DROP TABLE passages"):
            r = httpx.post(f"{url}/v1/search", json={"query": query, "where": where})
            assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_filter", r.text
            assert r.json()["error"]["param"] == "where" and "cannot be applied" in r.json()["error"]["message"]
        # A passage added while the server runs: found by the next request.
        new = {"_id": "new", "title": "", "text": "A brand new passage about the final.", "category": "odd"}
        write_jsonl_rows(tmp_path / "more" / "corpus.jsonl", [new])
        save_embeddings(tmp_path / "more-emb", ["new"], qv)  # the query's own vector: the best hit
        update_store(store, tmp_path / "more-emb", tmp_path / "more")
        r = httpx.post(f"{url}/v1/search", json={"query": query, "k": 1})
        assert r.json()["data"][0]["results"][0]["id"] == "new"
        schema = httpx.get(f"{url}/openapi.json").json()
        assert "where" in json.dumps(schema["components"]["schemas"])
    # The command: `serve --index STORE` serves it (run stopped before listening), and refuses what a store lacks.
    import llama2vec.serve as serve_module

    served = {}
    monkeypatch.setattr(serve_module, "run", lambda app, sock, drain: served.update(app=app) or sock.close())
    argv = ["serve", "--model", str(tiny_model_dir), "--index", str(store), "--port", "0", "--device", "cpu"]
    assert main([*argv, "--params", "nprobes=3", "--refresh-seconds", "2"]) == 0
    searcher = served["app"].state.batcher.searcher
    assert isinstance(searcher, StoreSearcher) and searcher.nprobes == 3 and searcher.refresh_seconds == 2
    assert main([*argv, "--dataset", str(tmp_path / "data")]) == 2
    assert main([*argv, "--params", "nprobe=3"]) == 2
    # A FAISS index has no fields: a filter is refused, not ignored.
    assert main(["index", "--embeddings", str(tmp_path / "emb"), "--output", str(tmp_path / "faiss")]) == 0
    faiss = Searcher(tmp_path / "faiss", tmp_path / "data", model.dim)
    with running(create_app(model, Settings(name="m"), faiss)) as url:
        r = httpx.post(f"{url}/v1/search", json={"query": query, "where": "category = 'odd'"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "where", r.text


@pytest.fixture(scope="module")
def bbc_store(tmp_path_factory):
    """The BBC task's folder and a store of its corpus (random unit vectors: the full-text index is what these
    tests look at), with the test queries' vectors."""
    root = tmp_path_factory.mktemp("bbc-store")
    assert main(["data", "bbc", "--output", str(root / "bbc"), "--negatives", "1"]) == 0
    from llama2vec.formats import beir_queries, read_corpus

    ids = list(read_corpus(root / "bbc" / "corpus.jsonl"))
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((len(ids), 16)).astype(np.float32)
    save_embeddings(root / "emb", ids, vectors / np.linalg.norm(vectors, axis=1, keepdims=True))
    queries = beir_queries(root / "bbc", "test")
    qv = rng.standard_normal((len(queries), 16)).astype(np.float32)
    save_embeddings(root / "q", list(queries), qv / np.linalg.norm(qv, axis=1, keepdims=True))
    store = build_store(root / "emb", root / "bbc", root / "store")
    return {"root": root, "bbc": root / "bbc", "store": store, "queries": queries}


def test_full_text_search_in_the_store_finds_the_headlines_articles_as_bm25s_does(bbc_store, capsys):
    from llama2vec.bm25 import BM25
    from llama2vec.formats import read_corpus, read_qrels
    from llama2vec.lance_store import text_search
    from llama2vec.metrics import evaluate_run

    queries, store = bbc_store["queries"], bbc_store["store"]
    qrels = read_qrels(bbc_store["bbc"] / "qrels" / "test.tsv")
    lance = text_search(store, list(queries), list(queries.values()), 10)
    corpus = read_corpus(bbc_store["bbc"] / "corpus.jsonl")
    bm25 = BM25(list(corpus), [d["text"] for d in corpus.values()]).search(list(queries), list(queries.values()), 10)

    def found(run) -> float:
        return float(np.mean([q in run[q] for q in queries]))  # a headline's article is its query's id

    with capsys.disabled():
        print(f"\nBBC test, full-text nDCG@10: LanceDB {evaluate_run(qrels, lance)['ndcg@10']:.4f}, bm25s "
              f"{evaluate_run(qrels, bm25)['ndcg@10']:.4f}; found in the top 10: LanceDB {found(lance):.3f}, "
              f"bm25s {found(bm25):.3f}")
    assert found(lance) >= 0.9 and found(bm25) >= 0.9
    sports = text_search(store, list(queries), list(queries.values()), 10, where="category = 'sports'")
    assert all(d.startswith("sports-") for docs in sports.values() for d in docs)
    assert any(sports.values())


def test_hybrid_through_the_store_is_our_fusion_of_its_two_runs(bbc_store, tmp_path):
    from llama2vec.embeddings import load_embeddings
    from llama2vec.evaluate import fuse_runs
    from llama2vec.lance_store import text_search

    root, store, queries = bbc_store["root"], bbc_store["store"], bbc_store["queries"]
    common = ["search", "--index", str(store), "--dataset", str(bbc_store["bbc"]), "--k", "20"]
    for fusion in ("rrf", "wsum:minmax:0.3,0.7"):
        out = tmp_path / f"{fusion}.trec"
        assert main([*common, "--mode", "hybrid", "--queries", str(root / "q"), "--fusion", fusion,
                     "--output", str(out)]) == 0
        qids, qv = load_embeddings(root / "q")
        dense = search_shards([store], qids, qv, 20)
        lexical = text_search(store, qids, [queries[q] for q in qids], 20)
        want = fuse_runs([dense, lexical], fusion, 20)
        got = read_run(out)
        assert set(got) == set(want)
        for q in want:
            assert list(got[q]) == list(want[q])[: len(got[q])] and len(got[q]) == min(20, len(want[q]))
    assert main([*common, "--mode", "fts", "--output", str(tmp_path / "fts.trec")]) == 0
    fts = read_run(tmp_path / "fts.trec")
    want = text_search(store, list(queries), list(queries.values()), 20)
    assert set(fts) == set(want)
    for q in want:
        assert set(fts[q]) == set(want[q]) and max(abs(fts[q][d] - want[q][d]) for d in want[q]) <= 1e-4
    assert main([*common, "--mode", "fts", "--queries", str(root / "q"), "--index", str(root / "emb"),
                 "--output", str(tmp_path / "x.trec")]) == 2


KILLED_ADD = """
import os, signal, sys
from llama2vec import lance_store

batches = lance_store.Passages._batches
def dies(self, desc, batch):
    for n, rows in enumerate(batches(self, desc, batch)):
        if n == 2:
            os.kill(os.getpid(), signal.SIGKILL)  # half-way through the upsert's stream
        yield rows
lance_store.Passages._batches = dies
lance_store.update_store(sys.argv[1], sys.argv[2], sys.argv[3], batch=100)
"""


def test_add_replace_delete_are_seen_by_search_and_a_killed_add_leaves_the_last_version(corpus, tmp_path):
    import subprocess
    import sys

    store = tmp_path / "store"
    first = 2000
    base = tmp_path / "base"
    save_embeddings(base, [f"d{i}" for i in range(first)], corpus["vectors"][:first])
    assert main(["index", "--embeddings", str(base), "--dataset", str(corpus["data"]), "--store", "lancedb",
                 "--output", str(store)]) == 0
    # 1,000 new passages and 200 changed ones (d0..d199 move to the vectors of d2000..d2199 and a new text).
    new_ids = [f"d{i}" for i in range(first, 3000)] + [f"d{i}" for i in range(200)]
    new_vectors = np.concatenate([corpus["vectors"][first:], corpus["vectors"][first: first + 200]])
    changed = tmp_path / "changed"
    docs = [d for d in corpus["docs"][first:]] + [{**d, "text": "changed " + d["text"], "category": "science"}
                                                  for d in corpus["docs"][:200]]
    write_jsonl_rows(changed / "corpus.jsonl", docs)
    add = tmp_path / "add"
    save_embeddings(add, new_ids, new_vectors)

    killed = subprocess.run([sys.executable, "-c", KILLED_ADD, str(store), str(add), str(changed)])
    assert killed.returncode == -9
    scores, hits = search_store(store, corpus["vectors"][first: first + 5], 1)
    from llama2vec.lance_store import open_table

    table, _ = open_table(store)
    assert table.count_rows() == first  # the last committed version: the add never happened
    assert main(["index", "--store", "lancedb", "--output", str(store), "--add", str(add), "--dataset",
                 str(changed)]) == 0
    table, meta = open_table(store)
    assert table.count_rows() == 3000 and meta["count"] == 3000
    _, hits = search_store(store, corpus["vectors"][first: first + 5], 2)
    for i, h in enumerate(hits):  # a new passage, and the changed one that now shares its vector
        assert set(h) == {f"d{first + i}", f"d{i}"}
    sports = search_store(store, corpus["queries"][:5], 10, where="category = 'science'")[1]
    assert all(int(d[1:]) < 200 for h in sports for d in h) and all(len(h) == 10 for h in sports)
    ids = tmp_path / "delete.txt"
    ids.write_text("".join(f"d{i}\n" for i in range(100)) + "d'; DROP TABLE passages; --\n")
    assert main(["index", "--store", "lancedb", "--output", str(store), "--delete-ids", str(ids)]) == 0
    table, meta = open_table(store)
    assert table.count_rows() == 2900 and meta["count"] == 2900
    _, hits = search_store(store, corpus["vectors"][:100], 3)
    assert not {f"d{i}" for i in range(100)} & {d for h in hits for d in h}
    # Lines whose fields the store lacks, or of another type: an error naming them; the store unchanged.
    odd = tmp_path / "odd"
    write_jsonl_rows(odd / "corpus.jsonl", [{**d, "colour": "red"} for d in docs])
    with pytest.raises(Llama2VecError, match="fields the store does not have: colour"):
        from llama2vec.lance_store import update_store

        update_store(store, add, odd)
    write_jsonl_rows(odd / "corpus.jsonl", [{**d, "year": str(d["year"])} for d in docs])
    with pytest.raises(Llama2VecError, match="the field 'year' holds string values; the store's are int64"):
        update_store(store, add, odd)
    assert open_table(store)[0].count_rows() == 2900


def test_the_lancedb_embedding_function_encodes_as_llama2vec(tiny_model_dir, tmp_path):
    import lancedb
    from conftest import SENTENCES
    from lancedb.embeddings import get_registry
    from lancedb.pydantic import LanceModel, Vector

    import llama2vec.lance_embeddings  # noqa: F401 (registers "llama2vec")
    from llama2vec.encoder import Llama2Vec

    func = get_registry().get("llama2vec").create(name=str(tiny_model_dir))

    class Doc(LanceModel):
        text: str = func.SourceField()
        vector: Vector(func.ndims()) = func.VectorField()

    table = lancedb.connect(tmp_path / "db").create_table("docs", schema=Doc)
    table.add([{"text": t} for t in SENTENCES])  # LanceDB embeds them with the passage prompt
    model = Llama2Vec.from_pretrained(str(tiny_model_dir), device="cpu")
    rows = table.to_arrow().to_pylist()
    stored = np.array([r["vector"] for r in rows], dtype=np.float32)
    assert np.abs(stored - model.encode_corpus([r["text"] for r in rows])).max() <= 1e-5
    query = "Who won the final?"
    assert np.abs(np.asarray(func.compute_query_embeddings(query)[0]) - model.encode_queries([query])[0]).max() <= 1e-5
    hits = table.search(query).distance_type("dot").limit(3).to_arrow()  # the query embedded with the query prompt
    scores = model.encode_queries([query])[0] @ model.encode_corpus(SENTENCES).T
    assert hits["text"].to_pylist() == [SENTENCES[i] for i in np.argsort(-scores)[:3]]


def test_evaluate_searches_a_store_or_an_index_as_search_does(tiny_model_dir, tmp_path, capsys):
    """`evaluate --index`: a flat store and a FAISS Flat folder of the model's passage embeddings score as the
    exact search; --mode fts and hybrid (with --fusion auto chosen on --dev-split) score the runs `search` writes;
    another model's store is refused, naming both."""
    from conftest import SENTENCES

    from llama2vec.evaluate import evaluate, fuse_runs
    from llama2vec.formats import read_beir, write_qrels
    from llama2vec.lance_store import text_search
    from llama2vec.metrics import evaluate_run

    data = tmp_path / "data"
    docs = [{"_id": f"d{i}", "title": "", "text": t, "category": "ab"[i % 2 == 0]} for i, t in enumerate(SENTENCES)]
    write_jsonl_rows(data / "corpus.jsonl", docs)
    queries = {f"q{i}": " ".join(t.split()[1:4]) for i, t in enumerate(SENTENCES)}
    write_jsonl_rows(data / "queries.jsonl", [{"_id": q, "text": t} for q, t in queries.items()])
    write_qrels(data / "qrels" / "test.tsv", {f"q{i}": {f"d{i}": 1} for i in range(0, 8, 2)})
    write_qrels(data / "qrels" / "dev.tsv", {f"q{i}": {f"d{i}": 1} for i in range(1, 8, 2)})
    model = str(tiny_model_dir)
    assert main(["encode", "--model", model, "--dataset", str(data), "--what", "corpus", "--output",
                 str(tmp_path / "emb"), "--device", "cpu"]) == 0
    store, flat = tmp_path / "store", tmp_path / "flat"
    assert main(["index", "--embeddings", str(tmp_path / "emb"), "--output", str(store), "--store", "lancedb",
                 "--dataset", str(data)]) == 0
    assert main(["index", "--embeddings", str(tmp_path / "emb"), "--output", str(flat)]) == 0
    exact = evaluate(model=model, dataset=str(data), device="cpu", k=8)
    for index in (store, flat):
        assert evaluate(model=model, dataset=str(data), index=str(index), device="cpu", k=8) == exact
    test = read_beir(data, "test")
    fts = evaluate(dataset=str(data), index=str(store), mode="fts", k=8, save_run=str(tmp_path / "fts.trec"))
    want = text_search(store, list(test.queries), list(test.queries.values()), 8)
    assert fts == evaluate_run(test.qrels, want)
    # hybrid: the fusion chosen on the dev split's runs, then applied to the test split's
    saved = tmp_path / "hybrid.trec"
    assert main(["evaluate", "--model", model, "--dataset", str(data), "--index", str(store), "--mode", "hybrid",
                 "--fusion", "auto", "--dev-split", "dev", "--k", "8", "--device", "cpu", "--save-run", str(saved),
                 "--output", str(tmp_path / "m.json")]) == 0
    assert "full-text" in capsys.readouterr().out
    assert json.loads((tmp_path / "m.json").read_text()) == evaluate_run(test.qrels, read_run(saved))
    dev = read_beir(data, "dev")
    both = {**dev.queries, **test.queries}
    from llama2vec.encoder import Llama2Vec

    enc = Llama2Vec.from_pretrained(model, device="cpu")
    qids = list(both)
    dense = search_shards([store], qids, enc.encode_queries([both[q] for q in qids]), 8)
    lexical = text_search(store, qids, [both[q] for q in qids], 8)
    split = [{q: r[q] for q in test.qrels} for r in (dense, lexical)]
    dev_runs = [{q: r[q] for q in dev.qrels} for r in (dense, lexical)]
    want = fuse_runs(split, "auto", 8, dev_runs, dev.qrels)
    got = read_run(saved)
    assert {q: list(d) for q, d in got.items()} == {q: list(d) for q, d in want.items()}
    # filters, and what evaluate --index refuses
    filtered = tmp_path / "filtered.trec"
    evaluate(model=model, dataset=str(data), index=str(store), where="category = 'b'", device="cpu", k=8,
             save_run=str(filtered))
    assert all(d in {"d0", "d2", "d4", "d6"} for docs_ in read_run(filtered).values() for d in docs_)
    other = tmp_path / "other-model"
    import shutil

    shutil.copytree(tiny_model_dir, other)
    (other / "extra.txt").write_text("another model")
    with pytest.raises(Llama2VecError, match="come from the model"):
        evaluate(model=str(other), dataset=str(data), index=str(store), device="cpu")
    assert evaluate(model=str(other), dataset=str(data), index=str(store), device="cpu", k=8,
                    allow_model_mismatch=True)["ndcg@10"] >= 0
    for bad in (dict(mode="fts", index=str(flat)), dict(where="category = 'b'"), dict(mode="hybrid", fuse="bm25",
                                                                                    index=str(store))):
        with pytest.raises(Llama2VecError):
            evaluate(model=model, dataset=str(data), device="cpu", **bad)
