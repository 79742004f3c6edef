"""A LanceDB store: the passages of a corpus with their embeddings in one table, beside the FAISS folders.

`build_store` writes a LanceDB database folder holding the table `passages`: `id`, `vector` (float32, or
float16), `title`, `text` and every other field of the corpus lines (metadata such as a category, typed
as the lines have them), streamed batch by batch from the embeddings' shards (memory flat in the corpus
size), then the vector index (`flat`: none, exact search; `ivf_pq`: IVF lists and PQ codes trained by FAISS
on the sample a FAISS folder trains on, see `train_ivf_pq`; `hnsw`: LanceDB's IVF_HNSW_SQ) and full-text
indexes on `title` and `text`. `meta.json` records the store, the embeddings' fingerprint and
the dimensions, as a FAISS folder's does, so `search`, `evaluate` and `serve` check queries against it the
same way. The folder is written aside and moved into place when complete.

`search_store` is the dense search (scores are inner products, as FAISS's) and `text_search` the full-text
one (LanceDB's BM25 over title and text), each with an optional SQL filter (`where`) on the metadata,
checked first so that a bad one is an error naming it. `llama2vec search --mode hybrid` fuses the two runs
with llama2vec's own fusion (`evaluate.fuse_runs`: RRF, a spec, or one chosen on dev runs).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from .errors import Llama2VecError

log = logging.getLogger(__name__)

TABLE = "passages"
STORE = "lancedb"
INDEX_TYPES = ("flat", "ivf_pq", "hnsw")
FTS_COLUMNS = ("title", "text")
RESERVED = ("id", "vector", "title", "text")


def lancedb():
    try:
        import lancedb as module
    except ImportError:
        raise Llama2VecError("the LanceDB store needs the lancedb extra: pip install 'llama2vec[lancedb]'") from None
    return module


def is_store(folder: str | Path) -> bool:
    """Whether a folder is a LanceDB store written by `build_store`."""
    from .store import read_json_or_none

    return (read_json_or_none(Path(folder) / "meta.json") or {}).get("store") == STORE


def _arrow_type(values: set[type]):
    import pyarrow as pa

    if values <= {bool}:
        return pa.bool_()
    if values <= {int}:
        return pa.int64()
    if values <= {int, float}:
        return pa.float64()
    return pa.string()


def corpus_fields(path: Path) -> dict:
    """The fields of a corpus's lines beside `_id`, `title` and `text`, each with the Arrow type its values
    share (string where they differ or are not scalars)."""
    from .data import objects_at

    seen: dict[str, set[type]] = {}
    for _, _, obj in objects_at(path):
        for name, value in obj.items():
            if name in ("_id", "title", "text") or value is None:
                continue
            if name in RESERVED:
                raise Llama2VecError(f"{path}: the field {name!r} is the store's own: rename it")
            seen.setdefault(name, set()).add(type(value) if isinstance(value, bool | int | float | str) else dict)
    return {name: _arrow_type(types) for name, types in sorted(seen.items())}


def _value(value, kind):
    import pyarrow as pa

    if value is None:
        return None
    if kind == pa.string() and not isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    return value


class Passages:
    """An embeddings folder joined with the corpus lines of its passages, streamed as Arrow record batches in the
    store's schema (`fields`: the extra fields and their types; those of the corpus when None)."""

    def __init__(self, embeddings: str | Path, dataset: str | Path, float16: bool, fields: dict | None = None):
        import pyarrow as pa

        from .embeddings import Embeddings
        from .formats import corpus_offsets

        self.emb, self.float16 = Embeddings(embeddings), float16
        if self.emb.count == 0:
            raise Llama2VecError(f"{embeddings}: nothing to index (no embeddings)")
        self.ids = (Path(embeddings) / "ids.txt").read_text(encoding="utf-8").splitlines()
        self.path, self.offsets = corpus_offsets(dataset, self.ids)
        found = corpus_fields(self.path)
        if fields is not None:
            new = sorted(set(found) - set(fields))
            if new:
                raise Llama2VecError(f"{self.path}: fields the store does not have: {', '.join(new)} (it has "
                                     f"{', '.join(fields) or 'none'}): build the store again to add fields")
            for name, kind in found.items():
                if kind != fields[name] and fields[name] != pa.string() and not (
                        kind == pa.int64() and fields[name] == pa.float64()):
                    raise Llama2VecError(f"{self.path}: the field {name!r} holds {kind} values; the store's are "
                                         f"{fields[name]}")
        self.fields = found if fields is None else fields
        if (self.offsets < 0).any():
            missing = [self.ids[i] for i in np.flatnonzero(self.offsets < 0)[:5]]
            raise Llama2VecError(f"{self.path}: {int((self.offsets < 0).sum())} passages of {embeddings} are not in "
                                 f"the corpus ({', '.join(missing)}): index the embeddings of this corpus")
        vector = pa.list_(pa.float16() if float16 else pa.float32(), self.emb.dim)
        self.schema = pa.schema([("id", pa.string()), ("vector", vector), ("title", pa.string()),
                                 ("text", pa.string()), *self.fields.items()])
        self.fingerprint = (json.loads((Path(embeddings) / "meta.json").read_text()) or {}).get("fingerprint")

    def reader(self, desc: str, batch: int = 65_536):
        import pyarrow as pa

        return pa.RecordBatchReader.from_batches(self.schema, self._batches(desc, batch))

    def _batches(self, desc: str, batch: int):
        import pyarrow as pa
        from tqdm.auto import tqdm

        emb, dim = self.emb, self.emb.dim
        bar = tqdm(total=emb.count, desc=desc, unit="passage")
        start = 0
        with self.path.open("rb") as fh:
            for s in range(len(emb.names)):
                shard = emb.shard(s)
                for at in range(0, len(shard), batch):
                    rows = np.asarray(shard[at: at + batch], dtype=np.float16 if self.float16 else np.float32)
                    docs = []
                    for offset in self.offsets[start: start + len(rows)]:
                        fh.seek(int(offset))
                        docs.append(json.loads(fh.readline()))
                    columns = [pa.array(self.ids[start: start + len(rows)]),
                               pa.FixedSizeListArray.from_arrays(pa.array(rows.ravel()), dim),
                               pa.array([d.get("title") or "" for d in docs]), pa.array([d["text"] for d in docs])]
                    columns += [pa.array([_value(d.get(name), kind) for d in docs], kind)
                                for name, kind in self.fields.items()]
                    yield pa.RecordBatch.from_arrays(columns, schema=self.schema)
                    start += len(rows)
                    bar.update(len(rows))
        bar.close()


