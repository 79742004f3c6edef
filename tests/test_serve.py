"""`llama2vec serve`: the OpenAI-compatible server on a tiny model, called with the official client on
loopback ports."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from conftest import SENTENCES, write_tiny_model  # noqa: E402

from llama2vec.cli import main  # noqa: E402
from llama2vec.encoder import Llama2Vec  # noqa: E402
from llama2vec.formats import read_run, write_jsonl_rows  # noqa: E402
from llama2vec.serve import MAX_INPUTS, MAX_K, Searcher, Settings, create_app, listen, server_config  # noqa: E402

KEY = "secret-key"
TEXTS = SENTENCES + ["short", "A much longer text about retrieval: " + " ".join(SENTENCES[:3])]
LONG = " ".join(SENTENCES * 3)  # over the tiny models' 128 tokens


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """The `tiny_model_dir` model, made once for the module's servers."""
    return write_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def ref(model_dir):
    return Llama2Vec.from_pretrained(str(model_dir), device="cpu")


@contextlib.contextmanager
def running(app):
    """Serve `app` in a thread on a free loopback port; yields its base URL."""
    import uvicorn

    sock = listen("127.0.0.1", 0)
    server = uvicorn.Server(server_config(app))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def serve_app(model_dir, searcher=None, encoder=None, **settings):
    encoder = encoder or Llama2Vec.from_pretrained(str(model_dir), device="cpu")
    return create_app(encoder, Settings(name=str(model_dir), aliases=(model_dir.name,), **settings), searcher)


def client(url: str, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def beir(tmp_path_factory, model_dir):
    """A small BEIR folder, its index and the run of `llama2vec search` over it."""
    root = tmp_path_factory.mktemp("beir")
    data = root / "data"
    write_jsonl_rows(data / "corpus.jsonl", ({"_id": f"d{i}", "title": f"Title {i}" if i % 2 else "", "text": t}
                                             for i, t in enumerate(TEXTS)))
    queries = ["where is Paris?", "who won the match", "dense vectors for passages"]
    write_jsonl_rows(data / "queries.jsonl", ({"_id": f"q{i}", "text": q} for i, q in enumerate(queries)))
    for what in ("corpus", "queries"):
        assert main(["encode", "--model", str(model_dir), "--dataset", str(data), "--what", what,
                     "--device", "cpu", "--output", str(root / what)]) == 0
    assert main(["index", "--embeddings", str(root / "corpus"), "--output", str(root / "index")]) == 0
    assert main(["search", "--index", str(root / "index"), "--queries", str(root / "queries"), "--k", "5",
                 "--output", str(root / "run.trec")]) == 0
    return {"data": data, "index": root / "index", "queries": queries, "run": read_run(root / "run.trec")}


@pytest.fixture(scope="module")
def server(model_dir, ref, beir):
    """A server with a key, the index and the dataset, strict about lengths."""
    with running(serve_app(model_dir, Searcher(beir["index"], beir["data"], ref.dim), api_key=KEY)) as url:
        yield url


@pytest.fixture(scope="module")
def lenient(model_dir):
    """No key, --auto-truncate, a 64 KiB body limit, batches collected for up to 50 ms."""
    with running(serve_app(model_dir, auto_truncate=True, max_request_bytes=65536, max_wait_ms=50)) as url:
        yield url


def max_diff(a, b) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())


def vectors(response) -> np.ndarray:
    return np.array([d.embedding for d in sorted(response.data, key=lambda d: d.index)])


# ---------------------------------------------------------------------------------------------- embeddings


def test_accepted_connections_send_without_delay():
    """The listening socket sets TCP_NODELAY and accepted connections inherit it: without it, a response written in
    two parts (headers, body) waited for the client's delayed ACK, about 40 ms a request on Linux."""
    sock = listen("127.0.0.1", 0)
    try:
        with socket.create_connection(sock.getsockname()):
            conn, _ = sock.accept()
            with conn:
                assert conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    finally:
        sock.close()


