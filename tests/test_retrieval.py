"""Contrastive loss, encoding, indexing and the whole retrieval pipeline on tiny models."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SENTENCES, make_model, make_tokenizer
from test_formats_metrics import write_beir

import llama2vec.encoder as encoder_mod
from llama2vec.cli import main
from llama2vec.config import PromptConfig
from llama2vec.embeddings import ListSource, encode_to_folder, load_embeddings
from llama2vec.encoder import Llama2Vec, pool
from llama2vec.errors import Llama2VecError
from llama2vec.evaluate import fuse_rrf
from llama2vec.finetune import infonce
from llama2vec.formats import read_qrels, read_run
from llama2vec.index import build_index, exact_search, load_index, save_index, search_index, search_shards
from llama2vec.losses import decoder_states
from llama2vec.metrics import evaluate_run
from llama2vec.models import add_placeholder_tokens
from llama2vec.prompts import resolve_prompt

TEXTS = SENTENCES + ["Short.", "A somewhat longer text about markets, music and sport, to vary the lengths."]


def tiny_encoder(preset="llara", seed=0, **kwargs) -> Llama2Vec:
    tok = make_tokenizer()
    model = make_model(len(tok), seed=seed)
    spec = resolve_prompt(PromptConfig(prompt_preset=preset), max_length=32)
    add_placeholder_tokens(tok, model, spec.new_tokens())
    return Llama2Vec(model, tok, spec, **kwargs)


# ---------------------------------------------------------------------------------------------- loss


def test_infonce_by_hand():
    torch.manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(2, 5), dim=-1)
    p = torch.nn.functional.normalize(torch.randn(6, 5), dim=-1)  # groups of 3: [pos, hard, hard] x 2
    t, G = 0.1, 3
    expected = 0.0
    for i in range(2):
        scores = [float(q[i] @ p[j]) / t for j in range(6)]  # own group + the other query's group
        expected += -(scores[i * G] - math.log(sum(math.exp(s) for s in scores)))
    assert infonce(q, p, t, G).item() == pytest.approx(expected / 2, rel=1e-5)
    # With an offset the positives move: query i's positive is p[(offset + i) * G].
    assert infonce(q[1:], p, t, G, offset=1).item() == pytest.approx(
        -(float(q[1] @ p[3]) / t - math.log(sum(math.exp(float(q[1] @ p[j]) / t) for j in range(6)))), rel=1e-5)


@pytest.mark.slow
def test_cross_process_loss_equals_single_process(tmp_path):
    out = tmp_path / "r.json"
    script = Path(__file__).parent / "scripts" / "dist_infonce.py"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", str(script),
                           str(out)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["distributed"] == pytest.approx(r["single"], rel=1e-5)
    assert r["grad_diff"] <= 1e-5 * max(1.0, r["grad_scale"])


# ---------------------------------------------------------------------------------------------- encoding


def test_batched_equals_one_by_one():
    enc = tiny_encoder()
    batched = enc.encode_corpus(TEXTS, batch_size=4)
    single = np.stack([enc.encode_corpus([t], batch_size=1)[0] for t in TEXTS])
    np.testing.assert_allclose(batched, single, atol=1e-5)
    assert np.allclose(np.linalg.norm(batched, axis=1), 1.0, atol=1e-5)
    q = enc.encode_queries(TEXTS[:3])
    assert not np.allclose(q, batched[:3])  # queries use the NEXT prompt


def test_left_and_right_padding_give_the_same_embeddings():
    enc = tiny_encoder()
    cut, task = enc.fit(enc.tokenize(TEXTS), "passage")
    rows = [enc.ids.wrap(r, task) for r in cut]
    left = enc.encode_corpus(TEXTS)
    L = max(len(r) for r in rows)
    ids = torch.tensor([r + [enc.tokenizer.pad_token_id] * (L - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (L - len(r)) for r in rows])
    positions = torch.arange(L).expand(len(rows), L)
    with torch.no_grad():
        states = decoder_states(enc.model, ids, positions, mask)  # (B, L, H)
        last = torch.stack([states[b, len(r) - enc.ids.k: len(r)] for b, r in enumerate(rows)])
    np.testing.assert_allclose(pool(last, "mean").numpy(), left, atol=1e-5)


def test_paper_preset_pools_the_final_eos():
    enc = tiny_encoder("paper")
    assert enc.ids.k == 1 and enc.spec.pooling == "last"
    emb = enc.encode_corpus(TEXTS[:3])
    assert emb.shape == (3, 32) and np.isfinite(emb).all()


def test_merged_and_unmerged_lora_give_the_same_embeddings():
    from peft import LoraConfig, get_peft_model

    enc = tiny_encoder()
    torch.manual_seed(3)
    peft_model = get_peft_model(enc.model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                      init_lora_weights=False))
    unmerged = Llama2Vec(peft_model, enc.tokenizer, enc.spec).encode_corpus(TEXTS)
    merged_model = peft_model.merge_and_unload()
    merged = Llama2Vec(merged_model, enc.tokenizer, enc.spec).encode_corpus(TEXTS)
    np.testing.assert_allclose(unmerged, merged, atol=1e-5)
    plain = tiny_encoder().encode_corpus(TEXTS)
    assert not np.allclose(plain, merged, atol=1e-3)  # the adapters did change the model


def test_from_pretrained_on_a_plain_folder(tiny_model_dir):
    enc = Llama2Vec.from_pretrained(str(tiny_model_dir), device="cpu")
    assert enc.spec.preset == "llara" and enc.spec.query_task == "next"
    assert enc.tokenizer.convert_tokens_to_ids("<s16>") == len(enc.tokenizer) - 1
    assert enc.encode_queries(["a query"]).shape == (1, 32)


def test_encode_to_folder_resumes_after_a_kill(tmp_path, monkeypatch):
    enc = tiny_encoder()
    ids = [f"d{i}" for i in range(len(TEXTS))]
    calls = []
    real = Llama2Vec.encode_ids

    def dies_on_second_shard(self, rows, task, batch_size=None):
        calls.append(len(rows))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, rows, task, batch_size)

    monkeypatch.setattr(encoder_mod.Llama2Vec, "encode_ids", dies_on_second_shard)
    with pytest.raises(KeyboardInterrupt):
        encode_to_folder(enc, ListSource(ids, TEXTS), tmp_path / "emb", "passage", shard_size=4, dtype="float16")
    assert not (tmp_path / "emb" / "meta.json").exists()
    assert len(list((tmp_path / "emb" / "shards").glob("shard-*.npy"))) == 1
    monkeypatch.setattr(encoder_mod.Llama2Vec, "encode_ids", real)
    calls.clear()
    out = encode_to_folder(enc, ListSource(ids, TEXTS), tmp_path / "emb", "passage", shard_size=4, dtype="float16")
    got_ids, emb = load_embeddings(out)
    assert got_ids == ids and emb.dtype == np.float16
    np.testing.assert_allclose(emb.astype(np.float32), enc.encode_corpus(TEXTS), atol=2e-3)


# ---------------------------------------------------------------------------------------------- index


def random_unit(n, d, seed):
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_faiss_exact_search_equals_brute_force():
    p, q = random_unit(500, 16, 0), random_unit(20, 16, 1)
    scores, found = search_index(build_index(p, "Flat"), q, k=10, batch_size=7)
    brute = q @ p.T
    expected = np.argsort(-brute, axis=1)[:, :10]
    np.testing.assert_array_equal(found, expected)
    np.testing.assert_allclose(scores, np.take_along_axis(brute, expected, 1), atol=1e-5)


def test_sharded_search_equals_whole_search(tmp_path):
    p, q = random_unit(300, 8, 2), random_unit(10, 8, 3)
    ids = [f"d{i}" for i in range(300)]
    folders = []
    for s, (lo, hi) in enumerate([(0, 100), (100, 220), (220, 300)]):
        folders.append(save_index(tmp_path / f"shard{s}", build_index(p[lo:hi]), ids[lo:hi], "Flat"))
    qids = [f"q{i}" for i in range(10)]
    whole = exact_search(q, p, qids, ids, 25)
    sharded = search_shards(folders, qids, q, 25)
    assert {k: list(v) for k, v in whole.items()} == {k: list(v) for k, v in sharded.items()}


@pytest.mark.slow
def test_approximate_indexes_and_round_trip(tmp_path):
    p, q = random_unit(2000, 32, 4), random_unit(50, 32, 5)
    exact = search_index(build_index(p, "Flat"), q, 10)[1]
    for factory in ("HNSW32", "IVF16,PQ8"):
        ids = [str(i) for i in range(2000)]
        folder = save_index(tmp_path / factory.replace(",", "_"), build_index(p, factory), ids, factory)
        index, ids = load_index(folder)
        found = search_index(index, q, 10)[1]
        recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, exact)])
        assert recall > (0.9 if factory == "HNSW32" else 0.15), factory
        if factory.startswith("IVF"):  # probing every list leaves only the PQ error
            wider = search_index(index, q, 10, params="nprobe=16")[1]
            assert np.mean([len(set(a) & set(b)) / 10 for a, b in zip(wider, exact)]) > recall
    with pytest.raises(Llama2VecError, match="bad FAISS index factory"):
        build_index(p, "NoSuchIndex")


def test_pq_codebooks_trained_without_the_polysemous_step_find_the_same():
    """FAISS's polysemous step (on by default, most of an IVF-PQ's training time) only reorders the codes: the
    index llama2vec builds without it finds the same passages with the same scores."""
    import faiss

    from llama2vec.index import new_index

    p, q = random_unit(2000, 16, 6), random_unit(30, 16, 7)
    fast = build_index(p, "IVF8,PQ2")
    assert not faiss.downcast_index(faiss.extract_index_ivf(fast)).do_polysemous_training
    slow = faiss.index_factory(16, "IVF8,PQ2", faiss.METRIC_INNER_PRODUCT)  # FAISS's default
    slow.train(p)
    slow.add(p)
    for params in (None, "nprobe=8"):
        (fs, fi), (ss, si) = search_index(fast, q, 10, params=params), search_index(slow, q, 10, params=params)
        np.testing.assert_array_equal(fi, si)
        assert np.abs(fs - ss).max() <= 1e-6
    behind_pca = new_index(16, "IVF8,PQ2", pca=8)
    assert not faiss.downcast_index(faiss.extract_index_ivf(behind_pca)).do_polysemous_training
    assert not faiss.downcast_index(new_index(16, "PQ4")).do_polysemous_training


# ---------------------------------------------------------------------------------------------- pipeline


@pytest.mark.slow
def test_finetune_encode_index_search_evaluate(tiny_model_dir, tmp_path):
    beir, docs = small_beir(tmp_path)
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"query": " ".join(docs[f"d{i}"].split()[:4]), "pos": [docs[f"d{i}"]],
                                         "neg": [docs[f"d{(i + 1) % 8}"], docs[f"d{(i + 2) % 8}"]]}) + "\n"
                             for i in range(8)))
    model = tmp_path / "ft"
    assert main(["finetune", "--model", str(tiny_model_dir), "--train", str(train), "--output", str(model),
                 "--max-steps", "3", "--batch-size", "2", "--group-size", "3", "--lora-r", "4",
                 "--learning-rate", "1e-3", "--logging-steps", "1"]) == 0
    saved = json.loads((model / "llama2vec_config.json").read_text())
    assert saved["query_max_length"] == 64 and saved["max_length"] == 128 and saved["query_task"] == "next"
    log = [json.loads(line) for line in (model / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3] and all(math.isfinite(r["loss"]) for r in log)

    for what in ("corpus", "queries"):
        assert main(["encode", "--model", str(model), "--dataset", str(beir), "--what", what,
                     "--output", str(tmp_path / what)]) == 0
    assert main(["index", "--embeddings", str(tmp_path / "corpus"), "--output", str(tmp_path / "index")]) == 0
    assert main(["search", "--index", str(tmp_path / "index"), "--queries", str(tmp_path / "queries"),
                 "--k", "8", "--output", str(tmp_path / "run.trec")]) == 0
    lines = (tmp_path / "run.trec").read_text().splitlines()
    assert len(lines) == 8 * 8
    assert main(["evaluate", "--run", str(tmp_path / "run.trec"), "--qrels", str(beir / "qrels" / "test.tsv"),
                 "--output", str(tmp_path / "m1.json")]) == 0
    m1 = json.loads((tmp_path / "m1.json").read_text())
    assert set(m1) == {"ndcg@10", "mrr@10", "recall@100", "recall@1000", "map"}
    assert main(["evaluate", "--model", str(model), "--dataset", str(beir), "--split", "test",
                 "--output", str(tmp_path / "m2.json")]) == 0
    m2 = json.loads((tmp_path / "m2.json").read_text())
    assert m2["ndcg@10"] == pytest.approx(m1["ndcg@10"], abs=1e-6)  # end to end = the staged pipeline
    assert main(["evaluate", "--model", "bm25", "--dataset", str(beir), "--save-run", str(tmp_path / "bm25.trec"),
                 "--output", str(tmp_path / "bm25.json")]) == 0
    # Each query is its passage's first words: BM25 ranks every passage first for its own query.
    assert json.loads((tmp_path / "bm25.json").read_text())["mrr@10"] == 1.0
    assert main(["evaluate", "--model", str(model), "--dataset", str(beir), "--fuse", "bm25",
                 "--output", str(tmp_path / "m3.json")]) == 0
    fused = fuse_rrf([read_run(tmp_path / "run.trec"), read_run(tmp_path / "bm25.trec")])
    expected = evaluate_run(read_qrels(beir / "qrels" / "test.tsv"), fused)
    assert json.loads((tmp_path / "m3.json").read_text()) == pytest.approx(expected, abs=1e-9)


def small_beir(tmp_path):
    docs = {f"d{i}": s for i, s in enumerate(SENTENCES)}
    queries = {f"q{i}": " ".join(s.split()[:4]) for i, s in enumerate(SENTENCES)}
    return write_beir(tmp_path / "beir", docs, queries, {f"q{i}": {f"d{i}": 1} for i in range(len(SENTENCES))}), docs


def test_dense_mining_never_returns_positives(tiny_model_dir, tmp_path):
    from llama2vec.mine import mine

    beir, docs = small_beir(tmp_path)
    out = tmp_path / "mined.jsonl"
    assert mine(out, dataset=str(beir), split="test", method="dense", model=str(tiny_model_dir), negatives=3,
                rank_range=(1, 6)) == 8
    for row in map(json.loads, out.read_text().splitlines()):
        assert len(row["neg"]) == 3 and row["pos"][0] not in row["neg"]
        assert set(row["neg"]) <= set(docs.values())


@pytest.mark.slow
def test_full_finetune_of_an_untied_model_runs_under_torchrun(tmp_path):
    tok = make_tokenizer()
    model = make_model(len(tok))
    model.config.tie_word_embeddings = False
    untied = type(model)(model.config).eval()  # separate LM head weights
    assert untied.lm_head.weight is not untied.model.embed_tokens.weight
    model_dir = tmp_path / "untied"
    untied.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"query": s[:20], "pos": [s], "neg": [SENTENCES[(i + 1) % 8]]}) + "\n"
                             for i, s in enumerate(SENTENCES)))
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "llama2vec", "finetune",
           "--model", str(model_dir), "--train", str(train), "--output", str(out), "--device", "cpu",
           "--max-steps", "2", "--batch-size", "2", "--group-size", "2", "--logging-steps", "1", "--full"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "llama2vec_config.json").is_file()
    assert [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()] == [1, 2]
    from safetensors.torch import load_file

    before, after = load_file(model_dir / "model.safetensors"), load_file(out / "model.safetensors")
    assert torch.equal(before["lm_head.weight"], after["lm_head.weight"][: before["lm_head.weight"].shape[0]])
    assert not torch.equal(before["model.layers.0.mlp.up_proj.weight"], after["model.layers.0.mlp.up_proj.weight"])


def test_queries_of_another_model_are_refused_naming_both(tiny_model_dir, tmp_path, capsys):
    """An index of one model's passages and queries encoded by another (same width): an error naming both models,
    not results; --allow-model-mismatch searches anyway; another width is refused whatever the flag."""
    from llama2vec.formats import write_jsonl_rows
    from llama2vec.index import check_queries

    other = tmp_path / "other-model"
    tok = make_tokenizer()
    make_model(len(tok), seed=1).save_pretrained(other)
    tok.save_pretrained(other)
    data = tmp_path / "data"
    write_jsonl_rows(data / "corpus.jsonl", ({"_id": f"d{i}", "text": t} for i, t in enumerate(SENTENCES)))
    write_jsonl_rows(data / "queries.jsonl", ({"_id": "q0", "text": "who sat on the mat?"},))
    encode = ["encode", "--dataset", str(data), "--device", "cpu"]
    assert main([*encode, "--model", str(tiny_model_dir), "--what", "corpus", "--output", str(tmp_path / "c")]) == 0
    assert main([*encode, "--model", str(other), "--what", "queries", "--output", str(tmp_path / "q")]) == 0
    assert main(["index", "--embeddings", str(tmp_path / "c"), "--output", str(tmp_path / "i")]) == 0
    search = ["search", "--index", str(tmp_path / "i"), "--queries", str(tmp_path / "q"), "--k", "3",
              "--output", str(tmp_path / "run.trec")]
    capsys.readouterr()
    assert main(search) == 2
    err = capsys.readouterr().err
    assert "come from the model folder:" in err and "--allow-model-mismatch" in err
    assert not (tmp_path / "run.trec").exists()
    assert main([*search, "--allow-model-mismatch"]) == 0 and (tmp_path / "run.trec").is_file()
    with pytest.raises(Llama2VecError, match="16-dimension vectors; the index .* holds 32-dimension"):
        check_queries([tmp_path / "i"], None, 16, "the queries", allow_mismatch=True)


def test_a_model_card_rewritten_keeps_the_model_the_same(tiny_model_dir):
    """`evaluate` writes its figures into a model's card: the model, as encodings and indexes know it, is the same."""
    from llama2vec.store import model_identity

    before = model_identity(str(tiny_model_dir))
    (tiny_model_dir / "README.md").write_text("# figures\n")
    assert model_identity(str(tiny_model_dir)) == before
    (tiny_model_dir / "config.json").write_text((tiny_model_dir / "config.json").read_text() + " ")
    assert model_identity(str(tiny_model_dir)) != before
