"""Load on `llama2vec serve` (loopback), each figure beside its offline counterpart in the same run.

Embeddings: C concurrent clients, each sending requests of 1-16 BBC passages for up to S seconds, against
the server in each of --modes (batched with admission control at --max-queue-seconds; batched admitting
every request, as the server did before admission control; one forward a request), and offline
`encode_corpus` on the same passages. A refused request (503) is counted apart, and its client waits
the Retry-After the server gave before sending again, as OpenAI's client does.

    python bench/serve_load.py --clients 64 --seconds 60

Search (--search): an embeddings folder of --rows x --dim clustered unit vectors indexed as IVF-PQ in
--parts parts, a random Llama as wide as the vectors encoding the queries (synthetic 8-word texts),
`llama2vec search` offline over every query, then 64 clients sending requests of --queries-per-request
queries to `/v1/search` (ids and scores), with the parts memory-mapped (the default) and resident
(--resident); the server's hits are checked against the offline run, and its memory is read from /proc.

    python bench/serve_load.py --search --rows 1000000 --dim 256 --parts 4 --clients 64 --seconds 60

The passages are the corpus of `llama2vec data bbc` (read from --dataset, or from the bundled articles as
that command does); the server cuts them to the model's length (--auto-truncate), as `encode_corpus` does.
Every run is bounded by --seconds and --max-requests and stops by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from report import append_report, machine, markdown_table


def bbc_passages(dataset: str | None) -> list[str]:
    if dataset:
        with open(Path(dataset) / "corpus.jsonl", encoding="utf-8") as fh:
            return [json.loads(line)["text"] for line in fh if line.strip()]
    from llama2vec.bbc import read_articles

    return [a.body for a in read_articles()]


def start_server(model: str, log: Path, flags: list[str]) -> tuple[subprocess.Popen, str]:
    """`llama2vec serve` on a free loopback port; returns (process, base URL) once it answers."""
    import httpx

    out = log.open("w")
    proc = subprocess.Popen([sys.executable, "-m", "llama2vec", "serve", "--model", model, "--host", "127.0.0.1",
                             "--port", "0", "--auto-truncate", *flags], stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        found = re.search(r"on (http://127\.0\.0\.1:\d+)", log.read_text())
        if found:
            url = found.group(1)
            for _ in range(100):
                try:
                    if httpx.get(f"{url}/health").status_code == 200:
                        return proc, url
                except httpx.TransportError:
                    time.sleep(0.1)
        if proc.poll() is not None:
            break
        time.sleep(0.5)
    proc.kill()
    raise SystemExit(f"the server did not start:\n{log.read_text()[-3000:]}")


def stop_server(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=300)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def memory_mb(pid: int) -> dict[str, float]:
    """A process's peak resident set and its resident anonymous and file-backed (page cache) parts, in MB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmHWM", "RssAnon", "RssFile"):
            fields[name] = int(value.split()[0]) / 1024
    return fields


def cpu_seconds(pid: int) -> float:
    """User and system CPU seconds a process has used."""
    import os

    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def metric(url: str, name: str) -> float:
    import httpx

    text = httpx.get(f"{url}/metrics").text
    return sum(float(v) for v in re.findall(rf"^{re.escape(name)} (\S+)$", text, re.M))