def test_an_idle_connection_outlives_the_clients_keep_alive(server):
    """A connection idle for longer than a client keeps one (httpx, OpenAI's client: 5 s) is still open: the client
    closes it, so a request never races the server's close (a reset connection under load)."""
    host, port = server.removeprefix("http://").split(":")
    request = f"GET /health HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
    with socket.create_connection((host, int(port)), timeout=30) as conn:
        for _ in range(2):
            conn.sendall(request)
            answer = b""
            while b'"status"' not in answer:
                chunk = conn.recv(4096)
                assert chunk, "the server closed the connection"
                answer += chunk
            assert answer.startswith(b"HTTP/1.1 200")
            time.sleep(6)


def test_float_and_base64_embeddings_equal_llama2vec(server, ref, model_dir):
    expected = ref.encode_corpus(TEXTS)
    c = client(server)
    floats = c.embeddings.create(input=TEXTS, model=str(model_dir), encoding_format="float")
    assert [d.index for d in floats.data] == list(range(len(TEXTS)))
    assert max_diff(vectors(floats), expected) <= 1e-5
    decoded = c.embeddings.create(input=TEXTS, model=model_dir.name)  # the client asks for base64 and decodes it
    assert max_diff(vectors(decoded), expected) <= 1e-5
    raw = c.embeddings.create(input=TEXTS, model=model_dir.name, encoding_format="base64")
    rows = [np.frombuffer(base64.b64decode(d.embedding), dtype="<f4") for d in raw.data]
    assert max_diff(rows, expected) <= 1e-5
    tokens = sum(len(r) for r in ref.fit(ref.tokenize(TEXTS), "passage")[0])
    assert floats.usage.prompt_tokens == floats.usage.total_tokens == tokens


def test_input_type_chooses_the_query_or_the_document_prompt(server, ref, model_dir):
    c = client(server)
    queries = ["where is Paris?", "who won the final"]
    as_query = vectors(c.embeddings.create(input=queries, model=model_dir.name, extra_body={"input_type": "query"}))
    as_document = vectors(c.embeddings.create(input=queries, model=model_dir.name,
                                              extra_body={"input_type": "document"}))
    default = vectors(c.embeddings.create(input=queries, model=model_dir.name))
    assert max_diff(as_query, ref.encode_queries(queries)) <= 1e-5
    assert max_diff(as_document, ref.encode_corpus(queries)) <= 1e-5
    assert max_diff(default, as_document) <= 1e-5
    assert max_diff(as_query, as_document) > 1e-3  # the two prompts do differ on this model


def test_token_id_inputs_get_the_prompt_too(server, ref, model_dir):
    c = client(server)
    ids = ref.tokenize(TEXTS[:3])
    one = vectors(c.embeddings.create(input=ids[0], model=model_dir.name))
    several = c.embeddings.create(input=ids, model=model_dir.name, extra_body={"input_type": "query"})
    assert max_diff(one, ref.encode_corpus(TEXTS[:1])) <= 1e-5
    assert max_diff(vectors(several), ref.encode_queries(TEXTS[:3])) <= 1e-5
    assert several.usage.prompt_tokens == sum(map(len, ids))


def test_dimensions_keeps_the_first_ones_normalised_again(server, ref, model_dir):
    out = vectors(client(server).embeddings.create(input=TEXTS[:4], model=model_dir.name, dimensions=8))
    full = ref.encode_corpus(TEXTS[:4])[:, :8]
    assert out.shape == (4, 8)
    assert max_diff(out, full / np.linalg.norm(full, axis=1, keepdims=True)) <= 1e-5


def test_long_texts_are_cut_as_encode_does_with_auto_truncate(lenient, ref, model_dir):
    c = client(lenient)
    assert max_diff(vectors(c.embeddings.create(input=[LONG, "short"], model=model_dir.name)),
                    ref.encode_corpus([LONG, "short"])) <= 1e-5
    queries = c.embeddings.create(input=[LONG], model=model_dir.name, extra_body={"input_type": "query"})
    assert max_diff(vectors(queries), ref.encode_queries([LONG])) <= 1e-5


