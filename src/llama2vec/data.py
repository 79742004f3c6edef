"""Corpus readers, the bundled Wikipedia corpus, and the chunker that turns documents into
(text, next text) pairs for adaptation.

Readers stream: they yield one document at a time and name the file, line and field of anything
wrong. The chunk-pair cache is written token by token to disk, so a corpus larger than memory works.
"""

from __future__ import annotations

import array
import bz2
import collections
import hashlib
import json
import logging
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import Llama2VecError
from .store import (
    atomic_folder,
    check_text,
    differences,
    file_identity,
    fingerprint,
    open_for_reading,
    read_json_or_none,
    strict_json,
    write_lines,
)

log = logging.getLogger(__name__)

WIKI_SAMPLE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"


@dataclass
class Document:
    id: str
    title: str
    text: str


@dataclass
class ReadStats:
    """What a reader skipped, reported after reading."""

    empty: int = 0
    where: list[str] = field(default_factory=list)  # first few locations of skipped documents


# --------------------------------------------------------------------------------------------
# Readers


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, decoded line), with a clear error for bytes that are not UTF-8 and for a file
    that cannot be read. A UTF-8 byte order mark opening the file is dropped."""
    for _, number, line in lines_at(path):
        yield number, line


def lines_at(path: Path, offset: int = 0, number: int = 0) -> Iterator[tuple[int, int, str]]:
    """(byte offset, line number, decoded line) of each line from byte `offset`, the start of line
    `number` + 1 (a shard of a large file is read from where it starts)."""
    with open_for_reading(path) as fh:
        fh.seek(offset)
        while True:
            try:
                raw = fh.readline()
            except OSError as e:
                raise Llama2VecError(f"{path}:{number + 1}: cannot read: {e.strerror or e}") from None
            if not raw:
                return
            number += 1
            start, offset = offset, offset + len(raw)
            if number == 1:
                raw = raw.removeprefix(b"\xef\xbb\xbf")
            try:
                yield start, number, raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise Llama2VecError(
                    f"{path}:{number}: bytes that are not UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})"
                ) from None


def _field(obj: dict, name: str, where: str, required: bool) -> str:
    if name not in obj:
        if required:
            raise Llama2VecError(f"{where}: missing field {name!r}")
        return ""
    value = obj[name]
    is_id = name in ("id", "_id")
    if is_id and isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        kind = "a string or an integer" if is_id else "a string"
        raise Llama2VecError(f"{where}: field {name!r} must be {kind}, got {type(value).__name__}")
    check_text(value, f"{where}: field {name!r}")
    return value


def read_objects(path: Path) -> Iterator[tuple[str, dict]]:
    """('file:line', object) for each non-blank line of a JSONL file."""
    for _, where, obj in objects_at(path):
        yield where, obj


def objects_at(path: Path, offset: int = 0, number: int = 0) -> Iterator[tuple[tuple[int, int], str, dict]]:
    """((byte offset, line number before it), 'file:line', object) for each non-blank line from `offset`."""
    for start, line_number, line in lines_at(path, offset, number):
        if not line.strip():
            continue
        where = f"{path}:{line_number}"
        try:
            obj = strict_json(line)
        except json.JSONDecodeError as e:
            raise Llama2VecError(f"{where}: invalid JSON: {e.msg} (column {e.colno})") from None
        except (ValueError, RecursionError) as e:  # NaN, an integer of over 4300 digits, deep nesting
            raise Llama2VecError(f"{where}: invalid JSON: {e}") from None
        if not isinstance(obj, dict):
            raise Llama2VecError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        yield (start, line_number - 1), where, obj


def read_jsonl(path: Path, stats: ReadStats | None = None, text_field: str = "text") -> Iterator[Document]:
    """JSONL documents: one object per line with 'text' and optional 'title' and 'id' (or '_id')."""
    for _, doc in jsonl_documents(path, stats, text_field):
        yield doc


def jsonl_documents(path: Path, stats: ReadStats | None = None, text_field: str = "text", offset: int = 0,
                    number: int = 0, require_id: bool = False) -> Iterator[tuple[tuple[int, int], Document]]:
    """(where the line starts, document) of a JSONL file from `offset`; empty texts are skipped."""
    for at, where, obj in objects_at(path, offset, number):
        text = _field(obj, text_field, where, required=True)
        title = _field(obj, "title", where, required=False)
        id_name = "_id" if "_id" in obj or (require_id and "id" not in obj) else "id"
        doc_id = _field(obj, id_name, where, required=require_id) or where.rsplit(":", 1)[1]
        if not text.strip():
            _skip(stats, where)
            continue
        yield at, Document(doc_id, title, text)


def read_text(path: Path, stats: ReadStats | None = None) -> Iterator[Document]:
    """Plain text: one document per block of lines separated by blank lines."""
    block: list[str] = []
    start = 0
    for number, line in _lines(path):
        if line.strip():
            if not block:
                start = number
            block.append(line.rstrip("\r\n"))
        elif block:
            yield Document(f"{path.name}:{start}", "", "\n".join(block))
            block = []
    if block:
        yield Document(f"{path.name}:{start}", "", "\n".join(block))


def read_parquet(path: Path, stats: ReadStats | None = None, text_field: str = "text") -> Iterator[Document]:
    """Parquet documents with a string column 'text' and optional 'title' and 'id' columns."""
    for _, doc in parquet_documents(path, stats, text_field):
        yield doc


def parquet_documents(path: Path, stats: ReadStats | None = None, text_field: str = "text",
                      start: int = 0) -> Iterator[tuple[int, Document]]:
    """(row index, document) of a Parquet file from row `start`; empty texts are skipped."""
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
        names = pf.schema_arrow.names
    except FileNotFoundError:
        raise Llama2VecError(f"{path}: file not found") from None
    except Exception as e:  # pyarrow raises ArrowInvalid, OSError and friends
        raise Llama2VecError(f"{path}: not a readable Parquet file: {e}") from None
    if text_field not in names:
        raise Llama2VecError(f"{path}: no column {text_field!r} (columns: {', '.join(names)})")
    columns = [c for c in (text_field, "title", "id") if c in names]
    for c in columns:
        if names.count(c) > 1:
            raise Llama2VecError(f"{path}: column {c!r} appears {names.count(c)} times")
    groups, row = [], 0  # the row groups from the one holding `start`
    for g in range(pf.metadata.num_row_groups):
        size = pf.metadata.row_group(g).num_rows
        if row + size > start or groups:
            groups.append(g)
        else:
            row += size
    for data in _parquet_batches(pf, path, columns, groups, row):
        for i, text in enumerate(data[text_field]):
            row += 1
            if row <= start:
                continue
            where = f"{path}: row {row}"
            if text is not None and not isinstance(text, str):
                raise Llama2VecError(f"{where}: field {text_field!r} must be a string, got {type(text).__name__}")
            if not text or not text.strip():
                _skip(stats, where)
                continue
            title = data["title"][i] if "title" in data else None
            doc_id = data["id"][i] if "id" in data else None
            if title is not None and not isinstance(title, str):
                raise Llama2VecError(f"{where}: field 'title' must be a string, got {type(title).__name__}")
            if doc_id is not None and (isinstance(doc_id, bool) or not isinstance(doc_id, (str, int))):
                raise Llama2VecError(f"{where}: field 'id' must be a string or an integer, got {type(doc_id).__name__}")
            yield row - 1, Document(str(doc_id if doc_id is not None else row), title or "", text)


def _parquet_batches(pf, path: Path, columns: list[str], groups: list[int], done: int = 0) -> Iterator[dict[str, list]]:
    """Column name -> values, batch by batch over row `groups` (the first starting at row `done`);
    damaged data is an error naming the file and rows."""
    if not groups:
        return
    batches = pf.iter_batches(columns=columns, batch_size=1024, row_groups=groups)
    while True:
        try:
            batch = next(batches, None)
            data = None if batch is None else batch.to_pydict()
        except Exception as e:  # ArrowInvalid, OSError: a damaged page
            raise Llama2VecError(f"{path}: row {done + 1} onwards: not a readable Parquet file: {e}") from None
        if batch is None or data is None:
            return
        done += batch.num_rows
        yield data


def _skip(stats: ReadStats | None, where: str) -> None:
    if stats is not None:
        stats.empty += 1
        if len(stats.where) < 5:
            stats.where.append(where)


def read_documents(path: str | Path, stats: ReadStats | None = None,
                   max_documents: int | None = None) -> Iterator[Document]:
    """Stream documents from a .jsonl/.json, .txt/.md or .parquet file. Empty texts are skipped
    and counted in `stats`."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json", ".ndjson"):
        docs: Iterable[Document] = read_jsonl(path, stats)
    elif suffix in (".txt", ".text", ".md"):
        docs = read_text(path, stats)
    elif suffix == ".parquet":
        docs = read_parquet(path, stats)
    else:
        raise Llama2VecError(f"{path}: unknown corpus format {suffix!r}: use .jsonl, .txt or .parquet")
    for n, doc in enumerate(docs):
        if max_documents is not None and n >= max_documents:
            return
        yield doc


