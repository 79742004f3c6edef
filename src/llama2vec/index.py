"""`llama2vec index` / `llama2vec search`: FAISS indexes over embedding folders, batched search,
TREC runs, and top-k merging of several index shards."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np

from .errors import Llama2VecError
from .formats import Run
from .store import atomic_file, write_json, write_lines


def new_index(dim: int, factory: str, pca: int | None = None):
    """An empty FAISS inner-product index from an index-factory string ('Flat' exact, 'HNSW32',
    'IVF256,PQ16', ...), behind a PCA to `pca` dimensions when given."""
    import faiss

    full = f"PCA{pca},{factory}" if pca else factory
    try:
        index = faiss.index_factory(dim, full, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        raise Llama2VecError(f"bad FAISS index factory string {full!r}: {str(e).splitlines()[-1]}") from None
    polysemous_off(index)
    return index


def polysemous_off(index) -> None:
    """Train PQ codebooks without FAISS's polysemous step: it only reorders the codes so that Hamming distances
    between them mean something, which a search by inner product never uses, and it takes most of the training
    time (the same hits and scores: tested)."""
    import faiss

    inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexPreTransform) else index
    try:
        inner = faiss.downcast_index(faiss.extract_index_ivf(inner))
    except RuntimeError:  # not an IVF index
        pass
    if hasattr(inner, "do_polysemous_training"):
        inner.do_polysemous_training = False


def train(index, sample: np.ndarray, gpu: bool = False) -> None:
    """Train an index that needs it (IVF centroids, PQ codebooks, PCA) on `sample`; with `gpu`, the
    IVF k-means runs on every GPU FAISS sees (faiss-gpu)."""
    import faiss

    if index.is_trained:
        return
    if gpu:
        if not hasattr(faiss, "get_num_gpus") or faiss.get_num_gpus() == 0:
            raise Llama2VecError("--faiss-gpu needs faiss-gpu and a GPU (pip install faiss-gpu-cu12)")
        try:
            ivf = faiss.extract_index_ivf(index)
        except RuntimeError:
            raise Llama2VecError("--faiss-gpu trains IVF indexes (an IVF factory string)") from None
        ivf.clustering_index = faiss.index_cpu_to_all_gpus(faiss.IndexFlatL2(ivf.d))
    index.train(np.ascontiguousarray(sample, dtype=np.float32))


def build_index(emb: np.ndarray, factory: str = "Flat", pca: int | None = None):
    """An index over embeddings (N, H) in memory, expected L2-normalised."""
    emb = np.ascontiguousarray(emb, dtype=np.float32)
    if emb.ndim != 2 or len(emb) == 0:
        raise Llama2VecError(f"nothing to index: embeddings of shape {emb.shape}")
    index = new_index(emb.shape[1], factory, pca)
    train(index, emb)
    index.add(emb)
    return index


def index_folder(embeddings: str | Path, output: str | Path, factory: str = "Flat", train_size: int = 262_144,
                 pca: int | None = None, parts: int = 1, batch: int = 65_536, seed: int = 0, gpu: bool = False,
                 meta: dict | None = None) -> Path:
    """Index an embeddings folder without holding it in memory: trained on `train_size` rows drawn
    with `seed`, then filled `batch` rows at a time from the memory-mapped shards. With `parts` > 1,
    `parts` index folders (each over consecutive shards, all with the one trained quantizer) that
    `search` reads one at a time: peak memory at search is one part."""
    import faiss
    from tqdm.auto import tqdm

    from .embeddings import Embeddings

    emb = Embeddings(embeddings)
    if emb.count == 0:
        raise Llama2VecError(f"{embeddings}: nothing to index (no embeddings)")
    if not 1 <= parts <= len(emb.names):
        raise Llama2VecError(f"--parts must be in 1..{len(emb.names)} (the embeddings' shard count), got {parts}")
    if train_size < 1 or batch < 1:
        raise Llama2VecError("--train-size and the batch size must be positive")
    empty = new_index(emb.dim, factory, pca)
    if not empty.is_trained:
        train(empty, emb.sample(train_size, seed), gpu)
    info = {"factory": factory, "pca": pca, "train_size": min(train_size, emb.count), "seed": seed, **(meta or {})}
    output = Path(output)
    bounds = np.linspace(0, len(emb.names), parts + 1).round().astype(int)
    ids = iter(_read_ids(emb.folder / "ids.txt"))
    bar = tqdm(total=emb.count, desc=f"indexing {output.name}", unit="vec")
    (output / "meta.json").unlink(missing_ok=True)  # written last: a kill mid-way leaves no meta naming a mix
    folders = []
    for p in range(parts):
        index = faiss.clone_index(empty)
        for s in range(bounds[p], bounds[p + 1]):
            shard = emb.shard(s)
            for start in range(0, len(shard), batch):
                index.add(np.ascontiguousarray(shard[start: start + batch], dtype=np.float32))
                bar.update(min(batch, len(shard) - start))
        folder = output if parts == 1 else output / f"part-{p:03d}"
        part_ids = (next(ids) for _ in range(index.ntotal))
        folders.append(save_index(folder, index, part_ids, factory, info))
    bar.close()
    if parts > 1:
        write_json(output / "meta.json", {**info, "count": emb.count, "dim": emb.dim,
                                          "parts": [f.name for f in folders]})
    return output


def _read_ids(path: Path):
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            yield line.rstrip("\n")


def save_index(folder: str | Path, index, ids, factory: str, meta: dict | None = None) -> Path:
    import faiss

    folder = Path(folder)
    (folder / "meta.json").unlink(missing_ok=True)  # written last: it marks the folder complete
    count = write_lines(folder / "ids.txt", ids)
    with atomic_file(folder / "index.faiss") as tmp:
        faiss.write_index(index, str(tmp))
    write_json(folder / "meta.json", {"factory": factory, "count": count, "dim": index.d, **(meta or {})})
    return folder


def load_index(folder: str | Path, mmap: bool = False):
    """(index, ids) of an index folder. `mmap`: the vectors or codes stay in the file, memory-mapped
    (`faiss.IO_FLAG_MMAP_IFC`, which maps flat codes, IVF lists and HNSW storage alike; the IVF-only
    `IO_FLAG_MMAP` would leave Flat and HNSW indexes read whole): the process holds the coarse quantizer,
    tables and graph, and the page cache holds what searches touch."""
    import faiss

    folder = Path(folder)
    if not (folder / "meta.json").is_file():
        raise Llama2VecError(f"{folder}: not an index folder (no meta.json)")
    ids = (folder / "ids.txt").read_text(encoding="utf-8").splitlines()
    index = faiss.read_index(str(folder / "index.faiss"), faiss.IO_FLAG_MMAP_IFC if mmap else 0)
    if index.ntotal != len(ids):
        raise Llama2VecError(f"{folder}: index.faiss holds {index.ntotal} vectors, ids.txt {len(ids)} ids: the folder "
                             f"is damaged; index again")
    return index, ids


def set_params(index, params: str, where: str | Path | None = None) -> None:
    """Set FAISS search parameters ('nprobe=16', 'efSearch=128'); one the index has not is an error naming it."""
    import faiss

    try:
        faiss.ParameterSpace().set_index_parameters(index, params)
    except RuntimeError as e:
        reason = str(e).strip().rsplit(":", 1)[-1].strip()  # FAISS's message ends with the reason
        raise Llama2VecError(f"{where or 'the index'}: --params {params!r} does not apply to this "
                             f"{type(faiss.downcast_index(index)).__name__}: {reason}") from None


def search_index(index, queries: np.ndarray, k: int, batch_size: int = 1024,
                 params: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Top-k (scores (Q, k), positions (Q, k)) in batches of queries; missing hits are -1.
    `params` sets search-time parameters, e.g. 'nprobe=16' (IVF) or 'efSearch=128' (HNSW)."""
    if params:
        set_params(index, params)
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


