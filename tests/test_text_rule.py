"""One way from text to tokens (`prompts.text_rule`): every path that encodes a query or a passage cuts it to
the same limit, on the tokenizer's truncation side, and wraps it in the same prompt."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from conftest import SENTENCES, write_tiny_model

from llama2vec.cli import main
from llama2vec.config import PromptConfig
from llama2vec.embeddings import Job, encode_fingerprint, load_embeddings, prepare
from llama2vec.encoder import Llama2Vec, pool
from llama2vec.finetune import ContrastiveCollator
from llama2vec.formats import write_jsonl_rows
from llama2vec.losses import last_states, unwrap_lm
from llama2vec.models import save_model_folder
from llama2vec.prompts import text_rule

LONG = " ".join(SENTENCES * 3)  # hundreds of tokens: cut at both limits below
TEXTS = [LONG, "Paris. " + LONG, "short", SENTENCES[2]]


def max_diff(a, b) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float32) - np.asarray(b, dtype=np.float32)).max())


@pytest.fixture(scope="module")
def left_model(tmp_path_factory):
    """A llama2vec model folder whose tokenizer truncates on the left, whose queries take the SELF prompt
    and a limit of their own (10 tokens; passages 24)."""
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("left")
    base = write_tiny_model(root / "base")
    AutoTokenizer.from_pretrained(base, truncation_side="left").save_pretrained(base)
    encoder = Llama2Vec.from_pretrained(str(base), device="cpu", prompt=PromptConfig(query_prompt="self"),
                                        max_length=24)
    encoder.spec.query_max_length = 10
    folder = root / "model"
    folder.mkdir()
    save_model_folder(encoder.model, encoder.tokenizer, encoder.spec, folder)
    model = Llama2Vec.from_pretrained(str(folder), device="cpu")
    assert model.tokenizer.truncation_side == "left" and model.spec.query_task == "self"
    assert text_rule(model.spec, "query") == (10, "self") and text_rule(model.spec, "passage") == (24, "self")
    return folder, model


def test_the_rule_names_limit_and_prompt(left_model):
    _, model = left_model
    spec = model.spec
    assert text_rule(spec, "passage") == (spec.max_length, "self")
    spec.query_task, spec.query_max_length = "next", None
    try:
        assert text_rule(spec, "query") == (spec.max_length, "next")
    finally:
        spec.query_task, spec.query_max_length = "self", 10
    with pytest.raises(ValueError, match="unknown kind of text 'document'"):
        text_rule(spec, "document")


def test_every_path_cuts_and_prompts_alike(left_model, tmp_path):
    """The Python API, `llama2vec encode` (queries and corpus), a Ray actor's shards, the server, the
    fine-tuning collator and the model card's plain-transformers code give equal embeddings."""
    from test_serve import running, serve_app

    from llama2vec.card import write_card
    from llama2vec.ray_engine import ShardEncoder

    folder, model = left_model
    api = {"query": model.encode_queries(TEXTS), "passage": model.encode_corpus(TEXTS)}
    # The same text gives another embedding as a query (10 tokens kept) than as a passage (24): the limits differ.
    assert max_diff(api["query"][:2], api["passage"][:2]) > 1e-3

    rows = tmp_path / "texts.jsonl"
    write_jsonl_rows(rows, ({"_id": f"t{i}", "text": t} for i, t in enumerate(TEXTS)))
    for what, kind in (("queries", "query"), ("corpus", "passage")):
        out = tmp_path / f"emb-{what}"
        assert main(["encode", "--model", str(folder), "--input", str(rows), "--what", what, "--device", "cpu",
                     "--shard-size", "3", "--output", str(out)]) == 0
        ids, emb = load_embeddings(out)
        assert ids == [f"t{i}" for i in range(len(TEXTS))]
        assert max_diff(emb, api[kind]) <= 1e-5, what

        # A Ray actor (called here without Ray) encodes the shards of a folder planned as the driver plans it.
        from llama2vec.embeddings import FileSource

        source = FileSource(rows)
        fp = encode_fingerprint(str(folder), model.spec, "torch", source, kind, 3, "float32")
        job = prepare(tmp_path / f"ray-{what}", source, kind, "float32", fp, 3)
        assert isinstance(job, Job)
        actor = ShardEncoder(str(folder), "torch", 4, job)
        actor({"shard": np.arange(len(job.plan["shards"]))})
        from llama2vec.embeddings import merge

        _, ray_emb = load_embeddings(merge(job.output))
        assert max_diff(ray_emb, api[kind]) <= 1e-5, what

    with running(serve_app(folder, encoder=model, auto_truncate=True)) as url:
        import httpx

        for input_type, kind in (("query", "query"), ("document", "passage")):
            r = httpx.post(f"{url}/v1/embeddings", json={"input": TEXTS, "input_type": input_type}, timeout=60)
            assert r.status_code == 200, r.text
            served = [d["embedding"] for d in r.json()["data"]]
            assert max_diff(served, api[kind]) <= 1e-5, input_type

    # Fine-tuning trains on the inputs the encoder builds.
    collate = ContrastiveCollator(model.tokenizer, model.ids, model.spec)
    batch = collate([{"query": t, "passages": [t]} for t in TEXTS])
    lm = unwrap_lm(model.model)
    with torch.inference_mode():
        for side, kind in (("q", "query"), ("p", "passage")):
            states = last_states(lm, batch[f"{side}_input_ids"], batch[f"{side}_position_ids"],
                                 batch[f"{side}_attention_mask"], model.ids.k)
            assert max_diff(pool(states, model.spec.pooling).numpy(), api[kind]) <= 1e-5, kind

    # The card's code, run as printed on a long text.
    write_card(folder)
    code = re.findall(r"```python\n(.*?)```", (folder / "README.md").read_text(), re.S)[2]
    code = code.replace(f'"{folder}"', repr(str(folder))).replace("print(query @ passage)", "")
    scope: dict = {}
    exec(code.replace("'who won the final?'", repr(LONG)).replace("'The team won the final.'", repr(LONG)), scope)
    assert max_diff(scope["query"].numpy(), api["query"][0]) <= 1e-5
    assert max_diff(scope["passage"].numpy(), api["passage"][0]) <= 1e-5

    # The side matters for these texts: cut on the right, the embeddings differ.
    model.tokenizer.truncation_side = "right"
    try:
        assert max_diff(model.encode_corpus(TEXTS)[:2], api["passage"][:2]) > 1e-3
    finally:
        model.tokenizer.truncation_side = "left"


@pytest.mark.slow
def test_the_sentence_transformers_module_keeps_an_equal_copy_of_the_rule(left_model, tmp_path):
    """The exported module (which cannot import llama2vec) cuts on the tokenizer's side and to the same limits."""
    from test_st_export import encode_without_llama2vec

    from llama2vec.st_export import export_sentence_transformers

    folder, model = left_model
    st = export_sentence_transformers(str(folder), tmp_path / "st")
    got = encode_without_llama2vec({"left": st}, TEXTS, TEXTS, [2], tmp_path)
    assert max_diff(got["left/query/2"], model.encode_queries(TEXTS)) <= 1e-5
    assert max_diff(got["left/document/2"], model.encode_corpus(TEXTS)) <= 1e-5