async def load(url: str, route: str, make_body, count, clients: int, seconds: float, max_requests: int,
               seed: int) -> dict:
    """C clients sending `make_body(rng)` requests until the deadline (or the request budget). A 503 is a refusal:
    the client waits its Retry-After (within the deadline) and goes on; anything else but a 200 is an error."""
    import httpx

    served: list[float] = []
    refused: list[float] = []
    done = errors = 0
    kinds: dict[str, int] = {}  # what the errors were: an exception's name, or the status and a bit of the body
    budget = max_requests
    deadline = time.monotonic() + seconds

    async def client(http: httpx.AsyncClient, rng: random.Random) -> None:
        nonlocal done, errors, budget
        while time.monotonic() < deadline and budget > 0:
            budget -= 1
            body = make_body(rng)
            began = time.perf_counter()
            try:
                r = await http.post(route, json=body)
            except httpx.HTTPError as e:
                errors += 1
                kinds[type(e).__name__] = kinds.get(type(e).__name__, 0) + 1
                continue
            took = time.perf_counter() - began
            if r.status_code == 503 and "retry-after" in r.headers:
                refused.append(took)
                await asyncio.sleep(min(float(r.headers["retry-after"]), max(deadline - time.monotonic(), 0)))
            elif r.status_code == 200 and count(body, r.json()):
                served.append(took)
                done += count(body, r.json())
            else:
                errors += 1
                kind = f"{r.status_code} {r.text[:120]}"
                kinds[kind] = kinds.get(kind, 0) + 1

    async def user(c: int) -> None:
        # A client of its own for each user, as separate processes would have: one shared pool of 64 connections
        # costs the load generator more than the server takes to answer (measured: 120 against 1,000 requests/s
        # on /health).
        async with httpx.AsyncClient(base_url=url, timeout=900) as http:
            await client(http, random.Random(seed * 1000 + c))

    began = time.perf_counter()
    await asyncio.gather(*(user(c) for c in range(clients)))
    elapsed = time.perf_counter() - began
    ms = np.array(served or [0.0]) * 1000
    return {"served": len(served), "refused": len(refused), "units": done, "seconds": elapsed,
            "rate": done / elapsed, "p50": float(np.percentile(ms, 50)), "p99": float(np.percentile(ms, 99)),
            "refused_p99": float(np.percentile(np.array(refused) * 1000, 99)) if refused else None,
            "errors": errors, "error_kinds": kinds}


# --------------------------------------------------------------------------------------------
# Embeddings


def offline_encode(model: str, texts: list[str], backend: str) -> dict:
    from llama2vec.encoder import Llama2Vec

    encoder = Llama2Vec.from_pretrained(model, device="cpu", backend=backend)
    encoder.encode_corpus(texts[:16])  # warm-up
    began = time.perf_counter()
    encoder.encode_corpus(texts)
    elapsed = time.perf_counter() - began
    return {"texts": len(texts), "seconds": elapsed, "rate": len(texts) / elapsed}


