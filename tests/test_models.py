"""Model loading, the bundled-model conversion, and placeholder tokens."""

from __future__ import annotations

import pytest
import torch
from conftest import make_model, make_tokenizer

import llama2vec.models as models
from llama2vec.config import ModelConfig, PromptConfig
from llama2vec.errors import Llama2VecError
from llama2vec.prompts import PromptSpec, prompt_ids, resolve_prompt


def test_placeholders_get_fresh_ids_and_mean_embeddings():
    tok = make_tokenizer()
    model = make_model(len(tok))
    old = model.get_input_embeddings().weight.detach().clone()
    spec = resolve_prompt(PromptConfig())
    ids = models.add_placeholder_tokens(tok, model, spec.new_tokens())
    assert ids == list(range(old.shape[0], old.shape[0] + 16))
    emb = model.get_input_embeddings().weight
    assert emb.shape[0] == len(tok) == old.shape[0] + 16
    torch.testing.assert_close(emb[ids], old.mean(0, keepdim=True).expand(16, -1))
    assert model.get_output_embeddings().weight.data_ptr() == emb.data_ptr()  # still tied
    assert tok.convert_ids_to_tokens(tok("x <s3>", add_special_tokens=False)["input_ids"])[-1] == "<s3>"
    # Adding them again changes nothing.
    assert models.add_placeholder_tokens(tok, model, spec.new_tokens()) == ids and emb.shape[0] == len(tok)


def test_custom_k_and_prompt_words():
    tok = make_tokenizer()
    model = make_model(len(tok))
    spec = resolve_prompt(PromptConfig(num_placeholders=3, self_suffix=" in short: ", pooling="last"))
    assert spec.self_tokens == ["<s1>", "<s2>", "<s3>"] and spec.next_tokens == ["<s4>", "<s5>", "<s6>"]
    models.add_placeholder_tokens(tok, model, spec.new_tokens())
    ids = prompt_ids(spec, tok)
    assert ids.k == 3 and ids.self_suffix[-3:] == tok.convert_tokens_to_ids(spec.self_tokens)
    assert tok.decode(ids.self_suffix[:-3]) == " in short: "
    assert ids.bos == [tok.bos_token_id]
    with pytest.raises(Llama2VecError, match="exactly one"):
        resolve_prompt(PromptConfig(prompt_preset="paper", num_placeholders=4))


def test_prompt_spec_round_trip(tmp_path):
    spec = resolve_prompt(PromptConfig(prompt_preset="paper"), max_length=96)
    spec.save(tmp_path)
    assert PromptSpec.load(tmp_path) == spec
    with pytest.raises(Llama2VecError, match="not a llama2vec model folder"):
        PromptSpec.load(tmp_path / "missing")


def test_missing_placeholder_is_reported():
    tok = make_tokenizer()
    with pytest.raises(Llama2VecError, match="placeholder '<s1>' is not in the tokenizer"):
        prompt_ids(resolve_prompt(PromptConfig()), tok)


def test_load_local_folder(tiny_model_dir):
    tok, model, device = models.load_causal_lm(ModelConfig(model=str(tiny_model_dir), device="cpu"))
    assert device.type == "cpu" and model.dtype == torch.float32 and not model.training
    assert tok.padding_side == "left" and tok.pad_token_id is not None
    assert models.resolve_model_path(str(tiny_model_dir)) == str(tiny_model_dir)
    assert models.resolve_model_path("org/name") == "org/name"  # a hub id goes to from_pretrained as is


def test_device_and_dtype_policy():
    assert models.resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert models.resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    if not torch.cuda.is_available():
        with pytest.raises(Llama2VecError, match="CUDA is not available"):
            models.resolve_device("cuda")


def test_conversion_is_atomic(tmp_path, monkeypatch):
    tok = make_tokenizer()

    def fake_dequantise(gguf):
        return tok, make_model(len(tok))

    monkeypatch.setattr(models, "_dequantise", fake_dequantise)
    target = tmp_path / "cache" / "model"

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(type(tok), "save_pretrained", killed)
    with pytest.raises(KeyboardInterrupt):
        models.convert_gguf(tmp_path / "x.gguf", target)
    assert not target.exists()  # nothing that looks complete
    monkeypatch.undo()
    monkeypatch.setattr(models, "_dequantise", fake_dequantise)
    assert models.convert_gguf(tmp_path / "x.gguf", target) == target
    assert (target / "config.json").is_file() and (target / "tokenizer.json").is_file()
    assert not list(target.parent.glob("model.tmp-*"))  # the killed run's leftovers are gone
    monkeypatch.setattr(models, "_dequantise", lambda g: pytest.fail("converted twice"))
    models.convert_gguf(tmp_path / "x.gguf", target)


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("LLAMA2VEC_CACHE", str(tmp_path / "c"))
    assert models.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("LLAMA2VEC_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert models.cache_dir() == tmp_path / "x" / "llama2vec"
