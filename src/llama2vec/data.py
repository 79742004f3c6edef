"""Corpus readers, the bundled Wikipedia corpus, and the chunker that turns documents into
(text, next text) pairs for adaptation.

Readers stream: they yield one document at a time and name the file, line and field of anything
wrong. The chunk-pair cache is written token by token to disk, so a corpus larger than memory works.
"""

from __future__ import annotations

import bz2
import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import Llama2VecError

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
    """(line number, decoded line), with a clear error for bytes that are not UTF-8."""
    try:
        fh = path.open("rb")
    except FileNotFoundError:
        raise Llama2VecError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise Llama2VecError(f"{path}: is a folder, expected a file") from None
    with fh:
        for number, raw in enumerate(fh, start=1):
            try:
                yield number, raw.decode("utf-8")
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
    if isinstance(value, (int, float)) and not isinstance(value, bool) and name in ("id", "_id"):
        return str(value)
    if not isinstance(value, str):
        raise Llama2VecError(f"{where}: field {name!r} must be a string, got {type(value).__name__}")
    return value


def read_objects(path: Path) -> Iterator[tuple[str, dict]]:
    """('file:line', object) for each non-blank line of a JSONL file."""
    for number, line in _lines(path):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise Llama2VecError(f"{where}: invalid JSON: {e.msg} (column {e.colno})") from None
        if not isinstance(obj, dict):
            raise Llama2VecError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        yield where, obj


def read_jsonl(path: Path, stats: ReadStats | None = None, text_field: str = "text") -> Iterator[Document]:
    """JSONL documents: one object per line with 'text' and optional 'title' and 'id' (or '_id')."""
    for where, obj in read_objects(path):
        text = _field(obj, text_field, where, required=True)
        title = _field(obj, "title", where, required=False)
        doc_id = _field(obj, "_id" if "_id" in obj else "id", where, required=False) or where.rsplit(":", 1)[1]
        if not text.strip():
            _skip(stats, where)
            continue
        yield Document(doc_id, title, text)


def read_text(path: Path, stats: ReadStats | None = None) -> Iterator[Document]:
    """Plain text: one document per block of lines separated by blank lines."""
    block: list[str] = []
    start = 0
    for number, line in _lines(path):
        if line.strip():
            if not block:
                start = number
            block.append(line.rstrip("\n"))
        elif block:
            yield Document(f"{path.name}:{start}", "", "\n".join(block))
            block = []
    if block:
        yield Document(f"{path.name}:{start}", "", "\n".join(block))


def read_parquet(path: Path, stats: ReadStats | None = None, text_field: str = "text") -> Iterator[Document]:
    """Parquet documents with a string column 'text' and optional 'title' and 'id' columns."""
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except FileNotFoundError:
        raise Llama2VecError(f"{path}: file not found") from None
    except Exception as e:  # pyarrow raises ArrowInvalid and friends
        raise Llama2VecError(f"{path}: not a readable Parquet file: {e}") from None
    names = pf.schema_arrow.names
    if text_field not in names:
        raise Llama2VecError(f"{path}: no column {text_field!r} (columns: {', '.join(names)})")
    columns = [c for c in (text_field, "title", "id") if c in names]
    row = 0
    for batch in pf.iter_batches(columns=columns, batch_size=1024):
        data = batch.to_pydict()
        for i, text in enumerate(data[text_field]):
            row += 1
            where = f"{path}: row {row}"
            if text is not None and not isinstance(text, str):
                raise Llama2VecError(f"{where}: field {text_field!r} must be a string")
            if not text or not text.strip():
                _skip(stats, where)
                continue
            title = data.get("title", [None] * len(data[text_field]))[i] or ""
            doc_id = data.get("id", [None] * len(data[text_field]))[i]
            yield Document(str(doc_id if doc_id is not None else row), str(title), text)


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


def write_jsonl(rows: Iterable[dict], output: str | Path) -> int:
    """Write rows as JSONL atomically (temporary file, then rename). Returns the row count."""
    output = Path(output)
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        tmp = output.with_name(f".{output.name}.tmp-{os.getpid()}")
        n = 0
        with tmp.open("w", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
                n += 1
        tmp.replace(output)
    except (NotADirectoryError, PermissionError, FileExistsError) as e:
        raise Llama2VecError(f"{output}: cannot write: {e.strerror or e}") from None
    return n


def build_wiki(output: str | Path) -> int:
    """`llama2vec data wiki`: write the bundled Wikipedia sample as JSONL {id, title, text}."""
    return write_jsonl(({"id": d.id, "title": d.title, "text": d.text} for d in wiki_documents()), output)


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


def pair_cache_key(corpus: Path, tokenizer, chunk_tokens: int, min_chunk_tokens: int, max_documents: int | None) -> str:
    st = corpus.stat()
    parts = (corpus.resolve(), st.st_size, st.st_mtime_ns, _tokenizer_fingerprint(tokenizer), chunk_tokens,
             min_chunk_tokens, max_documents, "v1")
    raw = "|".join(map(str, parts))
    return hashlib.sha1(raw.encode()).hexdigest()[:16]


def build_pair_cache(corpus: str | Path, tokenizer, folder: str | Path, chunk_tokens: int, min_chunk_tokens: int = 16,
                     max_documents: int | None = None, title: bool = True) -> Path:
    """Chunk every document and write the chunks to disk as one int32 token file plus offsets;
    a pair is (chunk i, chunk i+1) of the same document. Written under a temporary name and
    renamed, so a killed run never leaves a cache that looks complete. Reused when present."""
    from tqdm.auto import tqdm

    corpus, folder = Path(corpus), Path(folder)
    if (folder / "meta.json").is_file():
        return folder
    tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    stats = ReadStats()
    offsets = [0]
    pair_starts: list[int] = []
    n_docs = 0
    with (tmp / "tokens.bin").open("wb") as fh:
        for doc in tqdm(read_documents(corpus, stats, max_documents), desc="chunking", unit="doc"):
            text = f"{doc.title}\n{doc.text}" if title and doc.title else doc.text
            chunks = [c for c in chunk_ids(text, tokenizer, chunk_tokens) if len(c) >= min_chunk_tokens]
            n_docs += 1
            for i, chunk in enumerate(chunks):
                if i + 1 < len(chunks):
                    pair_starts.append(len(offsets) - 1)
                fh.write(np.asarray(chunk, dtype=np.int32).tobytes())
                offsets.append(offsets[-1] + len(chunk))
    if stats.empty:
        log.warning("%s: skipped %d empty document(s), first at %s", corpus, stats.empty, ", ".join(stats.where))
    if not pair_starts:
        shutil.rmtree(tmp, ignore_errors=True)
        raise Llama2VecError(f"{corpus}: no (text, next text) pairs: documents need at least two chunks of "
                             f"{min_chunk_tokens}+ tokens (read {n_docs} document(s))")
    np.save(tmp / "offsets.npy", np.asarray(offsets, dtype=np.int64))
    np.save(tmp / "pairs.npy", np.asarray(pair_starts, dtype=np.int64))
    meta = {"corpus": str(corpus), "documents": n_docs, "chunks": len(offsets) - 1, "pairs": len(pair_starts),
            "tokens": offsets[-1], "skipped_empty": stats.empty, "chunk_tokens": chunk_tokens}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
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
