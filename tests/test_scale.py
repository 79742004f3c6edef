"""Corpora larger than memory: streamed, sharded encoding on several processes, jobs or Ray actors,
and indexing shard by shard."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from test_adapt import torchrun

from llama2vec.embeddings import Embeddings, load_embeddings

pytestmark = pytest.mark.slow  # make test-fast leaves these out
WORDS = ("the a market stock cat sat mat government election football match music film science rain "
         "river bank vote player song").split()
ENV = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
       "HF_HUB_OFFLINE": "1", "PYTHONDONTWRITEBYTECODE": "1"}


def write_corpus(path: Path, n: int, words: int = 12, seed: int = 0) -> Path:
    rng = random.Random(seed)
    with path.open("w") as fh:
        for i in range(n):
            title = f"Title {i}" if i % 3 == 0 else ""
            fh.write(json.dumps({"_id": f"p{i}", "title": title,
                                 "text": " ".join(rng.choice(WORDS) for _ in range(words))}) + "\n")
    return path


def encode(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llama2vec", "encode", "--device", "cpu", *args],
                          capture_output=True, text=True, timeout=600, env=env or ENV)


def assert_same(a: Path, b: Path, atol: float = 1e-6) -> None:
    ids_a, emb_a = load_embeddings(a)
    ids_b, emb_b = load_embeddings(b)
    assert ids_a == ids_b and len(set(ids_a)) == len(ids_a)
    assert emb_a.shape == emb_b.shape and np.abs(emb_a - emb_b).max() <= atol


@pytest.fixture
def corpus(tmp_path):
    return write_corpus(tmp_path / "corpus.jsonl", 230)


@pytest.fixture
def single(tiny_model_dir, corpus, tmp_path):
    """The corpus encoded by one process: the reference."""
    out = tmp_path / "single"
    done = encode("--model", str(tiny_model_dir), "--input", str(corpus), "--output", str(out), "--shard-size", "20")
    assert done.returncode == 0, done.stderr
    return out


def test_the_folder_is_a_manifest_over_memory_mapped_shards(single, tiny_model_dir, corpus):
    from llama2vec.embeddings import FileSource, ListSource, encode_to_folder
    from llama2vec.encoder import Llama2Vec

    emb = Embeddings(single)
    assert emb.count == 230 and len(emb.names) == 12 and emb.meta["fingerprint"]["shard_size"] == 20
    assert isinstance(emb.shard(0), np.memmap) and emb.shard(0).shape == (20, emb.dim)
    ids, array = load_embeddings(single)
    assert ids == [f"p{i}" for i in range(230)]
    # Each shard's rows are its texts' embeddings encoded alone.
    enc = Llama2Vec.from_pretrained(str(tiny_model_dir), device="cpu")
    docs = [json.loads(line) for line in corpus.read_text().splitlines()]
    alone = enc.encode_corpus([docs[i] for i in (0, 1, 119, 229)], batch_size=1)
    assert np.abs(array[[0, 1, 119, 229]] - alone).max() <= 1e-5
    # The sample IVF trains on: seeded, drawn across shards, rows of the array.
    sample = emb.sample(50, seed=3)
    assert np.array_equal(sample, emb.sample(50, seed=3)) and not np.array_equal(sample, emb.sample(50, seed=4))
    assert all(np.abs(array - row).max(axis=1).min() == 0 for row in sample)
    # The same texts in memory, or in Parquet, give the same embeddings.
    texts = [(d["title"] + "\n" + d["text"]) if d["title"] else d["text"] for d in docs]
    in_memory = encode_to_folder(enc, ListSource([d["_id"] for d in docs], texts), single.parent / "mem", "passage", 20)
    assert_same(single, in_memory)
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"id": [d["_id"] for d in docs], "title": [d["title"] for d in docs],
                      "text": [d["text"] for d in docs]})
    pq.write_table(table, single.parent / "corpus.parquet", row_group_size=37)  # shards straddle row groups
    parquet = encode_to_folder(enc, FileSource(single.parent / "corpus.parquet"), single.parent / "pq", "passage", 20)
    assert_same(single, parquet)


def test_two_processes_equal_one(single, tiny_model_dir, corpus, tmp_path):
    out = tmp_path / "two"
    torchrun("encode", "--model", str(tiny_model_dir), "--input", str(corpus), "--output", str(out),
             "--shard-size", "20", "--device", "cpu")
    assert_same(single, out)
    assert json.loads((out / "meta.json").read_text()) == json.loads((single / "meta.json").read_text())


def test_scheduler_jobs_cover_every_id_once_and_the_last_completes(single, tiny_model_dir, corpus, tmp_path):
    out = tmp_path / "jobs"
    common = ("--model", str(tiny_model_dir), "--input", str(corpus), "--output", str(out), "--shard-size", "20",
              "--num-shards", "3")
    for i in (2, 0):
        done = encode(*common, "--shard-index", str(i))
        assert done.returncode == 0, done.stderr
        assert not (out / "meta.json").exists()
    merge = encode("--merge", "--output", str(out))
    assert merge.returncode == 2 and "4 of 12 shards are not encoded yet (1, 4, 7, 10)" in merge.stderr
    done = encode(*common, "--shard-index", "1")  # the last job to finish writes the manifest
    assert done.returncode == 0, done.stderr
    assert_same(single, out)
    ids = (out / "ids.txt").read_text().splitlines()
    assert sorted(ids) == sorted(f"p{i}" for i in range(230))
    assert encode("--merge", "--output", str(out)).returncode == 0  # merging a complete folder: nothing to do
    bad = encode(*common[:-1], "4", "--shard-index", "4")
    assert bad.returncode == 2 and "--shard-index must be in 0..3" in bad.stderr


def test_kill_9_of_one_rank_then_the_same_command_ends_equal(single, tiny_model_dir, tmp_path):
    corpus = write_corpus(tmp_path / "big.jsonl", 3000)
    ref = tmp_path / "ref"
    assert encode("--model", str(tiny_model_dir), "--input", str(corpus), "--output", str(ref),
                  "--shard-size", "50").returncode == 0
    out = tmp_path / "killed"
    args = ["encode", "--model", str(tiny_model_dir), "--input", str(corpus), "--output", str(out),
            "--shard-size", "50", "--device", "cpu"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "llama2vec", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    victim, deadline = None, time.time() + 120
    while time.time() < deadline and victim is None:  # rank 1, once it has written a shard (odd shards are its)
        if (out / "shards" / "shard-00001.json").is_file():
            victim = _rank_pid(proc.pid, 1)
        time.sleep(0.05)
    assert victim is not None, "rank 1 never wrote a shard"
    os.kill(victim, signal.SIGKILL)
    proc.wait(timeout=120)
    assert proc.returncode != 0 and not (out / "meta.json").exists()
    done = sorted(p.name for p in (out / "shards").glob("shard-*.json"))
    assert 1 <= len(done) < 60, done
    torchrun(*args)
    assert_same(ref, out)


def _rank_pid(parent: int, rank: int) -> int | None:
    """The pid of the torchrun worker of `rank` among the descendants of `parent`."""
    import psutil

    for child in psutil.Process(parent).children(recursive=True):
        try:
            if child.environ().get("RANK") == str(rank) and "llama2vec" in " ".join(child.cmdline()):
                return child.pid
        except psutil.Error:
            continue
    return None


def test_errors_come_before_any_encoding_and_name_the_line(tiny_model_dir, tmp_path):
    corpus = write_corpus(tmp_path / "c.jsonl", 40)
    lines = corpus.read_text().splitlines()
    lines[33] = lines[33].replace('"p33"', '"p5"')
    corpus.write_text("\n".join(lines) + "\n")
    out = tmp_path / "e"
    done = encode("--model", str(tiny_model_dir), "--input", str(corpus), "--output", str(out), "--shard-size", "4")
    assert done.returncode == 2 and f"{corpus}:34: duplicate id 'p5' (also at {corpus}:6)" in done.stderr
    assert not list((out / "shards").glob("shard-*"))
    lines[33] = '{"_id": "p33", "title": 5, "text": "x"}'
    corpus.write_text("\n".join(lines) + "\n")
    done = encode("--model", str(tiny_model_dir), "--input", str(corpus), "--output", str(tmp_path / "f"))
    assert done.returncode == 2 and f"{corpus}:34: field 'title' must be a string" in done.stderr


def test_beir_corpus_streams_and_needs_ids(tiny_model_dir, tmp_path):
    beir = tmp_path / "beir"
    beir.mkdir()
    write_corpus(beir / "corpus.jsonl", 30)
    out = tmp_path / "b"
    assert encode("--model", str(tiny_model_dir), "--dataset", str(beir), "--output", str(out)).returncode == 0
    assert Embeddings(out).count == 30
    (beir / "corpus.jsonl").write_text('{"text": "no id"}\n')
    done = encode("--model", str(tiny_model_dir), "--dataset", str(beir), "--output", str(tmp_path / "c"))
    assert done.returncode == 2 and f"{beir / 'corpus.jsonl'}:1: missing field '_id'" in done.stderr


def test_peak_memory_does_not_grow_with_the_corpus(tiny_model_dir, tmp_path):
    """Encoding 10k and 100k passages peaks at nearly the same resident memory: the model and a shard."""
    # VmHWM: this process's own peak (ru_maxrss would carry the parent's resident set from the fork).
    probe = ("import sys; from llama2vec.cli import main\n"
             "code = main(sys.argv[1:])\n"
             "print('PEAK', [int(x.split()[1]) for x in open('/proc/self/status') if x.startswith('VmHWM')][0])\n"
             "sys.exit(code or 0)\n")
    big = write_corpus(tmp_path / "100k.jsonl", 100_000, words=6)
    small = tmp_path / "10k.jsonl"
    with big.open() as src, small.open("w") as dst:
        dst.writelines(line for _, line in zip(range(10_000), src))
    peaks = {}
    for name in ("10k", "100k"):
        done = subprocess.run([sys.executable, "-c", probe, "encode", "--model", str(tiny_model_dir), "--input",
                               str(tmp_path / f"{name}.jsonl"), "--output", str(tmp_path / f"emb-{name}"),
                               "--batch-size", "128", "--shard-size", "2048", "--device", "cpu"],
                              capture_output=True, text=True, timeout=600, env=ENV)
        assert done.returncode == 0, done.stderr[-2000:]
        peaks[name] = int(done.stdout.split("PEAK")[-1])
    assert Embeddings(tmp_path / "emb-100k").count == 100_000
    assert peaks["100k"] <= 1.2 * peaks["10k"], peaks


def test_ray_engine_equals_the_plain_path(single, tiny_model_dir, corpus, tmp_path):
    pytest.importorskip("ray")
    from llama2vec.embeddings import FileSource
    from llama2vec.ray_engine import encode_with_ray

    out = tmp_path / "ray"
    encode_with_ray(str(tiny_model_dir), FileSource(corpus), out, "corpus", shard_size=20, actors=2, num_cpus=2)
    assert_same(single, out)
    assert json.loads((out / "meta.json").read_text()) == json.loads((single / "meta.json").read_text())