def index_parts(folder: str | Path) -> list[Path]:
    """The index folders a folder stands for: itself, or its parts (`index --parts`)."""
    from .store import read_json_or_none

    folder = Path(folder)
    meta = read_json_or_none(folder / "meta.json")
    if meta is None:
        raise Llama2VecError(f"{folder}: not an index folder (no meta.json)")
    return [folder / p for p in meta["parts"]] if "parts" in meta else [folder]


def search_parts(parts: Iterable[tuple[object, list[str], str]], queries: np.ndarray, k: int,
                 params: str | None = None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Search index parts (index, its ids, a name for errors) in turn and merge their top-k by score:
    (scores (Q, k), positions (Q, k) into the ids returned, every part's ids in order)."""
    results, all_ids, seen = [], [], {}
    for index, ids, name in parts:
        clash = [i for i in ids if i in seen]
        if clash:
            raise Llama2VecError(f"{name}: ids also in {seen[clash[0]]}: {', '.join(clash[:5])}: the index shards "
                                 f"must hold disjoint passages")
        seen.update(dict.fromkeys(ids, name))
        if params:
            set_params(index, params, name)
        s, i = search_index(index, queries, k)
        results.append((s, np.where(i >= 0, i + len(all_ids), -1)))
        all_ids.extend(ids)
    scores, found = merge_topk(results, k)
    return scores, found, all_ids


def index_model(folder: str | Path) -> tuple[str | None, int | None]:
    """(the identity of the model whose embeddings an index holds, their dimensions), from its meta.json."""
    from .store import read_json_or_none

    meta = read_json_or_none(Path(folder) / "meta.json") or {}
    return (meta.get("embeddings") or {}).get("model"), meta.get("dim")


def check_queries(folders: list[str | Path], model: str | None, dim: int, what: str, allow_mismatch: bool = False
                  ) -> None:
    """Refuse queries of `dim` dimensions encoded by `model` (an identity, see `store.model_identity`) against
    indexes of another model or width, naming both (`allow_mismatch`: the model check is skipped)."""
    for folder in folders:
        indexed, width = index_model(folder)
        if width is not None and width != dim:
            raise Llama2VecError(f"{what} are {dim}-dimension vectors; the index {folder} holds {width}-dimension "
                                 f"ones: encode both with the same model")
        if not allow_mismatch and indexed and model and indexed != model:
            raise Llama2VecError(f"{what} come from the model {model}, the index {folder} from {indexed}: scores "
                                 f"across two models mean nothing. Encode both with one model, or pass "
                                 f"--allow-model-mismatch if they do share an embedding space")


def search_shards(folders: list[str | Path], query_ids: list[str], queries: np.ndarray, k: int,
                  params: str | None = None, where: str | None = None) -> Run:
    """Search every index folder (one at a time, memory-mapped) and merge their top-k by score; LanceDB stores
    (`lance_store`) alike, with `where` filtering their fields and `params` 'nprobes=N'."""
    from .lance_store import is_store, search_store, store_nprobes

    stores = [is_store(f) for f in folders]
    if any(stores) and not all(stores):
        raise Llama2VecError("--index: give FAISS index folders or LanceDB stores, not both")
    if not all(stores):
        if where:
            raise Llama2VecError("--where filters the fields of a LanceDB store; a FAISS index folder has none")
        parts = ((*load_index(folder, mmap=True), folder) for f in folders for folder in index_parts(f))
        scores, found, ids = search_parts(parts, queries, k, params)
        return to_run(query_ids, ids, scores, found)
    nprobes = store_nprobes(params)
    run: Run = {q: {} for q in query_ids}
    for folder in folders:
        scores, hits = search_store(folder, queries, k, where, nprobes)
        for q, row_scores, row_ids in zip(query_ids, scores, hits):
            run[q].update(zip(row_ids, row_scores.tolist()))
    return {q: dict(sorted(docs.items(), key=lambda kv: -kv[1])[:k]) for q, docs in run.items()}


def exact_search(queries: np.ndarray, passages: np.ndarray, query_ids: list[str], doc_ids: list[str], k: int) -> Run:
    """Exact inner-product top-k as a run."""
    scores, found = search_index(build_index(passages, "Flat"), queries, k)
    return to_run(query_ids, doc_ids, scores, found)
