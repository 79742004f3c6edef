"""`Llama2Vec` under MTEB 2.x (the optional extra `mteb`): a local BEIR folder run as an MTEB retrieval
task scores as `llama2vec evaluate` does, and `encode` embeds MTEB's query and document batches as
`encode_queries` and `encode_corpus` do. Nothing is read from the hub."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import SENTENCES

from llama2vec.encoder import Llama2Vec
from llama2vec.evaluate import evaluate
from llama2vec.formats import read_beir

mteb = pytest.importorskip("mteb")


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    import datasets.config
    import huggingface_hub.constants

    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(var, "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read once, at import
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("MTEB_CACHE", str(tmp_path / "mteb-cache"))


def write_beir_folder(folder: Path) -> Path:
    """20 passages (every other one with a title), 8 queries with one or two relevant passages each."""
    (folder / "qrels").mkdir(parents=True)
    docs = [{"_id": f"d{i}", "title": f"Story {i}" if i % 2 else "",
             "text": " ".join(SENTENCES[(i + j) % len(SENTENCES)] for j in range(1 + i % 3))} for i in range(20)]
    queries = [{"_id": f"q{i}", "text": SENTENCES[i].split(",")[0].split(".")[0]} for i in range(8)]
    (folder / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (folder / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries))
    rows = [f"q{i}\td{i}\t1" for i in range(8)] + [f"q{i}\td{i + 8}\t1" for i in range(0, 8, 2)]
    (folder / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + "\n".join(rows) + "\n")
    return folder


def beir_task(folder: Path, split: str = "test"):
    """An MTEB retrieval task whose data is the BEIR folder's split (set in `load_data`, as MTEB's own
    mock tasks do, so nothing is downloaded)."""
    from datasets import Dataset
    from mteb.abstasks.retrieval import AbsTaskRetrieval
    from mteb.abstasks.retrieval_dataset_loaders import RetrievalSplitData
    from mteb.abstasks.task_metadata import TaskMetadata

    data = read_beir(folder, split)

    class LocalBeir(AbsTaskRetrieval):
        metadata = TaskMetadata(
            name="LocalBeir", description="A local BEIR folder.", reference=None,
            dataset={"path": str(folder), "revision": "local"}, type="Retrieval", category="t2t",
            modalities=["text"], eval_splits=[split], eval_langs=["eng-Latn"], main_score="ndcg_at_10",
            date=None, domains=None, task_subtypes=None, license=None, annotations_creators=None, dialect=None,
            sample_creation=None, bibtex_citation=None)

        def load_data(self, num_proc: int | None = None, **kwargs) -> None:
            self.dataset = {"default": {split: RetrievalSplitData(
                corpus=Dataset.from_list([{"id": d, **doc} for d, doc in data.corpus.items()]),
                queries=Dataset.from_list([{"id": q, "text": t} for q, t in data.queries.items()]),
                relevant_docs=data.qrels, top_ranked=None)}}
            self.data_loaded = True

    return LocalBeir()


def test_mteb_ndcg_equals_llama2vec_evaluate(tiny_model_dir, tmp_path):
    folder = write_beir_folder(tmp_path / "beir")
    ours = evaluate(model=str(tiny_model_dir), dataset=str(folder), split="test", device="cpu")

    model = Llama2Vec.from_pretrained(str(tiny_model_dir), device="cpu", dtype="float32")
    result = mteb.evaluate(model, tasks=[beir_task(folder)], cache=mteb.ResultCache(tmp_path / "mteb"),
                           co2_tracker=False, encode_kwargs={"batch_size": 16}, show_progress_bar=False)
    scores = result.task_results[0].scores["test"][0]
    assert 0 < ours["ndcg@10"] < 1
    assert scores["ndcg_at_10"] == pytest.approx(ours["ndcg@10"], abs=1e-3)
    assert scores["mrr_at_10"] == pytest.approx(ours["mrr@10"], abs=1e-3)
    meta = model.mteb_model_meta
    assert meta.name == f"llama2vec/{Path(tiny_model_dir).name}" and meta.embed_dim == model.dim
    assert list((tmp_path / "mteb").rglob("LocalBeir.json"))  # results were cached under tmp_path


def test_encode_matches_encode_queries_and_encode_corpus(tiny_model_dir, tmp_path):
    from mteb._create_dataloaders import create_dataloader
    from mteb.types import PromptType

    folder = write_beir_folder(tmp_path / "beir")
    task = beir_task(folder)
    task.load_data()
    split = task.dataset["default"]["test"]
    model = Llama2Vec.from_pretrained(str(tiny_model_dir), device="cpu", dtype="float32")
    data = read_beir(folder, "test")

    def mteb_encode(dataset, prompt_type):
        loader = create_dataloader(dataset, task_metadata=task.metadata, prompt_type=prompt_type, batch_size=3)
        return model.encode(loader, task_metadata=task.metadata, hf_split="test", hf_subset="default",
                            prompt_type=prompt_type, batch_size=4)

    queries = mteb_encode(split["queries"], PromptType.query)
    docs = mteb_encode(split["corpus"], PromptType.document)
    assert queries.shape == (len(data.queries), model.dim) and docs.shape == (len(data.corpus), model.dim)
    assert np.abs(queries - model.encode_queries(list(data.queries.values()))).max() <= 1e-5
    assert np.abs(docs - model.encode_corpus(list(data.corpus.values()))).max() <= 1e-5
