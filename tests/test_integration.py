"""The real bundled SmolLM2-135M (converted once into the user cache) and the real Wikipedia sample."""

from __future__ import annotations

import math

import pytest
import torch

from llama2vec.collate import PretextCollator, excluded_target_ids, joint_inputs, single_inputs
from llama2vec.config import ModelConfig, PromptConfig
from llama2vec.data import chunk_ids, wiki_documents
from llama2vec.losses import PretextModel, PretextWeights, additive_mask, decoder_states
from llama2vec.models import add_placeholder_tokens, load_causal_lm
from llama2vec.prompts import prompt_ids, resolve_prompt

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def smollm2():
    tok, model, _ = load_causal_lm(ModelConfig(model="smollm2", device="cpu"))
    return tok, model


def test_bundled_model_loads_and_speaks(smollm2):
    tok, model = smollm2
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert tok.bos_token == "<|im_start|>" and tok.eos_token == "<|im_end|>"
    ids = tok("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=2, do_sample=False)
    assert tok.decode(out[0, ids.shape[1]:]) == " Paris."


def test_placeholders_and_one_adaptation_step_on_wikipedia(smollm2):
    tok, model = smollm2
    vocab = len(tok)
    spec = resolve_prompt(PromptConfig())
    new_ids = add_placeholder_tokens(tok, model, spec.new_tokens())
    assert new_ids == list(range(vocab, vocab + 16))
    assert model.get_input_embeddings().weight.shape[0] == vocab + 16
    ids = prompt_ids(spec, tok)
    assert ids.bos == [tok.bos_token_id] and ids.self_suffix[-8:] == new_ids[:8]

    doc = next(wiki_documents())
    chunks = chunk_ids(doc.text, tok, 64)
    pairs = [{"text": chunks[i], "next": chunks[i + 1]} for i in range(2)]
    texts = [p["text"] for p in pairs]
    with torch.no_grad():  # the joint pass matches two passes on the real model too
        j = joint_inputs(texts, ids, tok.pad_token_id)
        h = decoder_states(model, j["input_ids"], j["position_ids"], additive_mask(j["allowed"], torch.float32))
        s = single_inputs(texts, ids, tok.pad_token_id, "next")
        hn = decoder_states(model, s["input_ids"], s["position_ids"], s["attention_mask"])
    torch.testing.assert_close(h[:, j["next_positions"]], hn[:, s["positions"]], atol=1e-4, rtol=1e-4)

    batch = PretextCollator(ids, tok.pad_token_id, excluded_target_ids(tok, ids), 64)(pairs)
    model.train()
    module = PretextModel(model, PretextWeights())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    before = model.model.layers[0].mlp.down_proj.weight.detach().clone()
    out = module(**batch)
    out["loss"].backward()
    opt.step()
    model.eval()
    assert math.isfinite(out["ebae"].item()) and math.isfinite(out["ebar"].item())
    assert 5 < out["ebae"].item() < math.log(vocab) + 5
    assert not torch.equal(before, model.model.layers[0].mlp.down_proj.weight)