# ---------------------------------------------------------------------------------------------- errors


def expect_error(call, status: int, param: str | None = None, code: str | None = None) -> dict:
    with pytest.raises(openai.APIStatusError) as info:
        call()
    error = info.value.response.json()["error"]
    assert info.value.status_code == status, error
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert "Traceback" not in error["message"]
    assert error["param"] == param and (code is None or error["code"] == code), error
    return error


@pytest.mark.parametrize("kwargs,status,param,code", [
    ({"input": ""}, 400, "input", None),
    ({"input": []}, 400, "input", None),
    ({"input": ["fine", ""]}, 400, "input", None),
    ({"input": [[]]}, 400, "input", None),
    ({"input": ["x"] * 2049}, 400, "input", None),
    ({"input": LONG}, 400, "input", "context_length_exceeded"),
    ({"input": [LONG], "extra_body": {"input_type": "query"}}, 400, "input", "context_length_exceeded"),
    ({"input": [[1, 10**9]]}, 400, "input", None),
    ({"input": "x", "model": "another-model"}, 404, "model", "model_not_found"),
    ({"input": "x", "encoding_format": "int8"}, 400, "encoding_format", None),
    ({"input": "x", "dimensions": 0}, 400, "dimensions", None),
    ({"input": "x", "dimensions": 10**6}, 400, "dimensions", None),
    ({"input": "x", "extra_body": {"input_type": "passage"}}, 400, "input_type", None),
    ({"input": "x", "extra_body": {"input": {"text": "x"}}}, 400, "input", None),
])
def test_bad_requests_get_openai_errors(server, model_dir, kwargs, status, param, code):
    kwargs = {"model": model_dir.name, **kwargs}
    error = expect_error(lambda: client(server).embeddings.create(**kwargs), status, param, code)
    assert error["type"] == "invalid_request_error"


def test_malformed_bodies_and_unknown_routes(server):
    headers = {"Authorization": f"Bearer {KEY}"}
    for body, status in ((b"{not json", 400), (b"[1, 2]", 400), (b"\xff\xfe", 400)):
        r = httpx.post(f"{server}/v1/embeddings", content=body, headers=headers)
        assert r.status_code == status and set(r.json()["error"]) == {"message", "type", "param", "code"}
    for method, path, status in (("GET", "/v1/nothing", 404), ("GET", "/v1/embeddings", 405)):
        r = httpx.request(method, f"{server}{path}", headers=headers)
        assert r.status_code == status and r.json()["error"]["message"]


def test_bodies_over_the_limit_get_413(lenient, model_dir):
    big = ["word " * 2000] * 10  # about 100 kB of JSON
    expect_error(lambda: client(lenient).embeddings.create(input=big, model=model_dir.name), 413)
    r = httpx.post(f"{lenient}/v1/embeddings", content=b"x" * 70000, headers={"Content-Length": "70000"})
    assert r.status_code == 413
    assert client(lenient).embeddings.create(input="still serving", model=model_dir.name).data


def test_api_key(server, model_dir):
    models = client(server).models.list()
    assert [m.id for m in models.data] == [str(model_dir)]
    expect_error(lambda: client(server, "wrong").embeddings.create(input="x", model=model_dir.name), 401,
                 code="invalid_api_key")
    for headers in ({}, {"Authorization": "Basic abc"}, {"Authorization": f"Bearer {KEY}x"}):
        for method, path in (("POST", "/v1/embeddings"), ("GET", "/v1/models"), ("GET", "/metrics")):
            r = httpx.request(method, f"{server}{path}", headers=headers, json={"input": "x"})
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{server}/health").json()["status"] == "ok"


