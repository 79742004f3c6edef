"""`llama2vec serve`: an OpenAI-compatible embeddings server (and search over a FAISS index folder).

- `POST /v1/embeddings`: OpenAI's request and response (`input` as a string, strings, token ids or
  lists of token ids; `encoding_format` float or base64; `dimensions`), plus `input_type`: `query`
  or `document` (default), which chooses the prompt.
- `POST /v1/search`: `{"query": str | [str], "k": int, "return_text": bool}` over the index, with the
  passages' titles and texts from the BEIR dataset; queries x k and the texts' size are bounded
  (`--max-hits`, `--max-response-mb`). The index parts are memory-mapped (or read whole with
  `--resident`) and searched one after the other.
- `GET /health` and `GET /openapi.json` (no key), `GET /v1/models`, `GET /metrics` (Prometheus).

Requests are parsed by pydantic models bounded by the model's dimensions and vocabulary (`schema_models`), which
the published schema shows: what the schema admits the server serves, and what it refuses gets a 400. The key is
checked before the body is read.

Requests are tokenised in threads and queued; one worker thread takes what has queued (up to
`GATHER_FORWARDS` forwards of `max_batch_tokens` padded tokens, waiting at most `max_wait_ms` after the
oldest request for one forward's worth), encodes it in forwards sorted by length, searches the queries
of search requests in one FAISS call, and hands each request its rows. Texts are left-padded with positions
that count real tokens only, so a text's embedding does not depend on its batch. The queue is bounded
(`max_queue` texts waiting or being encoded: beyond that, 503). Errors take OpenAI's shape
`{"error": {"message", "type", "param", "code"}}`. On SIGTERM the server stops accepting
connections, finishes the requests in flight, then exits with status 0.
"""

import asyncio
import base64
import collections
import contextlib
import hmac
import logging
import math
import signal
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import Llama2VecError
from .prompts import text_rule

log = logging.getLogger(__name__)

MAX_INPUTS = 2048  # inputs of one request, as OpenAI's API
MAX_K = 1000  # results per search query
INLINE_CHARS = 4096  # inputs up to this many characters are tokenised on the event loop, longer ones in a thread
# A batch takes the queued requests of up to this many full forwards: sorted by length together, texts of like
# length share a forward (less padding), and a search batch is larger (measured: bench/serve_load.py --search).
GATHER_FORWARDS = 4
ROUTES = ("/v1/embeddings", "/v1/search", "/v1/models", "/health", "/metrics", "/openapi.json")


# --------------------------------------------------------------------------------------------
# Errors