# --------------------------------------------------------------------------------------------
# The bundled Wikipedia sample

_DROP_SECTIONS = re.compile(
    r"^=+\s*(references|external links|see also|further reading|bibliography|notes|sources|"
    r"footnotes|citations|works cited|selected works|selected bibliography|publications|works|"
    r"discography|filmography|primary sources|secondary sources)\s*=+\s*$", re.I | re.M)


def clean_wiki(text: str) -> str:
    """Plain prose from gensim's filter_wiki output: no headings, bold/italic quotes, list
    markers, empty brackets or trailing reference sections."""
    m = _DROP_SECTIONS.search(text)
    if m:
        text = text[: m.start()]
    paragraphs = []
    for para in re.split(r"\n\s*\n", text):
        lines = []
        for line in para.splitlines():
            line = line.strip()
            if re.fullmatch(r"=+.*=+", line) or "ISBN" in line:  # a heading or a citation
                continue
            line = re.sub(r"^[*#:;]+\s*", "", line)  # list and indent markers
            line = re.sub(r"'{2,}", "", line)  # bold / italic
            line = re.sub(r"\(\s*[,;:]?\s*\)", "", line)  # brackets emptied by filtering
            line = re.sub(r"\b(thumb|left|right|upright)\|", "", line)
            line = re.sub(r"\s+([,.;:])", r"\1", line)
            line = re.sub(r"\s{2,}", " ", line).strip()
            if line:
                lines.append(line)
        if lines:
            paragraphs.append(" ".join(lines))
    return "\n\n".join(paragraphs)