def test_a_full_queue_gets_503_and_the_queued_request_still_succeeds(model_dir, ref):
    encoder = Llama2Vec.from_pretrained(str(model_dir), device="cpu")
    entered, original = threading.Event(), encoder.encode_ids

    def slow(*args, **kwargs):
        entered.set()
        time.sleep(1.0)
        return original(*args, **kwargs)

    encoder.encode_ids = slow
    app = serve_app(model_dir, encoder=encoder, max_queue=2048, max_batch_tokens=10**6)  # one forward
    with running(app) as url, ThreadPoolExecutor(1) as pool:
        c = client(url)
        first = pool.submit(c.embeddings.create, input=["a"] * 2048, model=model_dir.name)
        assert entered.wait(30)
        error = expect_error(lambda: c.embeddings.create(input="one more", model=model_dir.name), 503,
                             code="server_overloaded")
        assert error["type"] == "server_error"
        r = httpx.post(f"{url}/v1/embeddings", json={"input": "one more"})
        assert r.status_code == 503 and int(r.headers["Retry-After"]) >= 1
        assert max_diff(vectors(first.result(timeout=60))[:2], ref.encode_corpus(["a", "a"])) <= 1e-5


def test_a_queue_longer_than_max_queue_seconds_is_refused_at_once(ref):
    """Admission by expected wait: the queued tokens over the rate the worker measured. Over --max-queue-seconds a
    request is refused before any work, with the seconds to wait; under it, admitted."""
    from llama2vec.serve import Batcher, Overloaded

    batcher = Batcher(ref, max_queue_seconds=30)
    batcher.admit(10)  # nothing measured yet: admitted
    batcher.rate, batcher.queued_tokens = 100.0, 5000  # 50 s of work queued
    with pytest.raises(Overloaded, match="about 50 s of work, over the 30 s it admits") as info:
        batcher.admit(1)
    assert info.value.status == 503 and info.value.retry_after == 20
    batcher.queued_tokens = 2000  # 20 s
    batcher.admit(1)
    batcher.pending = 8192
    with pytest.raises(Overloaded, match="8192 texts queued"):
        batcher.admit(1)


# ---------------------------------------------------------------------------------------------- search


def test_search_equals_llama2vec_search(server, beir, model_dir):
    r = httpx.post(f"{server}/v1/search", headers={"Authorization": f"Bearer {KEY}"},
                   json={"query": beir["queries"], "k": 5, "model": model_dir.name})
    assert r.status_code == 200, r.text
    corpus = {f"d{i}": t for i, t in enumerate(TEXTS)}
    for i, hit in enumerate(r.json()["data"]):
        assert hit["index"] == i and hit["query"] == beir["queries"][i]
        expected = sorted(beir["run"][f"q{i}"].items(), key=lambda kv: -kv[1])
        assert [h["id"] for h in hit["results"]] == [d for d, _ in expected]
        assert max_diff([h["score"] for h in hit["results"]], [s for _, s in expected]) <= 1e-5
        for h in hit["results"]:
            n = int(h["id"][1:])
            assert h["text"] == corpus[h["id"]] and h["title"] == (f"Title {n}" if n % 2 else "")
    one = httpx.post(f"{server}/v1/search", headers={"Authorization": f"Bearer {KEY}"},
                     json={"query": beir["queries"][0], "k": 2}).json()
    assert [h["id"] for h in one["data"][0]["results"]] == [h["id"] for h in r.json()["data"][0]["results"][:2]]
    for body, param in (({"query": ""}, "query"), ({"query": "x", "k": 0}, "k"), ({"query": 3}, "query")):
        bad = httpx.post(f"{server}/v1/search", headers={"Authorization": f"Bearer {KEY}"}, json=body)
        assert bad.status_code == 400 and bad.json()["error"]["param"] == param