def build_store(embeddings: str | Path, dataset: str | Path, output: str | Path, index_type: str = "flat",
                float16: bool = False, train_size: int = 262_144, partitions: int | None = None,
                sub_vectors: int | None = None, batch: int = 65_536, seed: int = 0) -> Path:
    """Write the LanceDB store of an embeddings folder and its BEIR corpus (see the module's description)."""
    from .store import atomic_folder, write_json

    db_module = lancedb()
    if index_type not in INDEX_TYPES:
        raise Llama2VecError(f"unknown --index-type {index_type!r}; choose one of {', '.join(INDEX_TYPES)}")
    passages = Passages(embeddings, dataset, float16)
    count, dim = passages.emb.count, passages.emb.dim
    if index_type == "ivf_pq":
        partitions, sub_vectors = ivf_pq_shape(count, dim, partitions, sub_vectors)
    hnsw = hnsw_index(count, train_size, partitions) if index_type == "hnsw" else None
    with atomic_folder(output) as tmp:
        table = db_module.connect(tmp).create_table(TABLE, data=passages.reader(f"storing {Path(output).name}",
                                                                                 batch))
        metric = "dot"
        if index_type == "ivf_pq":
            centroids, codebook, metric = train_ivf_pq(passages.emb, partitions, sub_vectors, train_size, seed)
            if float16:  # LanceDB takes them in the column's type
                centroids, codebook = centroids.astype(np.float16), codebook.astype(np.float16)
            table.to_lance().create_index("vector", "IVF_PQ", metric=metric, num_partitions=partitions,
                                          num_sub_vectors=sub_vectors, ivf_centroids=centroids, pq_codebook=codebook)
            table.checkout_latest()
        elif hnsw is not None:
            table.create_index("vector", config=hnsw)
        from lancedb.index import FTS

        for column in FTS_COLUMNS:
            table.create_index(column, config=FTS())
        write_json(tmp / "meta.json", {"store": STORE, "table": TABLE, "count": count, "dim": dim,
                                       "index_type": index_type, "metric": metric,
                                       "vector_dtype": "float16" if float16 else "float32",
                                       "fields": {k: str(v) for k, v in passages.fields.items()},
                                       "embeddings": passages.fingerprint})
    return Path(output)