def wiki_documents(min_words: int = 50) -> Iterator[Document]:
    """The Wikipedia articles bundled with gensim, cleaned. Redirects and stubs are left out."""
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki
    from gensim.test.utils import datapath

    with bz2.open(datapath(WIKI_SAMPLE)) as fh:
        for title, raw, page_id in extract_pages(fh):
            if raw.lstrip().upper().startswith("#REDIRECT"):
                continue
            text = clean_wiki(filter_wiki(raw))
            if len(text.split()) >= min_words:
                yield Document(str(page_id), title, text)


def build_wiki(output: str | Path) -> int:
    """`llama2vec data wiki`: write the bundled Wikipedia sample as JSONL {id, title, text}."""
    rows = ({"id": d.id, "title": d.title, "text": d.text} for d in wiki_documents())
    return write_lines(Path(output), (json.dumps(r, ensure_ascii=False) for r in rows))


# --------------------------------------------------------------------------------------------
# Chunking into (text, next text) pairs

_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+|\n+")


def split_sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE_END.split(text) if s and s.strip()]


def chunk_ids(text: str, tokenizer, chunk_tokens: int) -> list[list[int]]:
    """Consecutive chunks of about `chunk_tokens` tokens that end on sentence boundaries; a
    sentence longer than a chunk is cut by tokens."""
    sentences = split_sentences(text)
    if not sentences:
        return []
    # A leading space on every sentence but the first tokenises them as they read in running text.
    pieces = tokenizer([sentences[0]] + [" " + s for s in sentences[1:]], add_special_tokens=False)["input_ids"]
    chunks: list[list[int]] = []
    current: list[int] = []
    for ids in pieces:
        if current and len(current) + len(ids) > chunk_tokens:
            chunks.append(current)
            current = []
        while len(ids) > chunk_tokens:  # an over-long sentence: cut it
            chunks.append(ids[:chunk_tokens])
            ids = ids[chunk_tokens:]
        current = current + ids
    if current:
        chunks.append(current)
    return chunks


