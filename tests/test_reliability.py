"""Nothing stale, nothing half-written, no traceback: fingerprinted caches, restartable runs,
readers and writers that fail cleanly, and a full disk."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import SENTENCES
from test_formats_metrics import write_beir

import llama2vec.encoder as encoder_mod
from llama2vec.cli import main
from llama2vec.data import PairDataset, build_pair_cache
from llama2vec.demo import DemoSettings, StageCache, evaluate_system
from llama2vec.embeddings import ListSource, encode_to_folder, load_embeddings
from llama2vec.encoder import Llama2Vec
from llama2vec.errors import Llama2VecError
from llama2vec.index import build_index, save_index, search_shards
from llama2vec.metrics import evaluate_run
from llama2vec.store import atomic_file, atomic_write, clean_stale, temp_path
from llama2vec.train import read_log

IDS = [f"d{i}" for i in range(len(SENTENCES))]


def tiny_folder_encoder(folder) -> Llama2Vec:
    return Llama2Vec.from_pretrained(str(folder), device="cpu", max_length=8)


# ------------------------------------------------------------------------------- 7. atomic writes


def test_atomic_writes_leave_the_old_file_or_the_new_one(tmp_path):
    path = atomic_write(tmp_path / "a.txt", "old")
    with pytest.raises(RuntimeError), atomic_file(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed half-way")
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]
    # A temporary of a process that is gone is removed by the next writer; a live one's is kept.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = temp_path(path).name.rsplit(".", 1)[1]
    stale = tmp_path / f".b.txt.tmp-{dead.stdout.strip()}.{host}"
    stale.write_text("left by a killed run")
    live = tmp_path / f".c.txt.tmp-{os.getppid()}.{host}"
    live.write_text("being written")
    # Another machine's temporary (a folder shared by jobs on several machines) is never taken for dead.
    elsewhere = tmp_path / f".e.txt.tmp-{dead.stdout.strip()}.another-machine"
    elsewhere.write_text("being written elsewhere")
    atomic_write(tmp_path / "d.txt", "new")
    assert not stale.exists() and live.exists() and elsewhere.exists() and (tmp_path / "d.txt").read_text() == "new"
    assert clean_stale(tmp_path) == [] and temp_path(path).name == f".a.txt.tmp-{os.getpid()}.{host}"


# ------------------------------------------------------------------------------- 1. stale reuse


def test_encode_refuses_embeddings_made_from_other_inputs(tiny_model_dir, tmp_path, monkeypatch):
    enc = tiny_folder_encoder(tiny_model_dir)
    out = tmp_path / "emb"
    encode_to_folder(enc, ListSource(IDS, SENTENCES), out, "passage", shard_size=3)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["fingerprint"]["dtype"] == "float32" and meta["fingerprint"]["model"].startswith("folder:")

    monkeypatch.setattr(encoder_mod.Llama2Vec, "encode_ids", lambda *a, **k: pytest.fail("encoded again"))
    assert encode_to_folder(enc, ListSource(IDS, SENTENCES), out, "passage", shard_size=3) == out  # the same: reused
    with pytest.raises(Llama2VecError, match=r"another dtype: pass --overwrite"):
        encode_to_folder(enc, ListSource(IDS, SENTENCES), out, "passage", shard_size=3, dtype="float16")
    with pytest.raises(Llama2VecError, match=r"another texts"):
        encode_to_folder(enc, ListSource(IDS, [t.upper() for t in SENTENCES]), out, "passage", shard_size=3)
    with pytest.raises(Llama2VecError, match=r"another kind, task:"):
        encode_to_folder(enc, ListSource(IDS, SENTENCES), out, "query", shard_size=3)
    enc.spec.prefix = "Another prefix: "
    with pytest.raises(Llama2VecError, match=r"another prompt"):
        encode_to_folder(enc, ListSource(IDS, SENTENCES), out, "passage", shard_size=3)

    monkeypatch.undo()
    enc = tiny_folder_encoder(tiny_model_dir)
    encode_to_folder(enc, ListSource(IDS, SENTENCES), out, "passage", shard_size=3, dtype="float16", overwrite=True)
    ids, emb = load_embeddings(out)
    assert ids == IDS and emb.dtype == np.float16

    # Finished shards of an interrupted run count too: resuming them with other options is refused.
    calls = []

    def dies_on_second_shard(self, rows, task, batch_size=None):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, rows, task, batch_size)

    real = Llama2Vec.encode_ids
    monkeypatch.setattr(encoder_mod.Llama2Vec, "encode_ids", dies_on_second_shard)
    with pytest.raises(KeyboardInterrupt):
        encode_to_folder(enc, ListSource(IDS, SENTENCES), tmp_path / "part", "passage", shard_size=3)
    with pytest.raises(Llama2VecError, match=r"shards: holds embeddings made with another shard_size"):
        encode_to_folder(enc, ListSource(IDS, SENTENCES), tmp_path / "part", "passage", shard_size=4)


def test_a_folder_never_mixes_precisions_or_devices(tiny_model_dir, tmp_path):
    """Processes that share a folder must compute alike: one in bfloat16 joining a float32 folder is refused
    (its shards would not compare), as is a Ray actor, and shards that slipped through are caught at merge."""
    import torch

    from llama2vec import __version__
    from llama2vec.embeddings import encode_fingerprint, merge, prepare
    from llama2vec.ray_engine import ShardEncoder

    fp32 = tiny_folder_encoder(tiny_model_dir)
    bf16 = tiny_folder_encoder(tiny_model_dir)
    bf16.model.to(torch.bfloat16)
    source, out = ListSource(IDS, SENTENCES), tmp_path / "emb"
    encode_to_folder(fp32, source, out, "passage", shard_size=2, num_shards=2, shard_index=0)
    with pytest.raises(Llama2VecError, match=r"computed in float32 on cpu, this process computes in bfloat16 on cpu"):
        encode_to_folder(bf16, source, out, "passage", shard_size=2, num_shards=2, shard_index=1)
    # A Ray actor checks itself when it starts: the folder says bfloat16 on cuda here.
    fp = encode_fingerprint(str(tiny_model_dir), fp32.spec, "torch", source, "passage", 2, "float32")
    job = prepare(tmp_path / "ray", source, "passage", "float32", fp, 2)
    (job.shards / "compute.json").write_text(json.dumps({"dtype": "bfloat16", "device": "cuda"}))
    with pytest.raises(Llama2VecError, match=r"computed in bfloat16 on cuda, this process computes in float32 on cpu"):
        ShardEncoder(str(tiny_model_dir), "torch", 4, job)
    # Two processes that raced past the check: merge reads every shard's record and refuses the mix.
    (out / "shards" / "compute.json").unlink()
    mixed = r"shards were computed differently \(float32 on cpu: shards 0, 2; bfloat16 on cpu: shards 1, 3\)"
    with pytest.raises(Llama2VecError, match=mixed):  # the last process to finish merges, and refuses
        encode_to_folder(bf16, source, out, "passage", shard_size=2, num_shards=2, shard_index=1)
    with pytest.raises(Llama2VecError, match=mixed):
        merge(out)
    assert not (out / "meta.json").exists()
    # Made alike, the folder records how it was computed and with which version.
    encode_to_folder(fp32, source, tmp_path / "ok", "passage", shard_size=2)
    meta = json.loads((tmp_path / "ok" / "meta.json").read_text())
    assert meta["compute"] == {"dtype": "float32", "device": "cpu"} and meta["fingerprint"]["version"] == __version__
    with pytest.raises(Llama2VecError, match=r"computed in float32 on cpu, this run computes in bfloat16 on cpu"):
        encode_to_folder(bf16, source, tmp_path / "ok", "passage", shard_size=2)


def test_encode_cli_names_the_difference_and_the_flag(tiny_model_dir, tmp_path, capsys):
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"_id": i, "text": t}) + "\n" for i, t in zip(IDS, SENTENCES)))
    args = ["encode", "--model", str(tiny_model_dir), "--input", str(data), "--output", str(tmp_path / "e"),
            "--device", "cpu"]
    assert main(args) == 0
    assert main([*args, "--dtype", "float16"]) == 2
    err = capsys.readouterr().err
    assert "made with another dtype" in err and "--overwrite" in err and "Traceback" not in err
    assert main([*args, "--dtype", "float16", "--overwrite"]) == 0


def test_pair_cache_is_rebuilt_when_the_corpus_changes(tokenizer, tmp_path):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text(json.dumps({"text": " ".join(SENTENCES)}) + "\n")
    folder = build_pair_cache(corpus, tokenizer, tmp_path / "pairs", chunk_tokens=24, min_chunk_tokens=4)
    first = [PairDataset(folder)[i]["text"] for i in range(len(PairDataset(folder)))]
    # Same size and modification time, other words: only the content tells.
    text = corpus.read_text()
    stat = corpus.stat()
    corpus.write_text(text.replace("cat", "dog"))
    os.utime(corpus, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    build_pair_cache(corpus, tokenizer, tmp_path / "pairs", chunk_tokens=24, min_chunk_tokens=4)
    second = [PairDataset(folder)[i]["text"] for i in range(len(PairDataset(folder)))]
    assert second != first
    assert tokenizer.decode(second[0]).startswith("The dog sat")


def test_stage_cache_recomputes_what_other_settings_made(tmp_path, capsys):
    cache = StageCache(tmp_path)
    stage = tmp_path / "eval" / "bm25.json"
    key = cache.claim(stage, data="a", k=10)
    atomic_write(stage, "{}")
    assert StageCache(tmp_path).claim(stage, data="a", k=10) == key and stage.exists()  # same: kept
    assert capsys.readouterr().out == ""
    other = StageCache(tmp_path).claim(stage, data="b", k=10)
    assert other != key and not stage.exists()
    assert "eval/bm25.json: made with another data: recomputed" in capsys.readouterr().out
    # An output that no record claims (left by older code) is recomputed too.
    model = tmp_path / "adapted"
    model.mkdir()
    (model / "config.json").write_text("{}")
    StageCache(tmp_path).claim(model, steps=2)
    assert not model.exists()


# ------------------------------------------------------------------------------- 2. a failed run


def test_a_failed_adapt_does_not_block_the_corrected_command(tiny_model_dir, tiny_corpus, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(tiny_corpus.read_text().splitlines()[0] + "\n{not json\n")
    out = tmp_path / "out"
    args = ["--model", str(tiny_model_dir), "--output", str(out), "--max-steps", "2", "--batch-size", "2",
            "--max-length", "24"]
    assert main(["adapt", "--corpus", str(bad), *args]) == 2
    assert f"{bad}:2: invalid JSON" in capsys.readouterr().err
    assert main(["adapt", "--corpus", str(tiny_corpus), *args]) == 0
    assert (out / "llama2vec_config.json").is_file()
    # A finished run is still protected.
    assert main(["adapt", "--corpus", str(tiny_corpus), *args]) == 2
    assert "pass --overwrite" in capsys.readouterr().err


# ------------------------------------------------------------------------------- 3. corpus-only folders


def test_encode_a_beir_folder_without_qrels(tiny_model_dir, tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "corpus.jsonl").write_text("".join(json.dumps({"_id": i, "title": "", "text": t}) + "\n"
                                                 for i, t in zip(IDS, SENTENCES)))
    assert main(["encode", "--model", str(tiny_model_dir), "--dataset", str(folder), "--what", "corpus",
                 "--output", str(tmp_path / "e"), "--device", "cpu"]) == 0
    assert load_embeddings(tmp_path / "e")[0] == IDS
    (folder / "queries.jsonl").write_text(json.dumps({"_id": "q1", "text": "a cat"}) + "\n")
    assert main(["encode", "--model", str(tiny_model_dir), "--dataset", str(folder), "--what", "queries",
                 "--output", str(tmp_path / "q"), "--device", "cpu"]) == 0
    assert load_embeddings(tmp_path / "q")[0] == ["q1"]


# ------------------------------------------------------------------------------- 4. cut-short files


def test_resume_survives_a_log_line_cut_by_a_kill(tiny_model_dir, tiny_corpus, tmp_path):
    out = tmp_path / "out"
    args = ["adapt", "--model", str(tiny_model_dir), "--corpus", str(tiny_corpus), "--output", str(out),
            "--batch-size", "2", "--max-length", "24", "--logging-steps", "1", "--save-steps", "2", "--resume"]
    assert main([*args, "--max-steps", "2"]) == 0
    with (out / "log.jsonl").open("a") as fh:
        fh.write('{"step": 3, "loss": 4.2')  # the process died in the middle of this line
    assert [r["step"] for r in read_log(out)] == [1, 2]
    assert main([*args, "--max-steps", "4"]) == 0
    assert [r["step"] for r in read_log(out)] == [1, 2, 3, 4]
    (out / "log.jsonl").write_text('{"step": 1}\n{broken\n{"step": 2}\n')  # not the last line: an error
    with pytest.raises(Llama2VecError, match=r"log.jsonl:2: not a JSON log record"):
        read_log(out)


def test_a_cut_short_demo_metric_file_is_recomputed(tmp_path):
    docs = {i: t for i, t in zip(IDS, SENTENCES)}
    beir = write_beir(tmp_path / "beir", docs, {"q0": "cat mat sunny"}, {"q0": {"d0": 1}})
    metrics = tmp_path / "bm25.json"
    metrics.write_text('{"ndcg@10": 0.')
    s = DemoSettings(adapt_steps=1, adapt_batch=1, adapt_lr=1e-3, main_queries=1, finetune_batch=1, group_size=1,
                     passage_max_length=8, query_max_length=8, eval_queries=None, distractors=None)
    got = evaluate_system("bm25", beir, metrics, s)
    assert got["ndcg@10"] == 1.0 and json.loads(metrics.read_text()) == got


# ------------------------------------------------------------------------------- 5. errors, not tracebacks


def test_an_os_error_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    def full_disk(output):
        raise OSError(28, "No space left on device", str(output))

    monkeypatch.setattr("llama2vec.data.build_wiki", full_disk)
    assert main(["data", "wiki", "--output", str(tmp_path / "w.jsonl")]) == 1
    err = capsys.readouterr().err
    assert err == f"llama2vec: error: {tmp_path / 'w.jsonl'}: No space left on device\n"


def test_empty_inputs_are_errors(tiny_model_dir, tmp_path):
    enc = tiny_folder_encoder(tiny_model_dir)
    with pytest.raises(Llama2VecError, match="nothing to encode"):
        encode_to_folder(enc, ListSource([], []), tmp_path / "e", "passage")
    with pytest.raises(Llama2VecError, match="nothing to index"):
        build_index(np.zeros((0, 8), dtype=np.float32))
    from llama2vec.mine import mine

    beir = write_beir(tmp_path / "beir", {"d0": "a text"}, {"q0": "a query"}, {})
    with pytest.raises(Llama2VecError, match="no queries to mine negatives for"):
        mine(tmp_path / "m.jsonl", dataset=str(beir), split="test")
    assert not (tmp_path / "m.jsonl").exists()


def test_silent_wrong_results_are_errors(tmp_path, caplog):
    emb = np.eye(4, dtype=np.float32)
    save_index(tmp_path / "a", build_index(emb[:2]), ["x", "y"], "Flat")
    save_index(tmp_path / "b", build_index(emb[2:]), ["y", "z"], "Flat")
    with pytest.raises(Llama2VecError, match=r"ids also in .*a: y"):
        search_shards([tmp_path / "a", tmp_path / "b"], ["q"], emb[:1], 2)
    (tmp_path / "b" / "ids.txt").write_text("y\n")  # an id lost: every hit after it would name the wrong passage
    with pytest.raises(Llama2VecError, match=r"b: index.faiss holds 2 vectors, ids.txt 1 ids: the folder is damaged"):
        search_shards([tmp_path / "b"], ["q"], emb[:1], 2)
    with pytest.raises(Llama2VecError, match=r"qrels.tsv: no positive judgement .* 2 queries"):
        evaluate_run({"q1": {"d1": 0}, "q2": {"d2": 0}}, {"q1": {"d1": 1.0}}, "qrels.tsv")
    assert evaluate_run({"q1": {"d1": 1}, "q2": {"d2": 0}}, {"q1": {"d1": 1.0}})["ndcg@10"] == 1.0
    assert "1 of 2 queries have no positive judgement" in caplog.text


def test_a_tokenizer_without_pad_eos_or_unk(tmp_path):
    from conftest import make_tokenizer

    from llama2vec.models import load_tokenizer

    tok = make_tokenizer()
    tok.pad_token = tok.eos_token = tok.unk_token = None
    tok.save_pretrained(tmp_path / "t")
    assert load_tokenizer(str(tmp_path / "t")).pad_token == "<bos>"  # padding is masked: any token serves
    tok.bos_token = None
    tok.save_pretrained(tmp_path / "u")
    with pytest.raises(Llama2VecError, match="no pad, EOS, unknown or BOS token"):
        load_tokenizer(str(tmp_path / "u"))


# ------------------------------------------------------------------------------- 6. truncation


def test_truncation_is_counted_and_stored(tiny_model_dir, tiny_corpus, tmp_path):
    enc = tiny_folder_encoder(tiny_model_dir)  # passages cut to 8 tokens
    out = encode_to_folder(enc, ListSource(IDS, SENTENCES), tmp_path / "e", "passage")
    lengths = [len(r) for r in enc.tokenize(SENTENCES)]
    meta = json.loads((out / "meta.json").read_text())
    assert meta["truncated"] == sum(n > 8 for n in lengths) > 0 and meta["texts"] == len(SENTENCES)
    assert meta["truncated_share"] == round(meta["truncated"] / len(SENTENCES), 4) and meta["max_length"] == 8


def test_adapt_and_finetune_count_what_they_cut(tiny_model_dir, tiny_corpus, tmp_path, caplog):
    from llama2vec.adapt import ADAPT_CONFIGS, adapt
    from llama2vec.cli import build_parser
    from llama2vec.config import FINETUNE_CONFIGS, build_configs
    from llama2vec.finetune import finetune

    common = ["--model", str(tiny_model_dir), "--max-steps", "1", "--batch-size", "2"]
    args = build_parser().parse_args(["adapt", *common, "--corpus", str(tiny_corpus), "--output", str(tmp_path / "a"),
                                      "--chunk-tokens", "40", "--max-length", "16"])
    cut = adapt(*build_configs(args, *ADAPT_CONFIGS))["truncation"]
    pairs = PairDataset(tmp_path / "a" / "data" / "pairs")
    lengths = [len(pairs[i][key]) for i in range(len(pairs)) for key in ("text", "next")]
    assert cut["truncated"] == sum(n > 16 for n in lengths) > 0 and cut["texts"] == len(lengths)
    assert f"{cut['truncated']} of {len(lengths)} adaptation chunks" in caplog.text

    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"query": SENTENCES[i], "pos": [SENTENCES[i + 1]], "neg": [SENTENCES[i + 2]]})
                             + "\n" for i in range(4)))
    args = build_parser().parse_args(["finetune", *common, "--train", str(train), "--output", str(tmp_path / "f"),
                                      "--group-size", "2", "--query-max-length", "6", "--passage-max-length", "1000"])
    cut = finetune(*build_configs(args, *FINETUNE_CONFIGS))["truncation"]
    assert cut["queries"]["texts"] == 4 and cut["queries"]["truncated"] == 4  # every sentence is over 6 tokens
    assert cut["passages"] == {"texts": 5, "truncated": 0, "truncated_share": 0.0, "max_length": 1000}


# ------------------------------------------------------------------------------- a full disk


def _with_file_size_limit(limit: int):
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead

    return apply


def _cli(args: list[str], limit: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run([sys.executable, "-m", "llama2vec", *args], capture_output=True, text=True, env=env,
                          preexec_fn=_with_file_size_limit(limit), timeout=300)


@pytest.mark.slow
def test_a_full_disk_fails_cleanly_and_leaves_nothing_that_looks_complete(tiny_model_dir, tiny_corpus, tmp_path):
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"_id": f"d{i}", "text": f"{i} {t}"}) + "\n"
                            for i, t in enumerate(SENTENCES * 5)))
    out = tmp_path / "emb"
    done = _cli(["encode", "--model", str(tiny_model_dir), "--input", str(data), "--output", str(out),
                 "--shard-size", "4", "--device", "cpu"], limit=1200)  # shards fit, the manifest (1.3 kB) not
    assert done.returncode == 2, done.stderr
    assert f"llama2vec: error: {out / 'meta.json'}: cannot write: " in done.stderr
    assert "Traceback" not in done.stderr
    assert not (out / "meta.json").exists() and not list(out.rglob("*.tmp-*"))
    assert len(list((out / "shards").glob("shard-*.json"))) == 10  # kept for the run after space is freed

    ad = tmp_path / "adapted"
    done = _cli(["adapt", "--model", str(tiny_model_dir), "--corpus", str(tiny_corpus), "--output", str(ad),
                 "--max-steps", "2", "--save-steps", "1", "--batch-size", "2", "--max-length", "24"],
                limit=60_000)  # the pair cache fits, a checkpoint of the model and optimizer not
    assert done.returncode == 2, done.stderr
    assert f"llama2vec: error: {ad / 'checkpoints' / 'checkpoint-1'}: cannot write the checkpoint" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (ad / "llama2vec_config.json").exists() and not (ad / "model.safetensors").exists()
    assert not list((ad / "checkpoints").iterdir()) and not list(ad.rglob("*.tmp-*"))
    # With space again, the same command runs (the failed run left nothing that blocks it).
    assert main(["adapt", "--model", str(tiny_model_dir), "--corpus", str(tiny_corpus), "--output", str(ad),
                 "--max-steps", "2", "--save-steps", "1", "--batch-size", "2", "--max-length", "24"]) == 0
    assert Path(ad / "llama2vec_config.json").is_file()
