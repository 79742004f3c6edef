"""The LanceDB store beside the FAISS folder, on the same embeddings, measured in one run.

An embeddings folder of --rows x --dim clustered unit vectors and a corpus of as many passages (a few random
words, a category), indexed both ways with the same IVF-PQ shape (--partitions lists, --sub-vectors codes,
trained on the same --train-size sample): `llama2vec index --factory IVF{P},PQ{M}` and `llama2vec index
--store lancedb --index-type ivf_pq`. For each: build time, peak memory, disk size, recall@10 against exact
search (1,000 held-out vectors, exact top 10 by numpy) and offline `llama2vec search` queries/s at --nprobe,
then queries/s and latency through `llama2vec serve` at 1 and 64 concurrent clients (requests of one
8-word query, encoded by a random Llama as wide as the vectors), then the cost of a change: upserting
--changes rows (half replace existing ids, half are new) and deleting --changes ids, against the FAISS
folder's only way to change, building it again.

    python bench/store.py --rows 1000000 --dim 256 --partitions 1024 --sub-vectors 32 --seconds 30

Every measured command runs in a process of its own; every load run is bounded by --seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
from pathlib import Path

import numpy as np
from report import append_report, machine, markdown_table
from scale import WORDS, llama2vec, write_vectors
from serve_load import load, start_server, stop_server, wide_model

CATEGORIES = ("sport", "music", "politics", "business")


def write_dataset(folder: Path, ids: list[str], seed: int, words: int = 16) -> Path:
    """A BEIR folder whose corpus.jsonl has a title, a text and a category for each id."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "corpus.jsonl").open("w") as fh:
        for i, pid in enumerate(ids):
            fh.write(json.dumps({"_id": pid, "title": f"{rng.choice(WORDS)} {rng.choice(WORDS)}",
                                 "text": " ".join(rng.choice(WORDS) for _ in range(words)),
                                 "category": CATEGORIES[i % 4]}) + "\n")
    return folder


def disk_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20


def exact_top(folder: Path, queries: np.ndarray, k: int) -> list[list[str]]:
    """The exact top k (inner product) of each query over an embeddings folder, shard by shard."""
    from llama2vec.embeddings import Embeddings
    from llama2vec.index import build_index, merge_topk, search_index

    emb = Embeddings(folder)
    ids = (folder / "ids.txt").read_text().splitlines()
    best, first = [], 0
    for s, size in enumerate(emb.sizes()):
        scores, found = search_index(build_index(np.asarray(emb.shard(s), dtype=np.float32)), queries, k)
        best = [merge_topk([*best, (scores, found + first)], k)]
        first += size
    return [[ids[j] for j in row] for row in best[0][1]]