def _tokenizer_fingerprint(tokenizer) -> str:
    vocab = sorted(tokenizer.get_vocab().items())
    return hashlib.sha1(json.dumps(vocab[:2000] + vocab[-2000:]).encode() + str(len(vocab)).encode()).hexdigest()[:12]


def pair_cache_fingerprint(corpus: Path, tokenizer, chunk_tokens: int, min_chunk_tokens: int,
                           max_documents: int | None, title: bool = True) -> dict:
    """What a chunk-pair cache is made from: the corpus's content, the tokenizer and the chunking."""
    return fingerprint(corpus=file_identity(corpus), tokenizer=_tokenizer_fingerprint(tokenizer),
                       chunk_tokens=chunk_tokens, min_chunk_tokens=min_chunk_tokens, max_documents=max_documents,
                       title=title, format="pairs-v2")


_WORKER_TOKENIZER = None  # the tokenizer of a chunking worker process


def _init_chunk_worker(tokenizer) -> None:
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = tokenizer


def _chunk_texts(texts: list[str], chunk_tokens: int, min_chunk_tokens: int, tokenizer=None) -> list[list[list[int]]]:
    tokenizer = tokenizer or _WORKER_TOKENIZER
    return [[c for c in chunk_ids(t, tokenizer, chunk_tokens) if len(c) >= min_chunk_tokens] for t in texts]


def _batches(items: Iterable, size: int) -> Iterator[list]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def chunk_stream(texts: Iterable[str], tokenizer, chunk_tokens: int, min_chunk_tokens: int,
                 workers: int = 1, batch: int = 256) -> Iterator[list[list[int]]]:
    """The chunks (token ids) of each text, in order. With `workers` > 1, batches of texts are chunked
    by a pool of processes, at most two batches per worker in flight, so memory stays bounded."""
    if workers <= 1:
        for texts_batch in _batches(texts, batch):
            yield from _chunk_texts(texts_batch, chunk_tokens, min_chunk_tokens, tokenizer)
        return
    import multiprocessing

    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    with multiprocessing.get_context(method).Pool(workers, _init_chunk_worker, (tokenizer,)) as pool:
        pending: collections.deque = collections.deque()
        for texts_batch in _batches(texts, batch):
            pending.append(pool.apply_async(_chunk_texts, (texts_batch, chunk_tokens, min_chunk_tokens)))
            if len(pending) >= 2 * workers:
                yield from pending.popleft().get()
        while pending:
            yield from pending.popleft().get()


