"""Load on `llama2vec serve` (loopback): C concurrent clients, each sending requests of 1-16 BBC
passages for up to S seconds, against the server with dynamic batching and without (one forward a
request), and offline `encode_corpus` on the same passages in the same run.

    python bench/serve_load.py --clients 1 8 64 --seconds 60

The passages are the corpus of `llama2vec data bbc` (read from --dataset, or from the bundled
articles as that command does); the server cuts them to the model's length (--auto-truncate), as
`encode_corpus` does. Every run is bounded by --seconds and --max-requests and stops by itself.
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
        proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


async def load(url: str, texts: list[str], clients: int, seconds: float, max_requests: int, seed: int,
               sizes: tuple[int, int] = (1, 16)) -> dict:
    """C clients sending requests of 1-16 consecutive passages until the deadline (or the request budget)."""
    import httpx

    latencies: list[float] = []
    done = errors = 0
    budget = max_requests
    deadline = time.monotonic() + seconds

    async def client(http: httpx.AsyncClient, rng: random.Random) -> None:
        nonlocal done, errors, budget
        while time.monotonic() < deadline and budget > 0:
            budget -= 1
            n, start = rng.randint(*sizes), rng.randrange(len(texts))
            batch = [texts[(start + i) % len(texts)] for i in range(n)]
            began = time.perf_counter()
            try:
                r = await http.post("/v1/embeddings", json={"input": batch, "encoding_format": "base64"})
                ok = r.status_code == 200 and len(r.json()["data"]) == n
            except httpx.HTTPError:
                ok = False
            latencies.append(time.perf_counter() - began)
            done += n if ok else 0
            errors += not ok

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=600) as http:
        began = time.perf_counter()
        await asyncio.gather(*(client(http, random.Random(seed * 1000 + c)) for c in range(clients)))
        elapsed = time.perf_counter() - began
    ms = np.array(latencies) * 1000
    return {"requests": len(latencies), "texts": done, "seconds": elapsed, "texts_s": done / elapsed,
            "p50": float(np.percentile(ms, 50)), "p99": float(np.percentile(ms, 99)), "errors": errors}


def offline(model: str, texts: list[str], backend: str) -> dict:
    from llama2vec.encoder import Llama2Vec

    encoder = Llama2Vec.from_pretrained(model, device="cpu", backend=backend)
    encoder.encode_corpus(texts[:16])  # warm-up
    began = time.perf_counter()
    encoder.encode_corpus(texts)
    elapsed = time.perf_counter() - began
    return {"texts": len(texts), "seconds": elapsed, "texts_s": len(texts) / elapsed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--dataset", help="A `llama2vec data bbc` folder (default: the bundled articles).")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--seconds", type=float, default=60.0, help="Length of each load run.")
    parser.add_argument("--max-requests", type=int, default=100_000, help="Requests of each load run at most.")
    parser.add_argument("--offline-texts", type=int, default=512, help="Passages that encode_corpus encodes.")
    parser.add_argument("--backend", default="torch")
    parser.add_argument("--max-batch-tokens", type=int, default=8192)
    parser.add_argument("--max-wait-ms", type=float, default=10.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--request-texts", type=int, nargs=2, default=[1, 16], metavar=("LOW", "HIGH"),
                        help="Passages a request holds, drawn uniformly from LOW..HIGH.")
    parser.add_argument("--output", default="BENCHMARKS.md")
    args = parser.parse_args()

    texts = bbc_passages(args.dataset)
    rows, results = [], {}
    base = offline(args.model, texts[: args.offline_texts], args.backend)
    rows.append(["offline encode_corpus (batch 16)", "-", "-", f"{base['texts']:,}", f"{base['seconds']:.1f}",
                 f"{base['texts_s']:.1f}", "-", "-", "-"])
    modes = {"batched": ["--max-batch-tokens", str(args.max_batch_tokens), "--max-wait-ms", str(args.max_wait_ms)],
             "unbatched": ["--no-batching"]}
    with tempfile.TemporaryDirectory() as tmp:
        for mode, flags in modes.items():
            proc, url = start_server(args.model, Path(tmp) / f"{mode}.log", [*flags, "--backend", args.backend])
            try:
                asyncio.run(load(url, texts, 1, 600, 1, args.seed))  # warm-up: one request
                for clients in args.clients:
                    r = asyncio.run(load(url, texts, clients, args.seconds, args.max_requests, args.seed,
                                         tuple(args.request_texts)))
                    results[mode, clients] = r
                    rows.append([f"server, {mode}", str(clients), f"{r['requests']:,}", f"{r['texts']:,}",
                                 f"{r['seconds']:.1f}", f"{r['texts_s']:.1f}", f"{r['p50']:.0f}", f"{r['p99']:.0f}",
                                 str(r["errors"])])
                    print(rows[-1], flush=True)
            finally:
                stop_server(proc)
    top = max(args.clients)
    batched, unbatched = results["batched", top]["texts_s"], results["unbatched", top]["texts_s"]
    errors = sum(r["errors"] for r in results.values())
    table = markdown_table(["run", "clients", "requests", "texts", "seconds", "texts/s", "p50 ms", "p99 ms",
                            "errors"], rows)
    low, high = args.request_texts
    append_report(args.output, "Serving embeddings under load (llama2vec serve)",
                  f"python bench/serve_load.py --clients {' '.join(map(str, args.clients))} --seconds {args.seconds:g} "
                  f"--request-texts {low} {high} --offline-texts {args.offline_texts}",
                  f"{machine()}; {args.model} ({args.backend}), BBC passages cut to the model's length, requests of "
                  f"{low}-{high} passages (base64), loopback, client and server on the same cores; batched: "
                  f"--max-batch-tokens {args.max_batch_tokens} --max-wait-ms {args.max_wait_ms:g}; at {top} clients "
                  f"the batched server gives {batched / base['texts_s']:.2f}x the offline throughput and "
                  f"{batched / max(unbatched, 1e-9):.2f}x the unbatched server; {errors} errors.", table)


if __name__ == "__main__":
    main()