def test_search_over_parts_mapped_or_resident_equals_llama2vec_search(model_dir, ref, beir, tmp_path):
    """An IVF index in three parts, searched with nprobe=2: memory-mapped (the default) and resident, the server
    gives the hits and scores of `llama2vec search --params nprobe=2` over the same parts."""
    for what, extra in (("corpus", ["--shard-size", "4"]), ("queries", [])):
        assert main(["encode", "--model", str(model_dir), "--dataset", str(beir["data"]), "--what", what,
                     "--device", "cpu", "--output", str(tmp_path / what), *extra]) == 0
    assert main(["index", "--embeddings", str(tmp_path / "corpus"), "--output", str(tmp_path / "parts"),
                 "--parts", "3", "--factory", "IVF4,Flat"]) == 0
    runs = {}
    for params in ("nprobe=2", "nprobe=1"):
        assert main(["search", "--index", str(tmp_path / "parts"), "--queries", str(tmp_path / "queries"), "--k", "5",
                     "--params", params, "--output", str(tmp_path / f"{params}.trec")]) == 0
        runs[params] = read_run(tmp_path / f"{params}.trec")
    assert runs["nprobe=2"] != runs["nprobe=1"]  # the parameter matters on this index
    for resident in (False, True):
        searcher = Searcher(tmp_path / "parts", beir["data"], ref.dim, resident=resident, params="nprobe=2")
        with running(serve_app(model_dir, searcher)) as url:
            r = httpx.post(f"{url}/v1/search", json={"query": beir["queries"], "k": 5})
        assert r.status_code == 200, r.text
        for i, hit in enumerate(r.json()["data"]):
            expected = sorted(runs["nprobe=2"][f"q{i}"].items(), key=lambda kv: -kv[1])
            assert [h["id"] for h in hit["results"]] == [d for d, _ in expected], resident
            assert max_diff([h["score"] for h in hit["results"]], [s for _, s in expected]) <= 1e-5


def test_search_limits_queries_times_k_and_the_response_size(model_dir, ref, beir):
    one = Searcher(beir["index"], beir["data"], ref.dim).search(ref.encode_queries(beir["queries"][:1]), 5)[0]
    chars = sum(len(h["title"]) + len(h["text"]) for h in one)
    app = serve_app(model_dir, Searcher(beir["index"], beir["data"], ref.dim), max_hits=6,
                    max_response_bytes=chars - 1)
    with running(app) as url:
        r = httpx.post(f"{url}/v1/search", json={"query": beir["queries"], "k": 5})
        assert r.status_code == 400 and r.json()["error"]["code"] == "too_many_hits", r.text
        assert "asks for 15 hits" in r.json()["error"]["message"] and "--max-hits" in r.json()["error"]["message"]
        r = httpx.post(f"{url}/v1/search", json={"query": beir["queries"][0], "k": 5})
        assert r.status_code == 400 and r.json()["error"]["code"] == "response_too_large", r.text
        assert "--max-response-mb" in r.json()["error"]["message"]
        r = httpx.post(f"{url}/v1/search", json={"query": beir["queries"][0], "k": 5, "return_text": False})
        assert r.status_code == 200, r.text
        hits = r.json()["data"][0]["results"]
        assert [h["id"] for h in hits] == [h["id"] for h in one] and all(set(h) == {"id", "score"} for h in hits)
        r = httpx.post(f"{url}/v1/search", json={"query": beir["queries"][0], "k": 4})
        assert r.status_code == 200 and r.json()["data"][0]["results"] == one[:4]


