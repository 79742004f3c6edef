"""Corpora larger than memory, measured in one run: peak resident memory of `encode` and `index`
against corpus size (synthetic passages, a tiny random Llama), encoding throughput with 1 process
against 2 (torchrun), and IVF-PQ over 1M x 256 vectors built shard by shard (build time, memory,
queries/s and recall@10 against exact search, with and without PCA).

    python bench/scale.py --sizes 10000 100000 1000000 --ivf-rows 1000000

Every measured job runs in a process of its own (its peak resident set is its own).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from report import append_report, machine, markdown_table

WORDS = ("the a market stock cat sat mat government election football match music film science rain "
         "river bank vote player song").split()
ENV = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
# The peak of this process alone: VmHWM starts afresh at exec, while ru_maxrss keeps the parent's at fork.
PEAK_KB = "[int(line.split()[1]) for line in open('/proc/self/status') if line.startswith('VmHWM')][0]"
PROBE = ("import sys, time; from llama2vec.cli import main\n"
         "t = time.perf_counter(); code = main(sys.argv[1:])\n"
         f"print('RESULT', time.perf_counter() - t, {PEAK_KB})\n"
         "sys.exit(code or 0)\n")


def tiny_model(folder: Path) -> Path:
    """A tiny random Llama (hidden 32, 2 layers) and a small BPE tokenizer, like the tests'."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from conftest import make_model, make_tokenizer

    tok = make_tokenizer()
    make_model(len(tok)).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def write_corpus(path: Path, n: int, words: int = 24) -> Path:
    rng = random.Random(0)
    with path.open("w") as fh:
        for i in range(n):
            fh.write(json.dumps({"_id": f"p{i}", "text": " ".join(rng.choice(WORDS) for _ in range(words))}) + "\n")
    return path


def llama2vec(*args: str, threads: int = 2) -> tuple[float, float]:
    """(seconds, peak resident MB) of one llama2vec command in a fresh process."""
    env = {**ENV, "OMP_NUM_THREADS": str(threads)}
    done = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, env=env)
    if done.returncode:
        raise SystemExit(done.stderr[-3000:])
    seconds, kb = done.stdout.split("RESULT")[-1].split()
    return float(seconds), int(kb) / 1024


def torchrun(*args: str) -> float:
    t = time.perf_counter()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "llama2vec", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**ENV, "OMP_NUM_THREADS": "1"})
    if done.returncode:
        raise SystemExit(done.stderr[-3000:])
    return time.perf_counter() - t


def write_vectors(folder: Path, n: int, dim: int, shard: int = 100_000) -> np.ndarray:
    """An embeddings folder of n unit vectors with embedding-like structure (clusters in a 64-dimensional
    subspace plus noise); returns 1,000 queries drawn alike."""
    from llama2vec.embeddings import FORMAT
    from llama2vec.store import write_json

    rng = np.random.default_rng(0)
    basis, centres = rng.standard_normal((64, dim)), rng.standard_normal((1024, 64))

    def draw(m: int) -> np.ndarray:
        x = (centres[rng.integers(0, 1024, m)] + 0.7 * rng.standard_normal((m, 64))) @ basis
        x += 0.5 * rng.standard_normal((m, dim))
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)

    (folder / "shards").mkdir(parents=True)
    names = []
    for s, start in enumerate(range(0, n, shard)):
        np.save(folder / "shards" / f"shard-{s:05d}.npy", draw(min(shard, n - start)))
        names.append(f"shard-{s:05d}")
    (folder / "ids.txt").write_text("".join(f"p{i}\n" for i in range(n)))
    write_json(folder / "meta.json", {"format": FORMAT, "count": n, "dim": dim, "dtype": "float32", "shards": names})
    return draw(1000)


def in_memory_index(folder: str, output: str, factory: str) -> None:
    """The same index built the old way, the whole array in memory (for the memory comparison)."""
    from llama2vec.embeddings import load_embeddings
    from llama2vec.index import build_index, save_index

    ids, emb = load_embeddings(folder)
    save_index(output, build_index(emb, factory), ids, factory)