def embeddings_bench(args) -> None:
    texts = bbc_passages(args.dataset)
    low, high = args.request_texts

    def body(rng: random.Random) -> dict:
        n, start = rng.randint(low, high), rng.randrange(len(texts))
        return {"input": [texts[(start + i) % len(texts)] for i in range(n)], "encoding_format": "base64"}

    def count(body: dict, answer: dict) -> int:
        return len(answer["data"]) if len(answer["data"]) == len(body["input"]) else 0

    base = offline_encode(args.model, texts[: args.offline_texts], args.backend)
    rows = [["offline encode_corpus (batch 16)", "-", "-", "-", f"{base['texts']:,}", f"{base['seconds']:.1f}",
             f"{base['rate']:.2f}", "-", "-", "-", "-", "-"]]
    batched = ["--max-batch-tokens", str(args.max_batch_tokens), "--max-wait-ms", str(args.max_wait_ms)]
    modes = {"admitted": [*batched, "--max-queue-seconds", str(args.max_queue_seconds)],
             "unlimited": [*batched, "--max-queue-seconds", "1e9"],
             "unbatched": ["--no-batching", "--max-queue-seconds", "1e9"]}
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in args.modes:
            proc, url = start_server(args.model, Path(tmp) / f"{mode}.log", [*modes[mode], "--backend", args.backend])
            try:
                asyncio.run(load(url, "/v1/embeddings", lambda rng: {"input": texts[:1]}, lambda b, a: 1, 1, 600, 1,
                                 args.seed))  # warm-up: one request
                for clients in args.clients:
                    r = asyncio.run(load(url, "/v1/embeddings", body, count, clients, args.seconds,
                                         args.max_requests, args.seed))
                    batch = metric(url, "llama2vec_longest_batch_seconds")
                    results[mode, clients] = {**r, "batch": batch}
                    rows.append([f"server, {mode}", str(clients), f"{r['served']:,}", f"{r['refused']:,}",
                                 f"{r['units']:,}", f"{r['seconds']:.1f}", f"{r['rate']:.2f}", f"{r['p50']:.0f}",
                                 f"{r['p99']:.0f}",
                                 "-" if r["refused_p99"] is None else f"{r['refused_p99']:.0f}", f"{batch:.1f}",
                                 str(r["errors"])])
                    print(rows[-1], flush=True)
            finally:
                stop_server(proc)
    top = max(args.clients)
    notes = []
    if ("admitted", top) in results:
        a = results["admitted", top]
        notes.append(f"at {top} clients the server with --max-queue-seconds {args.max_queue_seconds:g} gives "
                     f"{a['rate'] / base['rate']:.2f}x the offline throughput, a p99 of {a['p99'] / 1000:.1f} s for "
                     f"served requests against a bound of {args.max_queue_seconds:g} s plus its longest batch "
                     f"({a['batch']:.1f} s), refusals answered in {a['refused_p99'] or 0:.0f} ms at p99")
        if ("unlimited", top) in results:
            u = results["unlimited", top]
            notes.append(f"admitting every request instead: {u['rate'] / a['rate']:.2f}x the throughput of the "
                         f"admitting server, p50 {u['p50'] / 1000:.1f} s, p99 {u['p99'] / 1000:.1f} s")
    errors = sum(r["errors"] for r in results.values())
    table = markdown_table(["run", "clients", "served", "refused (503)", "texts", "seconds", "texts/s", "p50 ms",
                            "p99 ms", "refusal p99 ms", "longest batch s", "errors"], rows)
    append_report(args.output, "Serving embeddings under load (llama2vec serve)",
                  f"python bench/serve_load.py --clients {' '.join(map(str, args.clients))} --seconds {args.seconds:g} "
                  f"--request-texts {low} {high} --offline-texts {args.offline_texts} --modes {' '.join(args.modes)} "
                  f"--max-queue-seconds {args.max_queue_seconds:g}",
                  f"{machine()}; {args.model} ({args.backend}), BBC passages cut to the model's length, requests of "
                  f"{low}-{high} passages (base64), loopback, client and server on the same cores; batched: "
                  f"--max-batch-tokens {args.max_batch_tokens} --max-wait-ms {args.max_wait_ms:g}; clients wait the "
                  f"Retry-After of a refusal; latencies are those of served requests; " + "; ".join(notes)
                  + f"; {errors} errors.", table)


# --------------------------------------------------------------------------------------------
# Search


WORDS = ("the a market stock cat sat mat government election football match music film science rain "
         "river bank vote player song").split()