def test_concurrent_searches_share_one_faiss_search_and_each_gets_its_own_hits(model_dir, ref, beir):
    """Search requests queued together are searched in one FAISS call at the largest k (as an offline search runs
    its queries); each request gets its own k hits, those of `llama2vec search`."""
    searcher = Searcher(beir["index"], beir["data"], ref.dim)
    calls = []
    topk = searcher.topk
    searcher.topk = lambda queries, k, where=None: calls.append((len(queries), k)) or topk(queries, k, where)
    bodies = [{"query": beir["queries"][i % 3], "k": 2 + i % 4} for i in range(12)]
    with running(serve_app(model_dir, searcher, max_wait_ms=200)) as url:
        with ThreadPoolExecutor(12) as pool:
            answers = list(pool.map(lambda b: httpx.post(f"{url}/v1/search", json=b, timeout=60), bodies))
    assert len(calls) < len(bodies) and max(n for n, _ in calls) > 1, calls  # requests shared searches
    for body, r in zip(bodies, answers):
        assert r.status_code == 200, r.text
        q = beir["queries"].index(body["query"])
        expected = sorted(beir["run"][f"q{q}"].items(), key=lambda kv: -kv[1])[: body["k"]]
        assert [h["id"] for h in r.json()["data"][0]["results"]] == [d for d, _ in expected]