def recall(run: dict, qids: list[str], exact: list[list[str]], k: int = 10) -> float:
    found = [sorted(run.get(q, {}).items(), key=lambda kv: -kv[1])[:k] for q in qids]
    return float(np.mean([len({d for d, _ in f} & set(e[:k])) / k for f, e in zip(found, exact)]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--partitions", type=int, default=1024)
    parser.add_argument("--sub-vectors", type=int, default=32)
    parser.add_argument("--train-size", type=int, default=100_000)
    parser.add_argument("--nprobe", type=int, default=32, help="IVF lists searched (FAISS nprobe, LanceDB nprobes).")
    parser.add_argument("--changes", type=int, default=10_000, help="Rows upserted, then ids deleted.")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--seconds", type=float, default=30.0, help="Length of each load run.")
    parser.add_argument("--max-requests", type=int, default=200_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=str(Path(__file__).resolve().parents[1] / "BENCHMARKS.md"))
    args = parser.parse_args()
    from llama2vec.embeddings import Embeddings, save_embeddings
    from llama2vec.formats import read_run

    where, k, rng = machine(), 10, random.Random(args.seed)
    shape = f"IVF{args.partitions},PQ{args.sub_vectors}"
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        queries = write_vectors(tmp / "vectors", args.rows, args.dim, shard=min(100_000, args.rows))
        ids = [f"p{i}" for i in range(args.rows)]
        write_dataset(tmp / "data", ids, args.seed)
        qids = [f"q{i}" for i in range(len(queries))]
        save_embeddings(tmp / "queries", qids, queries)
        exact = exact_top(tmp / "vectors", queries, k)
        common = ["--embeddings", str(tmp / "vectors"), "--train-size", str(args.train_size), "--seed", "0"]
        built = {
            "FAISS folder": llama2vec("index", *common, "--output", str(tmp / "faiss"), "--factory", shape),
            "LanceDB store": llama2vec("index", *common, "--output", str(tmp / "store"), "--store", "lancedb",
                                       "--dataset", str(tmp / "data"), "--index-type", "ivf_pq", "--partitions",
                                       str(args.partitions), "--sub-vectors", str(args.sub_vectors)),
        }
        folders = {"FAISS folder": tmp / "faiss", "LanceDB store": tmp / "store"}
        params = {"FAISS folder": f"nprobe={args.nprobe}", "LanceDB store": f"nprobes={args.nprobe}"}
        rows, figures = [], {}
        model = wide_model(tmp / "model", args.dim)
        texts = [" ".join(rng.choice(WORDS) for _ in range(8)) for _ in range(10_000)]
        for name, folder in folders.items():
            search_s, search_mb = llama2vec("search", "--index", str(folder), "--queries", str(tmp / "queries"),
                                            "--k", str(k), "--params", params[name], "--output",
                                            str(tmp / f"{name}.trec"))
            got = recall(read_run(tmp / f"{name}.trec"), qids, exact, k)
            served = {}
            proc, url = start_server(str(model), tmp / f"{name}.log", [
                "--index", str(folder), "--params", params[name], "--device", "cpu"])
            try:
                def body(r: random.Random) -> dict:
                    return {"query": r.choice(texts), "k": k, "return_text": False}

                def count(body: dict, answer: dict) -> int:
                    return int(len(answer.get("data", [])) == 1 and len(answer["data"][0]["results"]) == k)

                asyncio.run(load(url, "/v1/search", body, count, 1, 600, 4, args.seed))  # warm-up
                for clients in args.clients:
                    served[clients] = asyncio.run(load(url, "/v1/search", body, count, clients, args.seconds,
                                                       args.max_requests, args.seed))
                    print(name, clients, served[clients], flush=True)
            finally:
                stop_server(proc)
            build_s, build_mb = built[name]
            figures[name] = {"build_s": build_s, "build_mb": build_mb, "disk_mb": disk_mb(folder), "recall": got,
                             "search_qps": len(qids) / search_s, "served": served}
            rows.append([name, f"{build_s:.0f}", f"{build_mb:,.0f}", f"{disk_mb(folder):,.0f}", f"{got:.3f}",
                         f"{len(qids) / search_s:,.0f}"]
                        + [f"{served[c]['rate']:,.0f} ({served[c]['p50']:.0f} / {served[c]['p99']:.0f} ms, "
                           f"{served[c]['errors'] + served[c]['refused']} errors)" for c in args.clients])
        # Changes: upsert (half existing ids, half new), then delete; FAISS: the folder built again.
        half = args.changes // 2
        changed = [f"p{i}" for i in rng.sample(range(args.rows), half)] + [f"n{i}" for i in range(args.changes - half)]
        write_vectors(tmp / "fresh", args.changes, args.dim)  # the same distribution
        save_embeddings(tmp / "changes", changed, Embeddings(tmp / "fresh").array())
        write_dataset(tmp / "changes-data", changed, args.seed + 1)
        add_s, add_mb = llama2vec("index", "--store", "lancedb", "--output", str(tmp / "store"), "--add",
                                  str(tmp / "changes"), "--dataset", str(tmp / "changes-data"))
        gone = [f"p{i}" for i in rng.sample(range(args.rows), args.changes)]
        (tmp / "delete.txt").write_text("\n".join(gone) + "\n")
        delete_s, delete_mb = llama2vec("index", "--store", "lancedb", "--output", str(tmp / "store"),
                                        "--delete-ids", str(tmp / "delete.txt"))
        from llama2vec.lance_store import open_table

        table, meta = open_table(tmp / "store")
        deleted = set(gone)  # every one was in the store
        assert meta["count"] == args.rows + args.changes - half - len(deleted), meta["count"]
        assert table.count_rows(f"id = '{sorted(deleted)[0]}'") == 0
        llama2vec("search", "--index", str(tmp / "store"), "--queries", str(tmp / "queries"), "--k", str(k),
                  "--params", params["LanceDB store"], "--output", str(tmp / "after.trec"))
        after = read_run(tmp / "after.trec")
        assert not deleted & {d for hits in after.values() for d in hits}
        changes = [["LanceDB store: upsert", f"{args.changes:,} rows ({half:,} replaced)", f"{add_s:.1f}",
                    f"{add_mb:,.0f}"],
                   ["LanceDB store: delete", f"{args.changes:,} ids", f"{delete_s:.1f}", f"{delete_mb:,.0f}"],
                   ["FAISS folder: build again", f"{args.rows:,} rows", f"{built['FAISS folder'][0]:.1f}",
                    f"{built['FAISS folder'][1]:,.0f}"]]
    header = ["store", "build s", "build peak MB", "disk MB", "recall@10", "offline search q/s"] + [
        f"served q/s at {c} client{'s' if c > 1 else ''} (p50 / p99)" for c in args.clients]
    faiss_row, lance_row = figures["FAISS folder"], figures["LanceDB store"]
    ratios = [f"{lance_row['served'][c]['rate'] / faiss_row['served'][c]['rate']:.2f}x" for c in args.clients]
    rows.append(["store / FAISS", f"{lance_row['build_s'] / faiss_row['build_s']:.2f}x",
                 f"{lance_row['build_mb'] / faiss_row['build_mb']:.2f}x",
                 f"{lance_row['disk_mb'] / faiss_row['disk_mb']:.2f}x",
                 f"{lance_row['recall'] - faiss_row['recall']:+.3f}",
                 f"{lance_row['search_qps'] / faiss_row['search_qps']:.2f}x", *ratios])
    table = markdown_table(header, rows) + "\n" + markdown_table(["change", "size", "seconds", "peak MB"], changes)
    append_report(args.output, "The LanceDB store beside the FAISS folder",
                  f"python bench/store.py --rows {args.rows} --dim {args.dim} --partitions {args.partitions} "
                  f"--sub-vectors {args.sub_vectors} --train-size {args.train_size} --nprobe {args.nprobe} "
                  f"--changes {args.changes} --clients {' '.join(map(str, args.clients))} --seconds {args.seconds:g}",
                  f"{where}; {args.rows:,} x {args.dim} clustered unit vectors and a corpus of as many passages "
                  f"(title, 16 words, category); both {shape} trained on the same {args.train_size:,}-row sample "
                  f"(the FAISS folder for the inner product, the store for squared L2 of residuals, see "
                  f"`lance_store.train_ivf_pq`), searched at nprobe {args.nprobe}; the store also holds the "
                  f"passages' texts and fields and a full-text index, which its build time and disk size include; "
                  f"recall@10 against the exact top 10 of 1,000 held-out vectors; offline: `llama2vec search` over "
                  f"those vectors (loading included); served: `llama2vec serve --index`, requests of one 8-word query "
                  f"encoded by a random 2-layer Llama {args.dim} wide, for {args.seconds:g} s, loopback, client and "
                  f"server on the same cores.", table)


if __name__ == "__main__":
    sys.exit(main())
