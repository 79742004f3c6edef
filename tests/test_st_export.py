"""`llama2vec export --format sentence-transformers`: the folder opens in sentence-transformers without
llama2vec, and encode_query / encode_document equal Llama2Vec.encode_queries / encode_corpus."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import SENTENCES, make_model, make_tokenizer

from llama2vec.cli import main
from llama2vec.config import PromptConfig
from llama2vec.encoder import Llama2Vec
from llama2vec.formats import passage_text
from llama2vec.models import save_model_folder
from llama2vec.st_export import MODULE_FILE, export_sentence_transformers

TOLERANCE = 1e-5

# Runs in a fresh interpreter where llama2vec cannot be imported: the folder must stand on its own.
ENCODE_WITHOUT_LLAMA2VEC = r"""
import json, sys
sys.modules["llama2vec"] = None  # any `import llama2vec...` now raises ImportError
import numpy as np
from sentence_transformers import SentenceTransformer

job = json.loads(open(sys.argv[1]).read())
out = {}
for name, folder in job["folders"].items():
    model = SentenceTransformer(folder, trust_remote_code=True, device="cpu")
    assert model.similarity_fn_name == "cosine"
    out[f"{name}/dim"] = np.array(model.get_embedding_dimension())
    for bs in job["batch_sizes"]:
        out[f"{name}/query/{bs}"] = model.encode_query(job["queries"], batch_size=bs)
        out[f"{name}/document/{bs}"] = model.encode_document(job["documents"], batch_size=bs)
    if job["resave"]:  # saved again by sentence-transformers, it still encodes the same
        model.save(f"{folder}-resaved")
        again = SentenceTransformer(f"{folder}-resaved", trust_remote_code=True, device="cpu")
        out[f"{name}/resaved/query"] = again.encode_query(job["queries"])
        out[f"{name}/resaved/document"] = again.encode_document(job["documents"])