def test_search_without_an_index_is_404(lenient):
    r = httpx.post(f"{lenient}/v1/search", json={"query": "x"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "no_index"


# ---------------------------------------------------------------------------------------------- batching


def metric(text: str, name: str) -> float:
    return sum(float(v) for v in re.findall(rf"^{re.escape(name)} (\S+)$", text, re.M))


def test_concurrent_requests_are_batched_and_each_equals_encoding_alone(lenient, ref, model_dir):
    rng = np.random.default_rng(0)
    requests = []
    for i in range(32):
        texts = [TEXTS[j] for j in rng.integers(0, len(TEXTS), rng.integers(1, 17))]
        requests.append((texts, "query" if i % 3 == 0 else "document"))
    before = metric(httpx.get(f"{lenient}/metrics").text, "llama2vec_batch_texts_count")
    c = client(lenient)

    def call(request):
        texts, kind = request
        return vectors(c.embeddings.create(input=texts, model=model_dir.name, extra_body={"input_type": kind}))

    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(call, requests, timeout=60))
    alone = {}
    for (texts, kind), got in zip(requests, results):
        for text, row in zip(texts, got):
            if (text, kind) not in alone:
                encode = ref.encode_queries if kind == "query" else ref.encode_corpus
                alone[text, kind] = encode([text], batch_size=1)[0]
            assert max_diff(row, alone[text, kind]) <= 1e-5
    forwards = metric(httpx.get(f"{lenient}/metrics").text, "llama2vec_batch_texts_count") - before
    assert forwards < len(requests)  # requests shared forwards


def test_metrics(server, model_dir):
    c = client(server)
    c.embeddings.create(input=["one", "two"], model=model_dir.name)
    with pytest.raises(openai.BadRequestError):
        c.embeddings.create(input="", model=model_dir.name)
    text = httpx.get(f"{server}/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    assert metric(text, 'llama2vec_requests_total{route="/v1/embeddings",status="200"}') >= 1
    assert metric(text, 'llama2vec_requests_total{route="/v1/embeddings",status="400"}') >= 1
    assert metric(text, 'llama2vec_request_seconds_count{route="/v1/embeddings"}') >= 2
    assert metric(text, "llama2vec_batch_texts_count") >= 1 and metric(text, "llama2vec_batch_texts_sum") >= 2
    assert metric(text, "llama2vec_batch_seconds_count") >= 1
    assert 0 < metric(text, "llama2vec_longest_batch_seconds") <= 60
    assert "llama2vec_queue_texts 0.0" in text
    assert metric(text, 'llama2vec_texts_total{input_type="document"}') >= 2


# ---------------------------------------------------------------------------------------------- the command


SLOW_SERVER = textwrap.dedent("""
    import sys, time
    from llama2vec.encoder import Llama2Vec

    encode_ids = Llama2Vec.encode_ids
    def slow(self, *args, **kwargs):
        print("encoding", file=sys.stderr, flush=True)
        time.sleep(2.0)
        return encode_ids(self, *args, **kwargs)
    Llama2Vec.encode_ids = slow
    from llama2vec.cli import main
    sys.exit(main(sys.argv[1:]))
""")


@pytest.mark.slow
def test_sigterm_finishes_the_request_in_flight_then_exits_0(model_dir, ref, beir, tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", SLOW_SERVER, "serve", "--model", str(model_dir), "--port", "0",
                             "--device", "cpu", "--index", str(beir["index"]), "--dataset", str(beir["data"]),
                             "--resident", "--max-hits", "10", "--max-response-mb", "1"],
                            stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        url, log = None, []
        deadline = time.monotonic() + 60
        while url is None and time.monotonic() < deadline:
            line = proc.stderr.readline()
            assert line, "the server exited: " + "".join(log)
            log.append(line)
            found = re.search(r"on (http://127\.0\.0\.1:\d+)", line)
            url = found and found.group(1)
        threading.Thread(target=lambda: log.extend(proc.stderr), daemon=True).start()
        assert url and httpx.get(f"{url}/health").status_code == 200
        hits = httpx.post(f"{url}/v1/search", json={"query": beir["queries"][:2], "k": 5}, timeout=60)
        assert hits.status_code == 200 and len(hits.json()["data"][1]["results"]) == 5, hits.text
        too_many = httpx.post(f"{url}/v1/search", json={"query": beir["queries"][:3], "k": 5}, timeout=60)
        assert too_many.status_code == 400 and too_many.json()["error"]["code"] == "too_many_hits"
        encoded = log.count("encoding\n")  # the search's queries
        with ThreadPoolExecutor(1) as pool:
            answer = pool.submit(httpx.post, f"{url}/v1/embeddings", json={"input": TEXTS[:2]}, timeout=60)
            while log.count("encoding\n") == encoded and time.monotonic() < deadline:
                time.sleep(0.05)
            assert log.count("encoding\n") > encoded, "".join(log)
            proc.send_signal(signal.SIGTERM)  # while the request is being encoded
            response = answer.result(timeout=60)
        assert response.status_code == 200, response.text
        got = np.array([d["embedding"] for d in response.json()["data"]])
        assert max_diff(got, ref.encode_corpus(TEXTS[:2])) <= 1e-5
        assert proc.wait(timeout=30) == 0, "".join(log)
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{url}/health")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_the_command_reports_a_taken_port_cleanly(model_dir, capsys):
    sock = listen("127.0.0.1", 0)
    try:
        assert main(["serve", "--model", str(model_dir), "--port", str(sock.getsockname()[1])]) == 2
    finally:
        sock.close()
    assert "llama2vec: error: cannot listen on 127.0.0.1" in capsys.readouterr().err


def test_the_command_refuses_search_parameters_the_index_has_not(model_dir, beir, capsys):
    assert main(["serve", "--model", str(model_dir), "--index", str(beir["index"]), "--params", "nprobe=4",
                 "--port", "0", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "--params 'nprobe=4' does not apply to this IndexFlatIP: could not set parameter nprobe" in err


def test_the_command_refuses_a_dataset_without_an_index(model_dir, capsys):
    assert main(["serve", "--model", str(model_dir), "--dataset", "somewhere"]) == 2
    assert "give --index too" in capsys.readouterr().err


def test_a_json_body_survives_the_size_guard(lenient, model_dir):
    body = json.dumps({"input": ["chunked"] * 100, "model": model_dir.name}).encode()

    def chunks():
        for start in range(0, len(body), 100):
            yield body[start: start + 100]

    r = httpx.post(f"{lenient}/v1/embeddings", content=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 200 and len(r.json()["data"]) == 100
    big = b"x" * 70000
    r = httpx.post(f"{lenient}/v1/embeddings", content=(big[i: i + 1000] for i in range(0, len(big), 1000)))
    assert r.status_code == 413


# ---------------------------------------------------------------------------------------------- the schema


@pytest.mark.parametrize("path,body", [
    ("/v1/embeddings", b'{"input": "", "model": {}}'),
    ("/v1/embeddings", b'{"input": "x", "model": []}'),
    ("/v1/search", b'{"query": "", "k": 0, "model": {}}'),
    ("/v1/embeddings", b'{"input": "\\ud800 abc"}'),  # a lone surrogate, in valid JSON
    ("/v1/embeddings", b"[" * 50_000 + b"]" * 50_000),  # nested deeper than a parser recurses
])
def test_what_once_answered_500_gets_a_400_in_openai_shape(server, path, body, caplog):
    r = httpx.post(f"{server}{path}", content=body, headers={"Authorization": f"Bearer {KEY}",
                                                             "Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert not [rec for rec in caplog.records if rec.levelname == "ERROR"]


def test_the_schema_is_published_and_the_key_is_checked_before_the_body(server):
    schema = httpx.get(f"{server}/openapi.json").json()  # no key needed
    assert {"/v1/embeddings", "/v1/search", "/v1/models", "/health", "/metrics"} <= set(schema["paths"])
    embeddings = schema["paths"]["/v1/embeddings"]["post"]
    assert {"200", "400", "401", "404", "413", "503"} <= set(embeddings["responses"])
    assert httpx.get(f"{server}/docs").status_code == 404  # no interactive docs: their assets come from a CDN
    # A request without the key is refused before its body is read: a malformed body still gets the 401.
    r = httpx.post(f"{server}/v1/embeddings", content=b"{not json")
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


@pytest.fixture(scope="module")
def fuzzed(model_dir, ref, beir):
    """A server with a key, the index, --auto-truncate (a text of any length is one it serves) and --max-hits as
    large as the schema's bounds (any number of queries and any k it admits)."""
    with running(serve_app(model_dir, Searcher(beir["index"], beir["data"], ref.dim), api_key=KEY,
                           auto_truncate=True, max_hits=MAX_INPUTS * MAX_K)) as url:
        yield url


FUZZ_EXAMPLES = int(os.environ.get("LLAMA2VEC_FUZZ_EXAMPLES", "500"))  # a route and a generation mode


@pytest.mark.slow
def test_the_schema_holds_against_generated_requests(fuzzed):
    """Requests generated from the published schema, seeded and bounded: valid ones (each must be served) and
    invalid ones (each must be refused with a 4xx) for every route; no 5xx, and every status code, header and body
    as the schema says."""
    import schemathesis

    schema = schemathesis.openapi.from_url(f"{fuzzed}/openapi.json")
    calls: dict[str, int] = {}
    import torch

    torch.set_flush_denormal(False)  # hypothesis draws subnormal floats, which the flag would make zero
    try:
        fuzz(schema, calls)
    finally:
        torch.set_flush_denormal(True)
    assert sum(calls.values()) >= 2000 or FUZZ_EXAMPLES < 500, calls


def fuzz(schema, calls: dict[str, int]) -> None:
    from hypothesis import HealthCheck, given, settings
    from schemathesis import GenerationMode

    for result in schema.get_all_operations():
        operation = result.ok()
        modes = [GenerationMode.POSITIVE] + ([GenerationMode.NEGATIVE] if operation.method == "post" else [])
        for mode in modes:
            label = f"{operation.label} {mode.value}"

            @settings(max_examples=FUZZ_EXAMPLES, derandomize=True, deadline=None, database=None,
                      suppress_health_check=list(HealthCheck))
            @given(case=operation.as_strategy(mode))
            def check(case):
                calls[label] = calls.get(label, 0) + 1  # noqa: B023 (called before the loop moves on)
                case.call_and_validate(headers={"Authorization": f"Bearer {KEY}"})

            check()


def test_the_server_refuses_an_index_of_another_model(beir, tmp_path, capsys):
    from conftest import make_model, make_tokenizer

    other = tmp_path / "other-model"
    tok = make_tokenizer()
    make_model(len(tok), seed=1).save_pretrained(other)
    tok.save_pretrained(other)
    assert main(["serve", "--model", str(other), "--index", str(beir["index"]), "--port", "0", "--device", "cpu"]) == 2
    assert "scores across two models mean nothing" in capsys.readouterr().err