class ApiError(Exception):
    """A request the server refuses, answered in OpenAI's error shape."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_json(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
               code: str | None = None, headers: dict | None = None):
    from fastapi.responses import JSONResponse

    return JSONResponse(error_body(message, kind, param, code), status_code=status, headers=headers)


class Overloaded(ApiError):
    """503 with a Retry-After header: the queue is full, or its expected wait is over --max-queue-seconds."""

    def __init__(self, message: str, retry_after: float = 1.0):
        super().__init__(503, message, code="server_overloaded", kind="server_error")
        self.retry_after = max(1, math.ceil(retry_after))


# --------------------------------------------------------------------------------------------
# Metrics


class Metrics:
    """Prometheus metrics in a registry of the app's own."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("llama2vec_requests", "HTTP requests by route and status", ["route", "status"],
                                registry=self.registry)
        self.latency = Histogram("llama2vec_request_seconds", "Request latency by route", ["route"],
                                 buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
                                 registry=self.registry)
        self.texts = Counter("llama2vec_texts", "Texts encoded by input type", ["input_type"], registry=self.registry)
        self.batch_texts = Histogram("llama2vec_batch_texts", "Texts per forward", registry=self.registry,
                                     buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048))
        self.batch_tokens = Histogram("llama2vec_batch_tokens", "Padded tokens per forward", registry=self.registry,
                                      buckets=(64, 256, 1024, 2048, 4096, 8192, 16384, 32768, 65536))
        self.queue = Gauge("llama2vec_queue_texts", "Texts waiting for the encoder", registry=self.registry)
        self.batch_seconds = Histogram("llama2vec_batch_seconds", "Seconds the worker took for a batch of requests",
                                       registry=self.registry,
                                       buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
        self.longest_batch = Gauge("llama2vec_longest_batch_seconds", "The longest batch so far",
                                   registry=self.registry)
        self.longest = 0.0


# --------------------------------------------------------------------------------------------
# Dynamic batching


@dataclass
class Job:
    rows: list[list[int]]  # token ids of the texts, prompt not yet added
    task: str  # 'self' or 'next'
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    tokens: int  # tokens with the prompt
    k: int = 0  # > 0: also search the index for the k best hits of each text
    where: str | None = None  # a LanceDB store's filter for that search
    arrival: float = field(default_factory=time.monotonic)


def forwards(lengths: list[int], budget: int) -> list[list[int]]:
    """Positions of texts grouped into forwards, longest first, each within `budget` padded tokens
    (a text longer than the budget goes alone)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    groups: list[list[int]] = []
    for i in order:
        if groups and lengths[groups[-1][0]] * (len(groups[-1]) + 1) <= budget:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


class Batcher:
    """Queues tokenised requests and encodes them in one worker thread, several requests a batch
    (`batching`) or one request at a time. Search requests are searched there too, the queries of a batch's
    requests in one FAISS search (`searcher`), as an offline search runs them."""

    def __init__(self, encoder, max_batch_tokens: int = 8192, max_wait_ms: float = 10.0, max_queue: int = 8192,
                 batching: bool = True, metrics: Metrics | None = None, max_queue_seconds: float = 30.0,
                 searcher: "Searcher | None" = None):
        self.encoder, self.batching, self.metrics, self.searcher = encoder, batching, metrics, searcher
        self.max_queue_seconds = max_queue_seconds
        self.rate: float | None = None  # tokens a second the worker encodes, measured as it runs
        self.max_batch_tokens, self.max_wait, self.max_queue = max_batch_tokens, max_wait_ms / 1000, max_queue
        self.overhead = {task: len(encoder.ids.wrap([], task)) for task in ("self", "next")}
        self.jobs: collections.deque[Job] = collections.deque()
        self.cond = threading.Condition()
        self.queued_tokens = 0
        self.pending = 0  # texts queued or being encoded
        self.stopping = False
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, name="llama2vec-batcher", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        """Encode what is queued, then end the worker."""
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
        if self.thread is not None:
            self.thread.join()

    def expected_wait(self) -> float:
        """Seconds the queued tokens will take at the measured rate (0 before the first batch)."""
        return self.queued_tokens / self.rate if self.rate else 0.0

    def admit(self, texts: int) -> None:
        """Raise `Overloaded` (with the seconds to wait) when `texts` more would overflow the queue, or when what
        is queued already takes longer than `max_queue_seconds`: a request is refused at once, before any work
        on it, rather than served late. Called holding the lock, or before tokenising as a cheap first check."""
        if self.stopping:
            raise Overloaded("the server is shutting down", 30)
        wait = self.expected_wait()
        if self.pending + texts > self.max_queue:
            raise Overloaded(f"the server is busy ({self.pending} texts queued); retry later", wait or 1)
        if wait > self.max_queue_seconds:
            raise Overloaded(f"the server is busy: the queue holds about {wait:.0f} s of work, over the "
                             f"{self.max_queue_seconds:g} s it admits; retry later", wait - self.max_queue_seconds)

    async def encode(self, rows: list[list[int]], task: str, k: int = 0, where: str | None = None):
        """(len(rows), H) embeddings, or with `k` (emb, scores (len(rows), k'), positions) from the searcher;
        raises `Overloaded` when the queue is full or too slow to wait for."""
        loop = asyncio.get_running_loop()
        job = Job(rows, task, loop.create_future(), loop, sum(len(r) for r in rows) + self.overhead[task] * len(rows),
                  k, where)
        with self.cond:
            self.admit(len(rows))
            self.pending += len(rows)
            self.queued_tokens += job.tokens
            self.jobs.append(job)
            self._gauge()
            self.cond.notify()
        return await job.future

    def _gauge(self) -> None:
        if self.metrics:
            self.metrics.queue.set(sum(len(j.rows) for j in self.jobs))

    def _take(self) -> list[Job]:
        """The jobs of the next batch (called holding the lock, with a job queued)."""
        if self.batching:
            deadline = self.jobs[0].arrival + self.max_wait
            while self.queued_tokens < self.max_batch_tokens and not self.stopping:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self.cond.wait(left)
        taken, tokens = [], 0
        budget = GATHER_FORWARDS * self.max_batch_tokens
        while self.jobs and (not taken or (self.batching and tokens + self.jobs[0].tokens <= budget)):
            job = self.jobs.popleft()
            tokens += job.tokens
            self.queued_tokens -= job.tokens
            taken.append(job)
        self._gauge()
        return taken

    def _run(self) -> None:
        while True:
            with self.cond:
                while not self.jobs and not self.stopping:
                    self.cond.wait()
                if not self.jobs:
                    return
                jobs = self._take()
            start = time.perf_counter()
            try:
                results = self._encode([j for j in jobs if not j.future.cancelled()])
                self._search([j for j in jobs if j.k and id(j) in results], results)
            except Exception as e:  # the requests fail with a 500; the worker goes on
                log.exception("encoding failed")
                results = {id(j): e for j in jobs}
            took = time.perf_counter() - start
            rate = sum(j.tokens for j in jobs) / max(took, 1e-6)
            if self.metrics:
                self.metrics.batch_seconds.observe(took)
                if took > self.metrics.longest:
                    self.metrics.longest = took
                    self.metrics.longest_batch.set(took)
            with self.cond:
                self.pending -= sum(len(j.rows) for j in jobs)
                self.rate = rate if self.rate is None else 0.8 * self.rate + 0.2 * rate
            for job in jobs:
                job.loop.call_soon_threadsafe(_settle, job.future, results.get(id(job)))

    def _search(self, jobs: list[Job], results: dict) -> None:
        """The searches of a batch: the queries of the jobs with the same filter in one search at their largest
        k, each job its own k."""
        for where in dict.fromkeys(j.where for j in jobs):
            group = [j for j in jobs if j.where == where]
            k = max(j.k for j in group)
            scores, found = self.searcher.topk(np.concatenate([results[id(j)] for j in group]), k, where)
            start = 0
            for job in group:
                n = len(job.rows)
                rows = slice(start, start + n)
                results[id(job)] = (results[id(job)], scores[rows, :job.k], found[rows, :job.k])
                start += n

    def _encode(self, jobs: list[Job]) -> dict[int, np.ndarray]:
        out: dict[int, np.ndarray] = {}
        for task in ("self", "next"):
            mine = [j for j in jobs if j.task == task]
            rows = [r for j in mine for r in j.rows]
            if not rows:
                continue
            emb = np.zeros((len(rows), self.encoder.dim), dtype=np.float32)
            for group in forwards([len(r) + self.overhead[task] for r in rows], self.max_batch_tokens):
                emb[group] = self.encoder.encode_ids([rows[i] for i in group], task, batch_size=len(group))
                if self.metrics:
                    self.metrics.batch_texts.observe(len(group))
                    self.metrics.batch_tokens.observe((len(rows[group[0]]) + self.overhead[task]) * len(group))
            start = 0
            for job in mine:
                out[id(job)] = emb[start: start + len(job.rows)]
                start += len(job.rows)
        return out


def _settle(future: asyncio.Future, result: np.ndarray | BaseException | None) -> None:
    if future.done():
        return
    if isinstance(result, BaseException):
        future.set_exception(result)
    elif result is None:
        future.cancel()
    else:
        future.set_result(result)


# --------------------------------------------------------------------------------------------
# The HTTP layer


class Guard:
    """ASGI middleware: refuses a request to a key-protected route without the key (401) before it reads the
    body, and a body over `max_bytes` (413) before the app reads it; counts requests and their latency by route
    and status. Every route but /health, /openapi.json and an unknown one takes the key."""

    OPEN = ("/health", "/openapi.json")

    def __init__(self, app, max_bytes: int, metrics: Metrics, api_key: str | None = None):
        self.app, self.max_bytes, self.metrics, self.api_key = app, max_bytes, metrics, api_key

    def refusal(self, scope) -> tuple[str, str] | None:
        """(message, code) when the request lacks the key, else None."""
        if self.api_key is None or scope["path"] in self.OPEN or scope["path"] not in ROUTES:
            return None
        scheme, _, key = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1").partition(" ")
        if scheme.lower() != "bearer" or not key:
            return "missing API key: send the header 'Authorization: Bearer KEY'", "invalid_api_key"
        if not hmac.compare_digest(key.strip().encode("latin-1", "replace"), self.api_key.encode()):
            return "incorrect API key", "invalid_api_key"
        return None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, status = time.perf_counter(), 500

        async def send_status(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            refused = self.refusal(scope)
            if refused is not None:
                await error_json(401, refused[0], code=refused[1])(scope, receive, send_status)
                return
            body = await self._read(scope, receive)
            if body is None:
                await error_json(413, f"the request body is over the limit of {self.max_bytes:,} bytes",
                                 code="request_too_large")(scope, receive, send_status)
                return
            replayed = False

            async def replay():
                nonlocal replayed
                if replayed:
                    return await receive()
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}

            await self.app(scope, replay, send_status)
        finally:
            route = scope["path"] if scope["path"] in ROUTES else "other"
            self.metrics.requests.labels(route, str(status)).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - start)

    async def _read(self, scope, receive) -> bytes | None:
        """The body, or None when it is over the limit."""
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return None
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return None
            more = message.get("more_body", False)
        return b"".join(chunks)


# --------------------------------------------------------------------------------------------
# Search


class Passages:
    """The titles and texts of a BEIR corpus for the hits of an index, read from `corpus.jsonl` by byte offset:
    the file is scanned once at load (every line checked, as a BEIR reader does), then only the lines of a
    request's hits are read. Memory: one offset per indexed passage, whatever the texts' size."""

    def __init__(self, dataset: str | Path, ids: list[str]):
        from .formats import corpus_offsets

        self.path, self.offsets = corpus_offsets(dataset, ids)
        self.missing = int((self.offsets < 0).sum())

    def lookup(self, positions: list[int]) -> list[dict]:
        """{'title', 'text'} of each position ({} for a passage not in the corpus)."""
        import json

        out = []
        with self.path.open("rb") as fh:
            for n in positions:
                offset = int(self.offsets[n])
                if offset < 0:
                    out.append({})
                    continue
                fh.seek(offset)
                doc = json.loads(fh.readline())
                out.append({"title": doc.get("title") or "", "text": doc["text"]})
        return out


class Searcher:
    """The parts of an index folder, opened once (memory-mapped, or read whole with `resident`), their ids
    and search parameters, and the passages of a BEIR dataset (optional). A request costs its FAISS search,
    part by part, and the look-up of its hits."""

    def __init__(self, index: str | Path, dataset: str | Path | None, dim: int, resident: bool = False,
                 params: str | None = None):
        from .index import index_parts, load_index, set_params
        self.parts = [load_index(p, mmap=not resident) for p in index_parts(index)]
        for part, _ in self.parts:
            if part.d != dim:
                raise Llama2VecError(f"{index}: an index of {part.d}-dimension vectors; the model gives {dim}")
            if params:
                set_params(part, params, index)
        self.ids = [i for _, ids in self.parts for i in ids]
        self.offsets = np.cumsum([0] + [len(ids) for _, ids in self.parts[:-1]]).tolist()
        if len(set(self.ids)) != len(self.ids):
            raise Llama2VecError(f"{index}: an id is in several index parts: the parts must hold disjoint passages")
        self.parts = [part for part, _ in self.parts]
        self.passages = Passages(dataset, self.ids) if dataset else None
        if self.passages and self.passages.missing:
            log.warning("%d of %d indexed ids are not in %s: they come without title and text",
                        self.passages.missing, len(self.ids), dataset)

    store = False

    def topk(self, queries: np.ndarray, k: int, where: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(scores (Q, k), positions into `ids`, -1 for none) over every part, as `llama2vec search` ranks them."""
        from .index import merge_topk, search_index

        results = []
        for index, offset in zip(self.parts, self.offsets):
            s, i = search_index(index, queries, k)
            results.append((s, np.where(i >= 0, i + offset, -1)))
        return merge_topk(results, k)

    def hits(self, scores: np.ndarray, found: np.ndarray, with_text: bool = True,
             max_chars: int | None = None) -> list[list[dict]]:
        """Each query's hits, best first: ids and scores, and the passages' titles and texts. `max_chars`: the
        titles and texts of all hits together at most (else an ApiError saying so)."""
        rows = [[(int(d), float(s)) for d, s in zip(row_ids, row_scores) if d >= 0]
                for row_ids, row_scores in zip(found, scores)]
        texts = None
        if with_text and self.passages is not None:
            texts = iter(self.passages.lookup([d for row in rows for d, _ in row]))
        hits, chars = [], 0
        for row in rows:
            hits.append([])
            for d, score in row:
                passage = next(texts) if texts is not None else {}
                chars += len(passage.get("title", "")) + len(passage.get("text", ""))
                hits[-1].append({"id": self.ids[d], "score": score, **passage})
            if max_chars is not None and chars > max_chars:
                raise ApiError(400, f"the hits' titles and texts come to over {max_chars:,} characters, this "
                                    f"server's response limit (--max-response-mb): ask for fewer queries or a "
                                    f"smaller k, or set return_text to false", "k", "response_too_large")
        return hits

    def search(self, queries: np.ndarray, k: int, with_text: bool = True) -> list[list[dict]]:
        return self.hits(*self.topk(queries, k), with_text)


class StoreSearcher:
    """A LanceDB store (`lance_store`) searched as `Searcher` searches a FAISS folder, with a filter on its fields
    (`where`). It checks out the store's latest committed version at most every `refresh_seconds`, so that a
    running server sees what `index --add` and `--delete-ids` commit."""

    store = True

    def __init__(self, folder: str | Path, dim: int, refresh_seconds: float = 10.0, nprobes: int | None = None):
        from .lance_store import open_table

        self.folder, self.refresh_seconds, self.nprobes = Path(folder), refresh_seconds, nprobes
        self.table, self.meta = open_table(folder)
        if self.meta["dim"] != dim:
            raise Llama2VecError(f"{folder}: a store of {self.meta['dim']}-dimension vectors; the model gives {dim}")
        self.checked = time.monotonic()
        self.lock = threading.Lock()

    def refresh(self) -> None:
        with self.lock:
            if time.monotonic() - self.checked >= self.refresh_seconds:
                self.table.checkout_latest()
                self.checked = time.monotonic()

    def check_where(self, where: str) -> None:
        from .lance_store import check_where

        try:
            check_where(self.table, where, self.folder.name)
        except Llama2VecError as e:
            raise ApiError(400, str(e), "where", "invalid_filter") from None

    def topk(self, queries: np.ndarray, k: int, where: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(scores (Q, k), the hits' ids (Q, k), '' for none)."""
        from .lance_store import search_store

        self.refresh()
        scores, hits = search_store(self.folder, queries, k, where, self.nprobes, opened=(self.table, self.meta))
        found = np.full((len(queries), k), "", dtype=object)
        for row, ids in zip(found, hits):
            row[: len(ids)] = ids
        return scores, found

    def hits(self, scores: np.ndarray, found: np.ndarray, with_text: bool = True,
             max_chars: int | None = None) -> list[list[dict]]:
        ids = [d for row in found for d in row if d]
        passages = {}
        if with_text and ids:
            rows = (self.table.search().where("id IN (" + ", ".join("'" + d.replace("'", "''") + "'" for d in ids)
                                              + ")").select(["id", "title", "text"]).limit(len(ids)).to_arrow())
            passages = {r["id"]: {"title": r["title"] or "", "text": r["text"]} for r in rows.to_pylist()}
        out, chars = [], 0
        for row_ids, row_scores in zip(found, scores):
            out.append([{"id": d, "score": float(s), **passages.get(d, {})} for d, s in zip(row_ids, row_scores) if d])
            chars += sum(len(h.get("title", "")) + len(h.get("text", "")) for h in out[-1])
            if max_chars is not None and chars > max_chars:
                raise ApiError(400, f"the hits' titles and texts come to over {max_chars:,} characters, this "
                                    f"server's response limit (--max-response-mb): ask for fewer queries or a "
                                    f"smaller k, or set return_text to false", "k", "response_too_large")
        return out


# --------------------------------------------------------------------------------------------
# Responses


def _is_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _vectors(emb: np.ndarray, dimensions: int | None, fmt: str) -> list:
    if dimensions is not None and dimensions < emb.shape[1]:
        emb = emb[:, :dimensions]
        emb = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    emb = np.ascontiguousarray(emb, dtype="<f4")
    if fmt == "base64":
        return [base64.b64encode(row.tobytes()).decode("ascii") for row in emb]
    return emb.tolist()


# --------------------------------------------------------------------------------------------
# The schema: request and response models, published at /openapi.json


def _valid_unicode(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("not valid Unicode (a lone surrogate)") from None
    return text


def _json_integer(value):
    """An integer as JSON Schema has it: 3 or 3.0, never true or "3"."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError("an integer is expected")
    return value


def schema_models(dim: int, vocab: int, max_k: int = MAX_K, store: bool = False):
    """The pydantic models of the routes, bounded by this model's dimensions and vocabulary: a request the
    schema admits is one the server serves (`--auto-truncate` aside, which cuts texts over the length limit)."""
    from typing import Annotated, Literal

    from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field

    Text = Annotated[str, Field(min_length=1), AfterValidator(_valid_unicode)]

    def integer(low: int, high: int):  # bounds inside the integer, so that the schema shows them
        return Annotated[Annotated[int, Field(ge=low, le=high)], BeforeValidator(_json_integer)]

    TokenIds = Annotated[list[integer(0, vocab - 1)], Field(min_length=1)]
    Many = Annotated[list[Text], Field(min_length=1, max_length=MAX_INPUTS)]
    ManyIds = Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_INPUTS)]

    class Request(BaseModel):
        model_config = ConfigDict(extra="ignore", strict=True)  # no true for 1, no "1" for 1
        model: str | None = Field(None, description="The served model's name (its --model value or folder name).")
        user: str | None = None

    class EmbeddingsRequest(Request):
        input: Text | Many | TokenIds | ManyIds = Field(description="A text, texts, token ids or lists of them.")
        encoding_format: Literal["float", "base64"] = "float"
        dimensions: integer(1, dim) | None = Field(None, description="Keep the first N, normalised again.")
        input_type: Literal["query", "document"] = Field("document", description="Which prompt: query or passage.")

    class SearchRequest(Request):
        query: Text | Many = Field(description="A query or queries.")
        k: integer(1, max_k) = Field(10, description="Hits a query (queries x k at most the server's --max-hits).")
        return_text: bool = Field(True, description="Give each hit's title and text (with --dataset), or ids and "
                                                    "scores only.")
        where: None = Field(None, description="Filters need a LanceDB store as the index; this one has no fields.")

    class StoreSearchRequest(SearchRequest):
        where: Text | None = Field(None, description="An SQL filter on the store's fields, e.g. category = 'sport'.")

    class Usage(BaseModel):
        prompt_tokens: int
        total_tokens: int

    class Embedding(BaseModel):
        object: Literal["embedding"]
        index: int
        embedding: list[float] | str

    class EmbeddingsResponse(BaseModel):
        object: Literal["list"]
        data: list[Embedding]
        model: str
        usage: Usage

    class Hit(BaseModel):
        id: str
        score: float
        title: str | None = None
        text: str | None = None

    class QueryHits(BaseModel):
        object: Literal["search_result"]
        index: int
        query: str
        results: list[Hit]

    class SearchResponse(BaseModel):
        object: Literal["list"]
        data: list[QueryHits]
        model: str
        usage: Usage

    class Model(BaseModel):
        id: str
        object: Literal["model"]
        created: int
        owned_by: str

    class ModelList(BaseModel):
        object: Literal["list"]
        data: list[Model]

    class Health(BaseModel):
        status: Literal["ok"]
        model: str

    class ErrorDetail(BaseModel):
        message: str
        type: str
        param: str | None
        code: str | None

    class ErrorResponse(BaseModel):
        error: ErrorDetail

    models = {m.__name__: m for m in (EmbeddingsRequest, SearchRequest, EmbeddingsResponse, SearchResponse,
                                      ModelList, Health, ErrorResponse)}
    if store:  # the filter is in the schema only where the server can apply one
        models["SearchRequest"] = StoreSearchRequest
    return models


# --------------------------------------------------------------------------------------------
# The app


@dataclass
class Settings:
    name: str  # the model as clients name it (the --model value)
    aliases: tuple[str, ...] = ()  # other names accepted (the folder name)
    api_key: str | None = None
    auto_truncate: bool = False
    max_batch_tokens: int = 8192
    max_wait_ms: float = 10.0
    max_queue: int = 8192
    max_request_bytes: int = 16 * 1024 * 1024
    batching: bool = True
    max_queue_seconds: float = 30.0
    max_hits: int = 100_000  # queries x k of one search request
    max_response_bytes: int = 32 * 1024 * 1024  # the hits' titles and texts of one search response


def create_app(encoder, settings: Settings, searcher: Searcher | None = None):
    """The FastAPI app around a loaded `Llama2Vec` (its batcher starts and stops with the app). Requests are
    parsed by the models of `schema_models`, published at /openapi.json; a request they refuse gets a 400 in
    OpenAI's error shape."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, PlainTextResponse
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException

    if settings.max_queue < MAX_INPUTS:
        raise Llama2VecError(f"--max-queue must be at least {MAX_INPUTS} (the inputs of one request)")
    if settings.max_batch_tokens < 1 or settings.max_wait_ms < 0 or settings.max_request_bytes < 1:
        raise Llama2VecError("--max-batch-tokens and --max-request-mb must be positive, --max-wait-ms at least 0")
    metrics = Metrics()
    if settings.max_queue_seconds <= 0:
        raise Llama2VecError("--max-queue-seconds must be positive")
    if settings.max_hits < 1 or settings.max_response_bytes < 1:
        raise Llama2VecError("--max-hits and --max-response-mb must be positive")
    batcher = Batcher(encoder, settings.max_batch_tokens, settings.max_wait_ms, settings.max_queue,
                      settings.batching, metrics, settings.max_queue_seconds, searcher)
    names = {settings.name, *settings.aliases}
    spec, vocab = encoder.spec, len(encoder.tokenizer)
    models = schema_models(encoder.dim, vocab, store=bool(searcher is not None and searcher.store))
    EmbeddingsRequest, SearchRequest = models["EmbeddingsRequest"], models["SearchRequest"]
    tokenizer_lock = threading.Lock()
    created = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app):
        batcher.start()
        yield
        await run_in_threadpool(batcher.stop)

    app = FastAPI(title="llama2vec", version=_version(), lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="OpenAI-compatible embeddings of a llama2vec model, and search over its index.")
    app.add_middleware(Guard, max_bytes=settings.max_request_bytes, metrics=metrics, api_key=settings.api_key)
    app.state.batcher = batcher

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        headers = {"Retry-After": str(e.retry_after)} if isinstance(e, Overloaded) else None
        return error_json(e.status, e.message, e.kind, e.param, e.code, headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, e: RequestValidationError):
        first = e.errors()[0]
        loc = [str(part) for part in first.get("loc", ())][1:]  # after "body"
        if first.get("type") == "json_invalid":
            return error_json(400, "the request body is not valid JSON")
        if not loc:
            return error_json(400, f"the request body must be a JSON object: {first.get('msg')}")
        return error_json(400, f"{'.'.join(loc)}: {first.get('msg')}", param=loc[0])

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):
        return error_json(e.status_code, f"{request.method} {request.url.path}: {e.detail}")

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception):
        log.error("%s %s failed: %r", request.method, request.url.path, e)
        return error_json(500, "internal server error", "server_error")

    def check_model(model: str | None) -> None:
        if model is not None and model not in names:
            raise ApiError(404, f"the model {model!r} does not exist; this server serves {settings.name!r}",
                           "model", "model_not_found")

    def tokenize(items: list[str | list[int]], kind: str) -> tuple[list[list[int]], str]:
        """Token ids of every input, checked against the length limit of `kind` and cut as the encoder cuts
        (with --auto-truncate), and the prompt task (`Llama2Vec.fit`)."""
        limit, _ = text_rule(spec, kind)
        texts = [t for t in items if isinstance(t, str)]
        with tokenizer_lock:
            encoded = iter(encoder.tokenize(texts))
        rows = [next(encoded) if isinstance(item, str) else item for item in items]
        for i, row in enumerate(rows):
            if not row:
                raise ApiError(400, f"input {i} has no tokens", "input")
            if len(row) > limit and not settings.auto_truncate:
                raise ApiError(400, f"input {i} is {len(row)} tokens long; this model takes {kind} texts of at "
                                    f"most {limit} tokens (the server cuts longer ones with --auto-truncate)",
                               "input", "context_length_exceeded")
        return encoder.fit(rows, kind)

    async def embed(items: list[str | list[int]], kind: str, k: int = 0, where: str | None = None) -> tuple[Any, int]:
        batcher.admit(len(items))  # refused before the work of tokenising
        if sum(len(t) for t in items if isinstance(t, str)) <= INLINE_CHARS:  # cheaper than a thread's hand-over
            rows, task = tokenize(items, kind)
        else:
            rows, task = await run_in_threadpool(tokenize, items, kind)
        emb = await batcher.encode(rows, task, k, where)
        metrics.texts.labels("query" if kind == "query" else "document").inc(len(rows))  # as the API names them
        return emb, sum(len(r) for r in rows)

    errors = {status: {"model": models["ErrorResponse"], "description": text} for status, text in (
        (400, "A request the schema or the model refuses"), (401, "A missing or wrong API key"),
        (404, "Another model named, or no index"), (413, "A body over the size limit"),
        (503, "The server is busy or shutting down"))}

    @app.get("/health", response_model=models["Health"], tags=["server"])
    async def health():
        return {"status": "ok", "model": settings.name}

    @app.post("/v1/embeddings", response_model=models["EmbeddingsResponse"], responses=errors, tags=["openai"])
    async def embeddings(body: EmbeddingsRequest):
        check_model(body.model)
        items = [body.input] if isinstance(body.input, str) or _is_id_list(body.input) else list(body.input)
        emb, tokens = await embed(items, "query" if body.input_type == "query" else "passage")
        vectors = _vectors(emb, body.dimensions, body.encoding_format)
        data = [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)]
        return JSONResponse({"object": "list", "data": data, "model": settings.name,
                             "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

    @app.post("/v1/search", response_model=models["SearchResponse"], responses=errors, tags=["search"])
    async def search(body: SearchRequest):
        check_model(body.model)
        if searcher is None:
            raise ApiError(404, "this server has no index: start it with --index DIR (and --dataset DIR)",
                           code="no_index")
        queries = [body.query] if isinstance(body.query, str) else list(body.query)
        if len(queries) * body.k > settings.max_hits:
            raise ApiError(400, f"{len(queries)} queries x k = {body.k} asks for {len(queries) * body.k:,} hits; this "
                                f"server gives at most {settings.max_hits:,} a request (--max-hits): send fewer "
                                f"queries a request or a smaller k", "k", "too_many_hits")
        where = getattr(body, "where", None)
        if where:
            await run_in_threadpool(searcher.check_where, where)
        (_, scores, found), tokens = await embed(queries, "query", body.k, where)
        if body.return_text or getattr(searcher, "store", False):  # reads files or the table
            hits = await run_in_threadpool(searcher.hits, scores, found, body.return_text, settings.max_response_bytes)
        else:
            hits = searcher.hits(scores, found, False, settings.max_response_bytes)
        data = [{"object": "search_result", "index": i, "query": q, "results": h}
                for i, (q, h) in enumerate(zip(queries, hits))]
        return JSONResponse({"object": "list", "data": data, "model": settings.name,
                             "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

    @app.get("/v1/models", response_model=models["ModelList"], responses={401: errors[401]}, tags=["openai"])
    async def list_models():
        return {"object": "list", "data": [{"id": settings.name, "object": "model", "created": created,
                                            "owned_by": "llama2vec"}]}

    @app.get("/metrics", response_class=PlainTextResponse, responses={401: errors[401]}, tags=["server"])
    async def prometheus():
        return PlainTextResponse(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


def _is_id_list(value) -> bool:
    return isinstance(value, list) and bool(value) and all(_is_id(v) for v in value)


def _version() -> str:
    from . import __version__

    return __version__


# --------------------------------------------------------------------------------------------
# Running


def listen(host: str, port: int) -> socket.socket:
    """A listening socket (port 0: any free port), or a clean error when the address is taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # Accepted connections inherit it: without it, a response written in two parts (headers, body) waits for
    # the client's delayed ACK, about 40 ms a request on Linux.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise Llama2VecError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.listen(2048)
    return sock


KEEP_ALIVE_SECONDS = 75


def server_config(app, drain_seconds: float = 60.0):
    """uvicorn's configuration of the server. An idle connection is kept longer than clients keep theirs (httpx and
    OpenAI's client: 5 s), so that the client, not the server, closes it: otherwise a request sent as the server
    closes the connection fails with a reset."""
    import uvicorn

    return uvicorn.Config(app, log_config=None, timeout_graceful_shutdown=drain_seconds, access_log=False,
                          timeout_keep_alive=KEEP_ALIVE_SECONDS)


def run(app, sock: socket.socket, drain_seconds: float = 60.0) -> None:
    """Serve on `sock` until SIGINT or SIGTERM; after SIGTERM the requests in flight finish (up to
    `drain_seconds`) and this returns."""
    import uvicorn

    config = server_config(app, drain_seconds)
    server = uvicorn.Server(config)
    if threading.current_thread() is not threading.main_thread():
        server.run(sockets=[sock])
        return
    # uvicorn raises the signal again once drained: a no-op handler lets the process exit with 0.
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        server.run(sockets=[sock])
    finally:
        signal.signal(signal.SIGTERM, previous)


def serve(model: str, host: str = "127.0.0.1", port: int = 8000, index: str | None = None,
          dataset: str | None = None, backend: str = "torch", device: str = "auto", drain_seconds: float = 60.0,
          allow_model_mismatch: bool = False, resident: bool = False, params: str | None = None,
          refresh_seconds: float = 10.0, **settings) -> None:
    """Load the model (and the index and dataset) once, then serve until SIGTERM or SIGINT."""
    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise Llama2VecError(f"llama2vec serve needs the serve extra ({e.name} is missing): "
                             "pip install 'llama2vec[serve]'") from None
    from .encoder import Llama2Vec

    if dataset and not index:
        raise Llama2VecError("--dataset gives the passages of --index: give --index too")
    sock = listen(host, port)
    encoder = Llama2Vec.from_pretrained(model, device=device, backend=backend)
    if index:
        from .index import check_queries
        from .store import model_identity

        check_queries([index], model_identity(encoder.source) if encoder.source else None, encoder.dim,
                      f"the queries of {model}", allow_model_mismatch)
    searcher = None
    if index:
        from .lance_store import is_store, store_nprobes

        if is_store(index):
            if dataset or resident:
                raise Llama2VecError(f"{index}: a LanceDB store holds its passages' texts and reads them itself: "
                                     f"leave out --dataset and --resident")
            searcher = StoreSearcher(index, encoder.dim, refresh_seconds, store_nprobes(params))
        else:
            searcher = Searcher(index, dataset, encoder.dim, resident, params)
    folder = Path(model.rstrip("/")).name
    app = create_app(encoder, Settings(name=model, aliases=(folder,), **settings), searcher)
    log.info("serving %s (%s, %d dimensions) on http://%s:%d%s", model, backend, encoder.dim, host,
             sock.getsockname()[1], f" with the index {index}" if index else "")
    run(app, sock, drain_seconds)