def wide_model(folder: Path, width: int) -> Path:
    """A random 2-layer Llama `width` wide with the tests' small BPE tokenizer: queries cost little to encode."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    import torch
    from conftest import make_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = make_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


ENCODE = """
import json, sys, time, torch
from llama2vec.encoder import Llama2Vec
torch.set_flush_denormal(True)
queries = [json.loads(line)["text"] for line in open(sys.argv[2])]
encoder = Llama2Vec.from_pretrained(sys.argv[1], device="cpu")
encoder.encode_queries(queries[:64])
began = time.perf_counter()
encoder.encode_queries(queries)
print("RESULT", time.perf_counter() - began)
"""


def encode_seconds(model: Path, queries: Path) -> float:
    """Seconds `Llama2Vec.encode_queries` takes over the queries (batch 16, as `encode`), the model loaded."""
    done = subprocess.run([sys.executable, "-c", ENCODE, str(model), str(queries)], capture_output=True, text=True,
                          check=True)
    return float(done.stdout.split("RESULT")[-1])


def search_bench(args) -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    from scale import llama2vec, write_vectors

    where = machine()
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_vectors(tmp / "vectors", args.rows, args.dim, shard=min(100_000, -(-args.rows // (2 * args.parts))))
        model = wide_model(tmp / "model", args.dim)
        build_s, build_mb = llama2vec("index", "--embeddings", str(tmp / "vectors"), "--output", str(tmp / "index"),
                                      "--factory", args.factory, "--train-size", str(args.train_size), "--parts",
                                      str(args.parts))
        queries = [" ".join(rng.choice(WORDS) for _ in range(8)) for _ in range(args.offline_queries)]
        with (tmp / "queries.jsonl").open("w") as fh:
            fh.writelines(json.dumps({"_id": f"q{i}", "text": q}) + "\n" for i, q in enumerate(queries))
        llama2vec("encode", "--model", str(model), "--input", str(tmp / "queries.jsonl"), "--what", "queries",
                  "--output", str(tmp / "q"), "--device", "cpu")
        search_s, search_mb = llama2vec("search", "--index", str(tmp / "index"), "--queries", str(tmp / "q"), "--k",
                                        str(args.k), "--params", args.params, "--output", str(tmp / "run.trec"))
        encode_s = encode_seconds(model, tmp / "queries.jsonl")
        from llama2vec.formats import read_run

        run = read_run(tmp / "run.trec")
        qids = {q: f"q{i}" for i, q in enumerate(queries)}
        n = len(queries)
        offline = {"search": n / search_s, "encode + search": n / (encode_s + search_s)}
        rows = [["offline `llama2vec search` (encoded queries)", "-", "-", f"{n:,}", f"{search_s:.1f}",
                 f"{offline['search']:,.0f}", "1.00x", "-", "-", "-", "-", f"{search_mb:,.0f}", "-", "-"],
                ["offline `encode_queries` + `llama2vec search`", "-", "-", f"{n:,}", f"{encode_s + search_s:.1f}",
                 f"{offline['encode + search']:,.0f}", "-", "1.00x", "-", "-", "-", "-", "-", "-"]]
        per = args.queries_per_request
        checked = {"hits": 0, "same": 0}

        def body(rng: random.Random) -> dict:
            start = rng.randrange(len(queries))
            return {"query": [queries[(start + i) % len(queries)] for i in range(per)], "k": args.k,
                    "return_text": False}

        def count(body: dict, answer: dict) -> int:
            if len(answer["data"]) != len(body["query"]):
                return 0
            for query, hits in zip(body["query"], answer["data"]):
                if checked["hits"] < 2000:  # the server's hits against the offline run's (a sample)
                    expected = sorted(run[qids[query]].items(), key=lambda kv: -kv[1])
                    checked["hits"] += 1
                    checked["same"] += [h["id"] for h in hits["results"]] == [d for d, _ in expected]
            return len(body["query"])

        results = {}
        for mode, flags in (("memory-mapped", []), ("resident", ["--resident"])):
            proc, url = start_server(str(model), tmp / f"{mode}.log", [
                "--index", str(tmp / "index"), "--params", args.params, "--device", "cpu", "--max-batch-tokens",
                str(args.max_batch_tokens), "--max-wait-ms", str(args.max_wait_ms), *flags])
            try:
                asyncio.run(load(url, "/v1/search", body, count, 1, 600, 2, args.seed))  # warm-up
                loaded, cpu = memory_mb(proc.pid), cpu_seconds(proc.pid)
                client_cpu = time.process_time()
                r = asyncio.run(load(url, "/v1/search", body, count, args.clients[-1], args.seconds,
                                     args.max_requests, args.seed))
                after = memory_mb(proc.pid)
                r["server_cpu"] = (cpu_seconds(proc.pid) - cpu) / r["seconds"]
                r["client_cpu"] = (time.process_time() - client_cpu) / r["seconds"]
                print(f"{mode}: server {r['server_cpu']:.2f} cores, client {r['client_cpu']:.2f} cores", flush=True)
            finally:
                stop_server(proc)
            results[mode] = r
            rows.append([f"server, parts {mode}", str(args.clients[-1]), f"{r['served']:,}", f"{r['units']:,}",
                         f"{r['seconds']:.1f}", f"{r['rate']:,.0f}", f"{r['rate'] / offline['search']:.2f}x",
                         f"{r['rate'] / offline['encode + search']:.2f}x",
                         f"{r['p50']:.0f}", f"{r['p99']:.0f}", str(r["errors"] + r["refused"]),
                         f"{after['VmHWM']:,.0f}", f"{loaded['RssAnon']:,.0f}", f"{after['RssFile']:,.0f}"])
            print(rows[-1], flush=True)
    table = markdown_table(["run", "clients", "requests", "queries", "seconds", "queries/s", "vs search",
                            "vs encode + search", "p50 ms",
                            "p99 ms", "errors", "peak MB", "anon MB at start", "file-backed MB"], rows)
    append_report(args.output, "Search under load (llama2vec serve /v1/search)",
                  f"python bench/serve_load.py --search --rows {args.rows} --dim {args.dim} --parts {args.parts} "
                  f"--factory {args.factory} --params {args.params} --max-batch-tokens {args.max_batch_tokens} "
                  f"--clients {args.clients[-1]} --seconds "
                  f"{args.seconds:g} --queries-per-request {per} --offline-queries {args.offline_queries}",
                  f"{where}; {args.rows:,} x {args.dim} clustered unit vectors, {args.factory} in {args.parts} "
                  f"parts (built in {build_s:.0f} s, peak {build_mb:,.0f} MB), --params {args.params}, k = {args.k}; "
                  f"queries: synthetic 8-word texts encoded by a random 2-layer Llama {args.dim} wide; offline: "
                  f"`llama2vec search` over {len(queries):,} encoded queries (its time inside the command, loading "
                  f"the parts included), and that with the queries' encoding (`encode_queries`, batch 16, the "
                  f"model loaded), the work the server does for a request; server: requests of {per} queries, ids "
                  f"and scores only, loopback, client and server on the same cores; memory of the server process "
                  f"from /proc (anon: what it holds itself, at the start; file-backed: mapped index pages in the "
                  f"page cache, after the load). {checked['same']:,} of {checked['hits']:,} checked queries got the "
                  f"offline run's hits in its order.", table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--dataset", help="A `llama2vec data bbc` folder (default: the bundled articles).")
    parser.add_argument("--clients", type=int, nargs="+", default=[64])
    parser.add_argument("--seconds", type=float, default=60.0, help="Length of each load run.")
    parser.add_argument("--max-requests", type=int, default=1_000_000, help="Requests of each load run at most.")
    parser.add_argument("--offline-texts", type=int, default=128, help="Passages that encode_corpus encodes.")
    parser.add_argument("--backend", default="torch")
    parser.add_argument("--max-batch-tokens", type=int, default=8192)
    parser.add_argument("--max-wait-ms", type=float, default=10.0)
    parser.add_argument("--max-queue-seconds", type=float, default=30.0)
    parser.add_argument("--modes", nargs="+", default=["admitted", "unlimited"],
                        choices=["admitted", "unlimited", "unbatched"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--request-texts", type=int, nargs=2, default=[1, 16], metavar=("LOW", "HIGH"),
                        help="Passages a request holds, drawn uniformly from LOW..HIGH.")
    parser.add_argument("--search", action="store_true", help="Load /v1/search instead of /v1/embeddings.")
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--parts", type=int, default=4)
    parser.add_argument("--factory", default="IVF1024,PQ32")
    parser.add_argument("--train-size", type=int, default=100_000)
    parser.add_argument("--params", default="nprobe=32")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--queries-per-request", type=int, default=16)
    parser.add_argument("--offline-queries", type=int, default=20_000)
    parser.add_argument("--output", default=str(Path(__file__).resolve().parents[1] / "BENCHMARKS.md"))
    args = parser.parse_args()
    search_bench(args) if args.search else embeddings_bench(args)


if __name__ == "__main__":
    main()