loaded = sorted(m for m, v in sys.modules.items() if v is not None and m.split(".")[0] == "llama2vec")
assert not loaded, loaded
np.savez(sys.argv[2], **out)
"""


def encode_without_llama2vec(folders: dict[str, Path], queries: list[str], documents: list[str],
                             batch_sizes: list[int], tmp_path: Path, resave: bool = False) -> dict[str, np.ndarray]:
    """The embeddings of each exported folder, computed by sentence-transformers in a subprocess that
    cannot import llama2vec and has no network (`resave`: also after a save and load by
    sentence-transformers)."""
    job, out = tmp_path / "job.json", tmp_path / "out.npz"
    job.write_text(json.dumps({"folders": {k: str(v) for k, v in folders.items()}, "queries": queries,
                               "documents": documents, "batch_sizes": batch_sizes, "resave": resave}))
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"),
               TOKENIZERS_PARALLELISM="false")
    done = subprocess.run([sys.executable, "-c", ENCODE_WITHOUT_LLAMA2VEC, str(job), str(out)], env=env,
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    with np.load(out) as data:
        return {k: data[k] for k in data.files}


def assert_same(got: np.ndarray, want: np.ndarray) -> None:
    assert got.shape == want.shape and got.dtype == np.float32
    assert np.abs(got - want).max() <= TOLERANCE, np.abs(got - want).max()


LONG = " ".join(SENTENCES * 3)  # hundreds of tokens: cut at every length limit below
QUERIES = ["cats", SENTENCES[0], LONG, "Who won the final?", SENTENCES[3] + " " + SENTENCES[4]]
PASSAGES = [{"title": "Sport", "text": SENTENCES[5]}, {"title": "", "text": "Short."},
            {"title": "Everything", "text": LONG}, {"text": SENTENCES[2]}, {"title": "Markets", "text": SENTENCES[4]}]


def paper_folder(tiny_model_dir: Path, folder: Path) -> Path:
    """A llama2vec model folder with the paper prompt (K = 1, the EOS state) and short length limits
    (12 tokens of T for passages, 6 for queries)."""
    encoder = Llama2Vec.from_pretrained(str(tiny_model_dir), device="cpu", prompt=PromptConfig(prompt_preset="paper"),
                                        max_length=12)
    encoder.spec.query_max_length = 6
    folder.mkdir()
    save_model_folder(encoder.model, encoder.tokenizer, encoder.spec, folder)
    return folder


def gpt2_folder(folder: Path) -> Path:
    """A tiny random GPT-2: absolute position embeddings, so padding must not shift positions."""
    tokenizer = make_tokenizer()
    make_model(len(tokenizer), arch="gpt2").save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.slow
def test_export_equals_llama2vec_without_llama2vec_installed(tiny_model_dir, tmp_path):
    models = {"llara": str(tiny_model_dir), "paper": str(paper_folder(tiny_model_dir, tmp_path / "paper")),
              "gpt2": str(gpt2_folder(tmp_path / "gpt2"))}
    folders = {name: export_sentence_transformers(m, tmp_path / f"st-{name}") for name, m in models.items()}
    documents = [passage_text(p) for p in PASSAGES]
    got = encode_without_llama2vec(folders, QUERIES, documents, [1, 2, 16], tmp_path, resave=True)

    for name, model in models.items():
        encoder = Llama2Vec.from_pretrained(model, device="cpu")
        want_q, want_d = encoder.encode_queries(QUERIES), encoder.encode_corpus(PASSAGES)
        assert int(got[f"{name}/dim"]) == encoder.dim
        for bs in (1, 2, 16):  # one text a batch, pairs of mixed lengths (padding), everything at once
            assert_same(got[f"{name}/query/{bs}"], want_q)
            assert_same(got[f"{name}/document/{bs}"], want_d)
        assert_same(got[f"{name}/resaved/query"], want_q)
        assert_same(got[f"{name}/resaved/document"], want_d)
        # The tolerance tells the two prompts apart: a text's query and passage embeddings differ by far more.
        as_passages = encoder.encode_corpus(QUERIES)
        assert np.abs(as_passages - want_q).max() > 100 * TOLERANCE


def test_cli_export_and_errors(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "st"
    argv = ["export", "--model", str(tiny_model_dir), "--format", "sentence-transformers", "--output", str(out)]
    assert main(argv) == 0
    assert "trust_remote_code=True" in capsys.readouterr().out
    for name in ("modules.json", "config_sentence_transformers.json", "sentence_bert_config.json", MODULE_FILE,
                 "1_Pooling/config.json", "2_Normalize/config.json", "config.json", "tokenizer.json",
                 "llama2vec_config.json"):
        assert (out / name).is_file(), name
    tree = ast.parse((out / MODULE_FILE).read_text())  # the module file stands without llama2vec
    imports = [n for n in ast.walk(tree) if isinstance(n, ast.Import | ast.ImportFrom)]
    names = [a.name for n in imports if isinstance(n, ast.Import) for a in n.names]
    names += [n.module or "" for n in imports if isinstance(n, ast.ImportFrom) and not n.level]
    assert not any(n.split(".")[0] == "llama2vec" for n in names) and not any(getattr(n, "level", 0) for n in imports)
    pooling = json.loads((out / "1_Pooling" / "config.json").read_text())
    assert pooling == {"num_placeholders": 8, "pooling": "mean"}
    card = (out / "README.md").read_text()  # a model card, as in every folder llama2vec writes
    assert f"A sentence-transformers export of `{tiny_model_dir}`" in card and "trust_remote_code=True" in card
    # The folder is a llama2vec model folder too, encoding as the model it came from.
    a, b = (Llama2Vec.from_pretrained(str(m), device="cpu") for m in (tiny_model_dir, out))
    assert np.abs(a.encode_queries(QUERIES) - b.encode_queries(QUERIES)).max() <= TOLERANCE
    assert main(argv) == 0  # an earlier export is replaced
    capsys.readouterr()

    missing = tmp_path / "missing"
    assert main(["export", "--model", str(missing), "--output", str(tmp_path / "x")]) == 2
    assert capsys.readouterr().err == f"llama2vec: error: model folder not found: {missing}\n"
    assert not (tmp_path / "x").exists()
    assert main(["export", "--model", str(tiny_model_dir), "--output", str(tiny_model_dir)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"llama2vec: error: {tiny_model_dir}: exists and is not a sentence-transformers export")
    assert (tiny_model_dir / "config.json").is_file()


BBC_QUERIES = ["Shares slide as interest rates rise", "Striker scores twice in cup final",
               "New album tops the music charts", "Government unveils budget plans"]
BBC_PASSAGES = [
    {"title": "", "text": "Stock markets fell sharply on Monday as investors worried that the central bank "
                          "would raise interest rates again to curb inflation."},
    {"title": "", "text": "The striker scored two goals in the second half to win the cup final for his club "
                          "in front of a sell-out crowd."},
    {"title": "", "text": "The band's new album went straight to number one in the charts, selling more copies "
                          "in its first week than any record this year."},
    {"title": "", "text": "The chancellor set out the budget, with tax changes and new spending on schools and "
                          "hospitals, in a speech to parliament."},
    {"title": "Weather", "text": "Heavy snow closed roads across the north of the country overnight."},
]


@pytest.mark.slow
@pytest.mark.integration
def test_bundled_smollm2_export(tmp_path):
    folder = export_sentence_transformers("smollm2", tmp_path / "st")
    documents = [passage_text(p) for p in BBC_PASSAGES]
    got = encode_without_llama2vec({"smollm2": folder}, BBC_QUERIES, documents, [1, 8], tmp_path)
    encoder = Llama2Vec.from_pretrained("smollm2", device="cpu")
    want_q, want_d = encoder.encode_queries(BBC_QUERIES), encoder.encode_corpus(BBC_PASSAGES)
    for bs in (1, 8):
        assert_same(got[f"smollm2/query/{bs}"], want_q)
        assert_same(got[f"smollm2/document/{bs}"], want_d)
        scores = got[f"smollm2/query/{bs}"] @ got[f"smollm2/document/{bs}"].T
        assert (scores.argmax(axis=1) == (want_q @ want_d.T).argmax(axis=1)).all()  # the same nearest passages