def build_pair_cache(corpus: str | Path, tokenizer, folder: str | Path, chunk_tokens: int, min_chunk_tokens: int = 16,
                     max_documents: int | None = None, title: bool = True, workers: int = 1) -> Path:
    """Chunk every document and write the chunks to disk as one int32 token file plus offsets;
    a pair is (chunk i, chunk i+1) of the same document. `workers` processes chunk in parallel (the
    same cache as one). Written atomically (see `store`), with its fingerprint in meta.json; reused
    only when the fingerprint matches."""
    from tqdm.auto import tqdm

    corpus, folder = Path(corpus), Path(folder)
    fp = pair_cache_fingerprint(corpus, tokenizer, chunk_tokens, min_chunk_tokens, max_documents, title)
    meta_path = folder / "meta.json"
    if meta_path.is_file():
        old = read_json_or_none(meta_path) or {}
        if old.get("fingerprint") == fp:
            return folder
        log.info("%s: made from other data or options (%s differ): rebuilt", folder,
                 ", ".join(differences(old.get("fingerprint"), fp)))
    stats = ReadStats()
    offsets = array.array("q", [0])  # chunk j is tokens[offsets[j]:offsets[j + 1]]
    pair_starts = array.array("q")  # chunk ids whose next chunk belongs to the same document
    n_docs = 0

    def texts() -> Iterator[str]:
        nonlocal n_docs
        for doc in tqdm(read_documents(corpus, stats, max_documents), desc="chunking", unit="doc"):
            n_docs += 1
            yield f"{doc.title}\n{doc.text}" if title and doc.title else doc.text

    with atomic_folder(folder) as tmp:
        with (tmp / "tokens.bin").open("wb") as fh:
            for chunks in chunk_stream(texts(), tokenizer, chunk_tokens, min_chunk_tokens, workers):
                for i, chunk in enumerate(chunks):
                    if i + 1 < len(chunks):
                        pair_starts.append(len(offsets) - 1)
                    fh.write(np.asarray(chunk, dtype=np.int32).tobytes())
                    offsets.append(offsets[-1] + len(chunk))
        if stats.empty:
            log.warning("%s: skipped %d empty document(s), first at %s", corpus, stats.empty, ", ".join(stats.where))
        if not pair_starts:
            raise Llama2VecError(f"{corpus}: no (text, next text) pairs: documents need at least two chunks of "
                                 f"{min_chunk_tokens}+ tokens (read {n_docs} document(s))")
        np.save(tmp / "offsets.npy", np.frombuffer(offsets, dtype=np.int64))
        np.save(tmp / "pairs.npy", np.frombuffer(pair_starts, dtype=np.int64))
        meta = {"corpus": str(corpus), "documents": n_docs, "chunks": len(offsets) - 1, "pairs": len(pair_starts),
                "tokens": offsets[-1], "skipped_empty": stats.empty, "chunk_tokens": chunk_tokens,
                "fingerprint": fp}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    return folder


def wait_for_pair_cache(folder: Path, fp: dict, poll_s: float = 2.0) -> Path:
    """On the processes that do not build the pair cache: wait until the one that does has
    written it (polling the file system, so a long build outlasts no collective's timeout)."""
    import time

    start = last_note = time.time()
    while (read_json_or_none(folder / "meta.json") or {}).get("fingerprint") != fp:
        if time.time() - last_note > 60:
            log.info("waiting for the pair cache %s (%.0f s)", folder, time.time() - start)
            last_note = time.time()
        time.sleep(poll_s)
    return folder


def check_pair_cache(folder: str | Path, tokenizer) -> Path:
    """A pair cache made ahead (`llama2vec data chunk`): it must exist and match the tokenizer."""
    folder = Path(folder)
    meta = read_json_or_none(folder / "meta.json")
    if not meta or "fingerprint" not in meta:
        raise Llama2VecError(f"{folder}: not a finished pair cache (no meta.json): make it with llama2vec data chunk")
    if meta["fingerprint"].get("tokenizer") != _tokenizer_fingerprint(tokenizer):
        raise Llama2VecError(f"{folder}: made with another tokenizer (or other placeholder tokens) than this model's: "
                             f"make it again with llama2vec data chunk --model and --prompt-preset of this run")
    return folder


class PairDataset:
    """Map-style dataset over a pair cache: item i -> {'text': ids of chunk, 'next': ids of the next}."""

    def __init__(self, folder: str | Path):
        folder = Path(folder)
        self.meta = json.loads((folder / "meta.json").read_text())
        self.tokens = np.memmap(folder / "tokens.bin", dtype=np.int32, mode="r")
        self.offsets = np.load(folder / "offsets.npy")
        self.pairs = np.load(folder / "pairs.npy")

    def __len__(self) -> int:
        return len(self.pairs)

    def text_lengths(self) -> np.ndarray:
        """Tokens of the input chunk of every pair, (N,)."""
        return (self.offsets[self.pairs + 1] - self.offsets[self.pairs]).astype(np.int64)

    def chunk(self, j: int) -> list[int]:
        return self.tokens[self.offsets[j]: self.offsets[j + 1]].tolist()

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        j = int(self.pairs[i])
        return {"text": self.chunk(j), "next": self.chunk(j + 1)}
