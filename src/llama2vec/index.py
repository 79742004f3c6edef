"""`llama2vec index` / `llama2vec search`: FAISS indexes over embedding folders, batched search,
TREC runs, and top-k merging of several index shards."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import Llama2VecError
from .formats import Run
from .store import atomic_file, write_json, write_lines


def build_index(emb: np.ndarray, factory: str = "Flat"):
    """A FAISS inner-product index from an index-factory string ('Flat' exact, 'HNSW32',
    'IVF256,PQ16', ...). Embeddings (N, H) are expected L2-normalised."""
    import faiss

    emb = np.ascontiguousarray(emb, dtype=np.float32)
    if emb.ndim != 2 or len(emb) == 0:
        raise Llama2VecError(f"nothing to index: embeddings of shape {emb.shape}")
    try:
        index = faiss.index_factory(emb.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        raise Llama2VecError(f"bad FAISS index factory string {factory!r}: {str(e).splitlines()[-1]}") from None
    if not index.is_trained:
        index.train(emb)
    index.add(emb)
    return index


def save_index(folder: str | Path, index, ids: list[str], factory: str, meta: dict | None = None) -> Path:
    import faiss

    folder = Path(folder)
    (folder / "meta.json").unlink(missing_ok=True)  # written last: it marks the folder complete
    write_lines(folder / "ids.txt", ids)
    with atomic_file(folder / "index.faiss") as tmp:
        faiss.write_index(index, str(tmp))
    write_json(folder / "meta.json", {"factory": factory, "count": len(ids), "dim": index.d, **(meta or {})})
    return folder


def load_index(folder: str | Path):
    """(index, ids) of an index folder."""
    import faiss

    folder = Path(folder)
    if not (folder / "meta.json").is_file():
        raise Llama2VecError(f"{folder}: not an index folder (no meta.json)")
    ids = (folder / "ids.txt").read_text(encoding="utf-8").splitlines()
    return faiss.read_index(str(folder / "index.faiss")), ids


def search_index(index, queries: np.ndarray, k: int, batch_size: int = 1024,
                 params: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Top-k (scores (Q, k), positions (Q, k)) in batches of queries; missing hits are -1.
    `params` sets search-time parameters, e.g. 'nprobe=16' (IVF) or 'efSearch=128' (HNSW)."""
    if params:
        import faiss

        faiss.ParameterSpace().set_index_parameters(index, params)
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    if k < 1:
        raise Llama2VecError(f"k must be at least 1, got {k}")
    if index.ntotal == 0:
        raise Llama2VecError("the index is empty")
    k = min(k, index.ntotal)
    scores = np.empty((len(queries), k), dtype=np.float32)
    found = np.empty((len(queries), k), dtype=np.int64)
    for start in range(0, len(queries), batch_size):
        s, i = index.search(queries[start: start + batch_size], k)
        scores[start: start + batch_size], found[start: start + batch_size] = s, i
    return scores, found


def merge_topk(results: list[tuple[np.ndarray, np.ndarray]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Merge per-shard (scores (Q, k_s), global ids (Q, k_s)) into the overall top k."""
    scores = np.concatenate([r[0] for r in results], axis=1)  # (Q, sum k_s)
    ids = np.concatenate([r[1] for r in results], axis=1)
    k = min(k, scores.shape[1])
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]  # (Q, k)
    return np.take_along_axis(scores, top, 1), np.take_along_axis(ids, top, 1)


def to_run(query_ids: list[str], doc_ids: list[str], scores: np.ndarray, found: np.ndarray) -> Run:
    return {q: {doc_ids[int(d)]: float(s) for d, s in zip(row_ids, row_scores) if d >= 0}
            for q, row_ids, row_scores in zip(query_ids, found, scores)}


def search_shards(folders: list[str | Path], query_ids: list[str], queries: np.ndarray, k: int,
                  params: str | None = None) -> Run:
    """Search every index folder and merge their top-k by score."""
    results, all_ids, seen = [], [], {}
    for folder in folders:
        index, ids = load_index(folder)
        clash = [i for i in ids if i in seen]
        if clash:
            raise Llama2VecError(f"{folder}: ids also in {seen[clash[0]]}: {', '.join(clash[:5])}: the index shards "
                                 f"must hold disjoint passages")
        seen.update(dict.fromkeys(ids, folder))
        s, i = search_index(index, queries, k, params=params)
        results.append((s, np.where(i >= 0, i + len(all_ids), -1)))
        all_ids.extend(ids)
    scores, found = merge_topk(results, k)
    return to_run(query_ids, all_ids, scores, found)


def exact_search(queries: np.ndarray, passages: np.ndarray, query_ids: list[str], doc_ids: list[str], k: int) -> Run:
    """Exact inner-product top-k as a run."""
    scores, found = search_index(build_index(passages, "Flat"), queries, k)
    return to_run(query_ids, doc_ids, scores, found)