def recall(folder: Path, queries: np.ndarray, exact: np.ndarray, params: str | None) -> tuple[float, float]:
    """(recall@10 against exact, queries/s) of an index folder, one thread."""
    import faiss

    from llama2vec.index import load_index, search_index

    faiss.omp_set_num_threads(1)
    index, _ = load_index(folder)
    t = time.perf_counter()
    found = search_index(index, queries, 10, params=params)[1]
    qps = len(queries) / (time.perf_counter() - t)
    return float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, exact)])), qps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--throughput-size", type=int, default=20_000)
    parser.add_argument("--ivf-rows", type=int, default=1_000_000)
    parser.add_argument("--ivf-dim", type=int, default=256)
    parser.add_argument("--output", default="BENCHMARKS.md")
    args = parser.parse_args()
    where = machine()  # before FAISS sets its (shared OpenMP) thread count to 1 for the queries/s column
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = tiny_model(tmp / "tiny")
        rows = []
        for n in args.sizes:
            corpus = write_corpus(tmp / f"c{n}.jsonl", n)
            out = tmp / f"e{n}"
            enc_s, enc_mb = llama2vec("encode", "--model", str(model), "--input", str(corpus), "--output", str(out),
                                      "--device", "cpu", "--batch-size", "128", "--shard-size", "4096")
            idx_s, idx_mb = llama2vec("index", "--embeddings", str(out), "--output", str(tmp / f"i{n}"),
                                      "--factory", "Flat")
            rows.append([f"{n:,}", f"{enc_s:.0f}", f"{n / enc_s:,.0f}", f"{enc_mb:,.0f}", f"{idx_s:.1f}",
                         f"{idx_mb:,.0f}"])
        memory = markdown_table(["passages", "encode s", "passages/s", "encode peak MB", "index (Flat) s",
                                 "index peak MB"], rows)

        corpus = write_corpus(tmp / "t.jsonl", args.throughput_size)
        common = ("--model", str(model), "--input", str(corpus), "--device", "cpu", "--batch-size", "128",
                  "--shard-size", "1024")
        one, _ = llama2vec("encode", *common, "--output", str(tmp / "t1"), threads=2)
        two = torchrun("encode", *common, "--output", str(tmp / "t2"))
        from llama2vec.embeddings import load_embeddings

        same = np.abs(load_embeddings(tmp / "t1")[1] - load_embeddings(tmp / "t2")[1]).max()
        throughput = markdown_table(["processes", "seconds", "passages/s", "ratio"], [
            ["1 (2 threads)", f"{one:.1f}", f"{args.throughput_size / one:,.0f}", "1.00x"],
            ["2 (torchrun, 1 thread each)", f"{two:.1f}", f"{args.throughput_size / two:,.0f}", f"{one / two:.2f}x"]])

        vec = tmp / "vectors"
        queries = write_vectors(vec, args.ivf_rows, args.ivf_dim)
        import faiss

        flat_s, flat_mb = llama2vec("index", "--embeddings", str(vec), "--output", str(tmp / "flat"), "--factory",
                                    "Flat")
        from llama2vec.index import load_index, search_index

        index, _ = load_index(tmp / "flat")
        faiss.omp_set_num_threads(2)
        exact = search_index(index, queries, 10)[1]
        del index
        ivf_rows = [["Flat (exact)", "-", f"{flat_s:.0f}", f"{flat_mb:,.0f}", "1.000",
                     f"{recall(tmp / 'flat', queries, exact, None)[1]:,.0f}"]]
        nlist = 1024
        for label, factory, extra in [
            ("IVF-PQ, shard by shard", f"IVF{nlist},PQ32", ["--train-size", "100000"]),
            ("IVF-PQ after PCA to 128", f"IVF{nlist},PQ32", ["--train-size", "100000", "--pca", "128"]),
        ]:
            out = tmp / label.split(",")[0].replace(" ", "-")
            s, mb = llama2vec("index", "--embeddings", str(vec), "--output", str(out), "--factory", factory, *extra)
            r, qps = recall(out, queries, exact, "nprobe=32")
            ivf_rows.append([label, factory, f"{s:.0f}", f"{mb:,.0f}", f"{r:.3f}", f"{qps:,.0f}"])
        code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import time; "
                f"from scale import in_memory_index; t = time.perf_counter(); "
                f"in_memory_index({str(vec)!r}, {str(tmp / 'whole')!r}, 'IVF{nlist},PQ32'); "
                f"print('RESULT', time.perf_counter() - t, {PEAK_KB})")
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, check=True)
        s, kb = done.stdout.split("RESULT")[-1].split()
        r, qps = recall(tmp / "whole", queries, exact, "nprobe=32")
        ivf_rows.append(["IVF-PQ, whole array in memory, trained on all", f"IVF{nlist},PQ32", f"{float(s):.0f}",
                         f"{int(kb) / 1024:,.0f}", f"{r:.3f}", f"{qps:,.0f}"])
        ivf = markdown_table(["index", "factory", "build s", "build peak MB", "recall@10", "queries/s (1 thread)"],
                             ivf_rows)

    command = (f"python bench/scale.py --sizes {' '.join(map(str, args.sizes))} --ivf-rows {args.ivf_rows} "
               f"--ivf-dim {args.ivf_dim}")
    append_report(args.output, "Corpora larger than memory", command,
                  f"{where}. Encoding: synthetic 24-word passages, a tiny random Llama (hidden 32, 2 layers), "
                  f"shards of 4,096; indexing: Flat over those embeddings. Peak = the process's peak resident "
                  f"set.\n\n{memory}\n\nEncoding {args.throughput_size:,} passages with 1 process and with 2 "
                  f"(the embeddings of the two differ by at most {same:.1e}):\n\n{throughput}\n\n"
                  f"{args.ivf_rows:,} x {args.ivf_dim} vectors (clustered, embedding-like) in shards of 100,000; "
                  f"1,000 queries, nprobe 32; IVF-PQ trained on a seeded sample of 100,000:", ivf)


if __name__ == "__main__":
    main()