def _sql_string(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def update_store(folder: str | Path, add: str | Path | None = None, dataset: str | Path | None = None,
                 delete_ids: str | Path | None = None, batch: int = 65_536) -> dict:
    """Upsert the passages of the embeddings folder `add` (their lines in `dataset`): a passage whose id is in
    the store replaces its row, the others are added; then delete the ids listed in `delete_ids` (one a line);
    then bring the indexes up to date (LanceDB's `optimize`). Each step is one LanceDB commit: a process killed
    during one leaves the table at its last committed version. Returns the rows added, replaced and deleted."""
    import pyarrow as pa

    from .store import write_json

    table, meta = open_table(folder)
    folder = Path(folder)
    done = {"added": 0, "replaced": 0, "deleted": 0}
    if add is not None:
        if dataset is None:
            raise Llama2VecError("--add needs --dataset: the BEIR folder of the added passages' lines")
        fields = {name: pa.type_for_alias(kind) for name, kind in meta.get("fields", {}).items()}
        passages = Passages(add, dataset, meta.get("vector_dtype") == "float16", fields)
        if passages.emb.dim != meta["dim"]:
            raise Llama2VecError(f"{add}: {passages.emb.dim}-dimension embeddings; the store {folder} holds "
                                 f"{meta['dim']}-dimension ones")
        if meta.get("metric") == "l2":  # its IVF-PQ ranks by squared L2, the inner product's ranking on unit vectors
            if not _unit(passages.emb.sample(4096)):
                raise Llama2VecError(f"{add}: vectors that are not of unit length; the store {folder} indexes unit "
                                     f"vectors for squared L2 (its IVF-PQ), which ranks others otherwise than "
                                     f"the inner product")
        ours, theirs = (meta.get("embeddings") or {}).get("model"), (passages.fingerprint or {}).get("model")
        if ours and theirs and ours != theirs:
            raise Llama2VecError(f"{add}: embeddings of the model {theirs}; the store {folder} holds those of {ours}: "
                                 f"scores across two models mean nothing")
        result = (table.merge_insert("id").when_matched_update_all().when_not_matched_insert_all()
                  .execute(passages.reader(f"adding to {folder.name}", batch)))
        done["added"] = int(getattr(result, "num_inserted_rows", 0))
        done["replaced"] = int(getattr(result, "num_updated_rows", 0))
    if delete_ids is not None:
        from .store import read_text_file

        ids = [line.strip() for line in read_text_file(Path(delete_ids), "missing").splitlines() if line.strip()]
        before = table.count_rows()
        for start in range(0, len(ids), 1000):
            table.delete("id IN (" + ", ".join(_sql_string(i) for i in ids[start: start + 1000]) + ")")
        done["deleted"] = before - table.count_rows()
    table.optimize()  # new rows into the vector and full-text indexes, old versions' files kept for readers
    write_json(folder / "meta.json", {**meta, "count": table.count_rows()})
    return done


def _partitions(count: int, partitions: int | None) -> int:
    partitions = partitions or max(1, int(round(count ** 0.5)))
    if not 1 <= partitions <= count:
        raise Llama2VecError(f"--partitions must be in 1..{count} (the passages), got {partitions}")
    return partitions


def hnsw_index(count: int, train_size: int, partitions: int | None):
    """LanceDB's IVF_HNSW_SQ config: `partitions` IVF lists (default about the square root of the count), trained
    on about `train_size` rows."""
    from lancedb.index import HnswSq

    partitions = _partitions(count, partitions)
    sample_rate = max(1, -(-min(train_size, count) // partitions))  # LanceDB trains on partitions x this rows
    return HnswSq(distance_type="dot", num_partitions=partitions, sample_rate=sample_rate)


def ivf_pq_shape(count: int, dim: int, partitions: int | None, sub_vectors: int | None) -> tuple[int, int]:
    """(IVF lists, PQ sub-vectors): by default about the square root of the count and dim / 16."""
    partitions = _partitions(count, partitions)
    sub_vectors = sub_vectors or max(1, dim // 16)
    if dim % sub_vectors:
        raise Llama2VecError(f"--sub-vectors must divide the dimensions ({dim}), got {sub_vectors}")
    if count < 256:
        raise Llama2VecError(f"IVF-PQ trains 256 codes per sub-vector: it needs at least 256 passages, got {count}")
    return partitions, sub_vectors


def _unit(vectors: np.ndarray) -> bool:
    """Whether every row is of unit length (to 1e-3)."""
    return bool(np.abs(np.linalg.norm(vectors, axis=1) - 1.0).max() < 1e-3)


def train_ivf_pq(emb, partitions: int, sub_vectors: int, train_size: int, seed: int = 0):
    """(IVF centroids, PQ codebook (sub_vectors, 256, dim / sub_vectors), LanceDB metric) trained by FAISS on the
    seeded sample that a FAISS folder trains on (`Embeddings.sample`), so that the store's lists and codes are
    those of FAISS's `IVF{partitions},PQ{sub_vectors}`. Unit vectors (llama2vec's) are indexed for squared L2,
    which ranks them as inner products do, with the residuals' PQ that FAISS uses; other vectors for the inner
    product, with a PQ of the vectors themselves (LanceDB's dot index codes no residuals)."""
    import faiss

    sample = emb.sample(train_size, seed)
    unit = _unit(sample)
    index = faiss.index_factory(sample.shape[1], f"IVF{partitions},PQ{sub_vectors}",
                                faiss.METRIC_L2 if unit else faiss.METRIC_INNER_PRODUCT)
    ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
    ivf.by_residual = unit
    index.train(np.ascontiguousarray(sample))
    centroids = ivf.quantizer.reconstruct_n(0, partitions)
    codebook = faiss.vector_to_array(ivf.pq.centroids).reshape(sub_vectors, ivf.pq.ksub, ivf.pq.dsub)
    return centroids, codebook, "l2" if unit else "dot"


def open_table(folder: str | Path):
    from .store import read_json

    meta = read_json(Path(folder) / "meta.json")
    return lancedb().connect(Path(folder)).open_table(meta.get("table", TABLE)), meta


def _outside_quotes(text: str) -> str:
    """`text` with its quoted parts ('strings', "identifiers") left out."""
    out, quote = [], None
    for ch in text:
        if quote:
            quote = None if ch == quote else quote  # a doubled quote closes and reopens: the same outside text
        elif ch in "'\"":
            quote = ch
        else:
            out.append(ch)
    return "".join(out)


def check_where(table, where: str, folder: str | Path) -> None:
    """A SQL filter on the table's fields, or an error naming it and what is wrong (a missing field, bad syntax,
    anything but one boolean expression: SQL's parser would read the first of several statements and drop the
    rest unseen, so a `;` outside quotes is refused here)."""
    fields = ", ".join(f.name for f in table.schema if f.name != "vector")

    def bad(reason: str) -> Llama2VecError:
        return Llama2VecError(f"{folder}: the filter {where!r} cannot be applied: {reason} (the fields: {fields})")

    if ";" in _outside_quotes(where):
        raise bad("one boolean expression is expected, not statements")
    try:
        table.search().where(where).limit(1).select(["id"]).to_arrow()
    except Exception as e:  # LanceDB reports a bad filter as ValueError or RuntimeError, with DataFusion's words
        raise bad(str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__) from None


def store_nprobes(params: str | None) -> int | None:
    """The IVF lists a store's search probes, from search parameters 'nprobes=N' (None: LanceDB's default)."""
    if not params:
        return None
    name, _, value = params.partition("=")
    if name.strip() != "nprobes" or not value.strip().isdigit() or int(value) < 1:
        raise Llama2VecError(f"--params {params!r}: a LanceDB store takes nprobes=N, N at least 1")
    return int(value)


def search_store(folder: str | Path, queries: np.ndarray, k: int, where: str | None = None,
                 nprobes: int | None = None, batch: int = 256,
                 opened: tuple | None = None) -> tuple[np.ndarray, list[list[str]]]:
    """(scores (Q, k) as inner products, -inf where fewer hits, the hits' ids) of a store, best first (`opened`:
    the store's table and meta as `open_table` gives them, its filter already checked)."""
    if k < 1:
        raise Llama2VecError(f"k must be at least 1, got {k}")
    if opened is None:
        table, meta = open_table(folder)
        if where:
            check_where(table, where, folder)
    else:
        table, meta = opened
    dtype = np.float16 if meta.get("vector_dtype") == "float16" else np.float32
    metric = meta.get("metric", "dot")
    scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
    hits: list[list[str]] = [[] for _ in range(len(queries))]
    for start in range(0, len(queries), batch):
        block = np.asarray(queries[start: start + batch], dtype=dtype)
        query = table.search(list(block) if len(block) > 1 else block[0], vector_column_name="vector")
        query = query.distance_type(metric).limit(k).select(["id", "_distance"])
        if where:
            query = query.where(where, prefilter=True)
        if nprobes:
            query = query.nprobes(nprobes)
        result = query.to_arrow()
        rows = result["query_index"].to_numpy() if "query_index" in result.column_names else np.zeros(
            result.num_rows, dtype=np.int64)
        distances = result["_distance"].to_numpy().astype(np.float64)
        if metric == "l2":  # squared L2 to unit passages: |q|^2 + 1 - 2 q.p
            norms = (np.asarray(block, dtype=np.float64) ** 2).sum(axis=1)
            inner = (norms[rows] + 1.0 - distances) / 2.0
        else:  # LanceDB's dot distance is 1 - the inner product
            inner = 1.0 - distances
        for q, doc, score in zip(rows, result["id"].to_pylist(), inner):
            i = start + int(q)
            scores[i, len(hits[i])] = score
            hits[i].append(doc)
    return scores, hits


def text_search(folder: str | Path, query_ids: list[str], texts: list[str], k: int,
                where: str | None = None) -> dict[str, dict[str, float]]:
    """The full-text run of queries over the title and text indexes (LanceDB's BM25 scores), best first."""
    if k < 1:
        raise Llama2VecError(f"k must be at least 1, got {k}")
    table, _ = open_table(folder)
    if where:
        check_where(table, where, folder)
    run = {}
    for qid, text in zip(query_ids, texts):
        query = table.search(text, query_type="fts", fts_columns=list(FTS_COLUMNS)).limit(k).select(["id", "_score"])
        if where:
            query = query.where(where, prefilter=True)
        result = query.to_arrow()
        run[qid] = dict(zip(result["id"].to_pylist(), (float(x) for x in result["_score"].to_numpy())))
    return run
