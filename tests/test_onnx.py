"""The encoding backends: the ONNX float32 export equals torch, int8 and bfloat16 stay close, exports are cached."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import make_model, make_tokenizer

from llama2vec import onnx_int8
from llama2vec.encoder import Llama2Vec
from llama2vec.errors import Llama2VecError

TEXTS = ["the cat sat on the mat", "a team won the final in the last minute of the game", "rain", "paris is a city"]


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    """(model folder, cache folder, {backend: encoder}): each export is made once for the module."""
    folder, cache = tmp_path_factory.mktemp("tiny-llama"), tmp_path_factory.mktemp("cache")
    tok = make_tokenizer()
    make_model(len(tok)).save_pretrained(folder)
    tok.save_pretrained(folder)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LLAMA2VEC_CACHE", str(cache))
        yield folder, cache, {b: Llama2Vec.from_pretrained(str(folder), device="cpu", backend=b, batch_size=3)
                              for b in ("torch", "onnx", "onnx-int8")}


def test_onnx_float32_export_equals_torch(encoders):
    _, _, enc = encoders
    assert enc["onnx"].onnx is not None and enc["torch"].onnx is None
    # Rows of different lengths in one batch: the export must keep padding and positions right.
    np.testing.assert_allclose(enc["onnx"].encode_corpus(TEXTS), enc["torch"].encode_corpus(TEXTS), atol=1e-5)
    np.testing.assert_allclose(enc["onnx"].encode_queries(TEXTS), enc["torch"].encode_queries(TEXTS), atol=1e-5)


def test_int8_backend_is_close_to_float32(encoders):
    _, _, enc = encoders
    reference, int8 = enc["torch"].encode_corpus(TEXTS), enc["onnx-int8"].encode_corpus(TEXTS)
    np.testing.assert_allclose(np.linalg.norm(int8, axis=1), 1.0, atol=1e-5)
    cosine = (int8 * reference).sum(axis=1)
    assert cosine.min() > 0.99, cosine
    assert not np.allclose(int8, reference, atol=1e-6)  # it did run in reduced precision
    # Same nearest neighbours among the texts.
    assert ((int8 @ int8.T).argsort(1)[:, -2] == (reference @ reference.T).argsort(1)[:, -2]).all()


def test_exports_are_cached(encoders, monkeypatch):
    folder, cache, enc = encoders
    assert len(list(cache.glob("onnx/*/model.onnx"))) == 2  # float32 and int8
    monkeypatch.setattr(onnx_int8, "export", lambda *a, **k: pytest.fail("exported twice"))
    again = Llama2Vec.from_pretrained(str(folder), backend="onnx-int8").encode_corpus(TEXTS)
    np.testing.assert_allclose(again, enc["onnx-int8"].encode_corpus(TEXTS), atol=1e-6)


def test_quantised_nodes_are_the_linear_layers(encoders):
    _, _, enc = encoders
    layers = enc["torch"].model.config.num_hidden_layers
    assert len(onnx_int8.weight_matmuls(enc["onnx"].onnx.path)) == 7 * layers  # q, k, v, o, gate, up, down
    import onnx

    ops = [n.op_type for n in onnx.load(str(enc["onnx-int8"].onnx.path)).graph.node]
    assert ops.count("MatMulNBits") == 7 * layers


def test_bfloat16_backend_is_close_to_float32(encoders):
    folder, _, enc = encoders
    bf16 = Llama2Vec.from_pretrained(str(folder), device="cpu", backend="torch-bfloat16", batch_size=3)
    assert bf16.model.dtype == torch.bfloat16 and enc["torch"].model.dtype == torch.float32
    reference, emb = enc["torch"].encode_corpus(TEXTS), bf16.encode_corpus(TEXTS)
    assert emb.dtype == np.float32 and (reference * emb).sum(1).min() > 0.99
    assert ((emb @ emb.T).argsort(1)[:, -2] == (reference @ reference.T).argsort(1)[:, -2]).all()


def test_unknown_backend_is_named(tmp_path):
    with pytest.raises(Llama2VecError, match="unknown backend 'tensorrt'"):
        Llama2Vec.from_pretrained(str(tmp_path), backend="tensorrt")


@pytest.mark.slow
def test_compiled_backend_equals_torch_without_recompiling(encoders):
    folder, _, enc = encoders
    compiled = Llama2Vec.from_pretrained(str(folder), device="cpu", backend="torch-compile", batch_size=3)
    assert compiled.states_fn is not None and enc["torch"].states_fn is None
    texts = TEXTS + [t.upper() for t in TEXTS]
    np.testing.assert_allclose(compiled.encode_corpus(texts), enc["torch"].encode_corpus(texts), atol=1e-5)
    # Other batch sizes (one row included) and lengths reuse the one compiled graph.
    with torch._dynamo.config.patch(error_on_recompile=True):
        for some in (texts[:1], texts[2:7], texts[:2]):
            np.testing.assert_allclose(compiled.encode_queries(some), enc["torch"].encode_queries(some), atol=1e-5)


def test_compiled_backend_needs_a_compiler(tiny_model_dir, monkeypatch):
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr("shutil.which", lambda name: None)
    with pytest.raises(Llama2VecError, match="needs a C.. compiler"):
        Llama2Vec.from_pretrained(str(tiny_model_dir), device="cpu", backend="torch-compile")


def test_an_export_made_from_another_model_is_made_again(encoders, monkeypatch):
    folder, cache, enc = encoders
    records = sorted(cache.glob("onnx/*/fingerprint.json"))
    assert len(records) == 2
    record = json.loads(records[0].read_text())
    assert record["model"].startswith("folder:") and record["k"] == enc["torch"].ids.k
    model_file = records[0].parent / "model.onnx"
    original = model_file.read_bytes()
    records[0].write_text(json.dumps({**record, "model": "folder:another"}))  # as if the folder had changed
    calls = []

    def export(decoder, k, pad_id, output, quantise=True):
        calls.append(output)
        output.write_bytes(original)

    monkeypatch.setattr(onnx_int8, "export", export)
    quantise = record["quantise"]
    Llama2Vec.from_pretrained(str(folder), backend="onnx-int8" if quantise else "onnx")
    assert calls == [model_file] and json.loads(records[0].read_text()) == record
