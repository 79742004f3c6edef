"""Model cards: every trained folder describes itself, its code runs, evaluations land in it."""

from __future__ import annotations

import json
import re

import numpy as np
from conftest import SENTENCES
from test_adapt import run

from llama2vec import Llama2Vec
from llama2vec.evaluate import evaluate


def python_blocks(card: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", card, re.S)


def test_an_adapted_folder_has_a_card_whose_plain_transformers_code_gives_our_embeddings(
        tiny_model_dir, tiny_corpus, tmp_path):
    (tiny_model_dir / "README.md").write_text("---\nlicense: mit\n---\n# tiny\n")
    out = tmp_path / "adapted"
    run(tiny_model_dir, tiny_corpus, out, "--max-steps", "2", "--full")
    card = (out / "README.md").read_text()
    assert "license: mit" in card and f"base_model: {tiny_model_dir}" in card
    assert "llama2vec adapt" in card and "2 steps in" in card and "EBAE + EBAR" in card
    assert "Not evaluated yet" in card
    assert "Pooling: mean" in card and "<s1> <s2>" in card
    # The card's plain-transformers code, run as printed, gives the embeddings llama2vec gives.
    plain = python_blocks(card)[2].replace('"' + str(out) + '"', repr(str(out)))
    scope: dict = {}
    exec(plain.replace("print(query @ passage)", ""), scope)
    model = Llama2Vec.from_pretrained(str(out), device="cpu")
    want_q = model.encode_queries(["who won the final?"])[0]
    want_p = model.encode_corpus(["The team won the final."])[0]
    assert np.abs(scope["query"].numpy() - want_q).max() <= 1e-5
    assert np.abs(scope["passage"].numpy() - want_p).max() <= 1e-5


def test_evaluate_records_its_figures_in_the_card(tiny_model_dir, tiny_corpus, tmp_path):
    out = tmp_path / "adapted"
    run(tiny_model_dir, tiny_corpus, out, "--max-steps", "1", "--full")
    beir = tmp_path / "beir"
    (beir / "qrels").mkdir(parents=True)
    (beir / "corpus.jsonl").write_text("".join(json.dumps({"_id": f"d{i}", "text": t}) + "\n"
                                               for i, t in enumerate(SENTENCES)))
    (beir / "queries.jsonl").write_text("".join(json.dumps({"_id": f"q{i}", "text": t[:20]}) + "\n"
                                                for i, t in enumerate(SENTENCES)))
    (beir / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(
        f"q{i}\td{i}\t1\n" for i in range(len(SENTENCES))))
    metrics = evaluate(model=str(out), dataset=str(beir), split="test", device="cpu")
    card = (out / "README.md").read_text()
    assert "Not evaluated yet" not in card
    row = next(line for line in card.splitlines() if line.startswith(f"| {beir} | test |"))
    assert f"{metrics['ndcg@10']:.4f}" in row
    assert json.loads((out / "evaluations.json").read_text())[0]["metrics"] == metrics
