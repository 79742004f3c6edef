"""The joint EBAE + EBAR pass equals two separate passes, in outputs and in gradients."""

from __future__ import annotations

import pytest
import torch
from conftest import make_model, make_tokenizer

from llama2vec.collate import PretextCollator, excluded_target_ids, joint_inputs, single_inputs
from llama2vec.config import PromptConfig
from llama2vec.losses import PretextModel, PretextWeights, additive_mask, decoder_states
from llama2vec.models import add_placeholder_tokens
from llama2vec.prompts import prompt_ids, resolve_prompt

TEXTS = ["The cat sat on the mat.", "Dense retrieval maps queries and passages to vectors, said the team.", "Paris"]


def setup(arch: str = "llama", attn: str = "sdpa", preset: str = "llara"):
    tok = make_tokenizer()
    model = make_model(len(tok), arch=arch, attn=attn)
    spec = resolve_prompt(PromptConfig(prompt_preset=preset))
    add_placeholder_tokens(tok, model, spec.new_tokens())
    ids = prompt_ids(spec, tok)
    texts = [tok(t, add_special_tokens=False)["input_ids"] for t in TEXTS]
    return tok, model, ids, texts


def two_pass_states(model, ids, texts, pad_id):
    out = {}
    for task in ("self", "next"):
        b = single_inputs(texts, ids, pad_id, task)
        h = decoder_states(model, b["input_ids"], b["position_ids"], b["attention_mask"])
        out[task] = h[:, b["positions"]]  # (B, K, H)
    return out


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "gpt2", "gpt_neox"])
def test_joint_pass_equals_two_passes(arch, attn):
    tok, model, ids, texts = setup(arch, attn)
    assert len({len(t) for t in texts}) == 3  # different lengths: real left padding
    with torch.no_grad():
        j = joint_inputs(texts, ids, tok.pad_token_id)
        h = decoder_states(model, j["input_ids"], j["position_ids"], additive_mask(j["allowed"], torch.float32))
        ref = two_pass_states(model, ids, texts, tok.pad_token_id)
    assert j["input_ids"][0, 0] == tok.pad_token_id  # the first row is padded on the left
    torch.testing.assert_close(h[:, j["self_positions"]], ref["self"], atol=1e-5, rtol=0)
    torch.testing.assert_close(h[:, j["next_positions"]], ref["next"], atol=1e-5, rtol=0)


def test_paper_preset_joint_pass_uses_eos():
    tok, model, ids, texts = setup(preset="paper")
    assert ids.k == 1 and ids.self_suffix[-1] == tok.eos_token_id == ids.next_suffix[-1]
    with torch.no_grad():
        j = joint_inputs(texts, ids, tok.pad_token_id)
        h = decoder_states(model, j["input_ids"], j["position_ids"], additive_mask(j["allowed"], torch.float32))
        ref = two_pass_states(model, ids, texts, tok.pad_token_id)
    torch.testing.assert_close(h[:, j["self_positions"]], ref["self"], atol=1e-5, rtol=0)
    torch.testing.assert_close(h[:, j["next_positions"]], ref["next"], atol=1e-5, rtol=0)


def test_next_suffix_cannot_change_self_outputs():
    tok, model, ids, texts = setup()
    other = prompt_ids(resolve_prompt(PromptConfig(next_suffix=" something else entirely follows: ")), tok)
    assert other.next_suffix != ids.next_suffix
    with torch.no_grad():
        outs = []
        for p in (ids, other):
            j = joint_inputs(texts, p, tok.pad_token_id)
            h = decoder_states(model, j["input_ids"], j["position_ids"], additive_mask(j["allowed"], torch.float32))
            outs.append(h[:, j["self_positions"]])
    torch.testing.assert_close(outs[0], outs[1], atol=1e-6, rtol=0)


def test_joint_mask_blocks_next_to_self_and_padding():
    tok, _, ids, texts = setup()
    j = joint_inputs(texts, ids, tok.pad_token_id)
    allowed, L = j["allowed"], j["input_ids"].shape[1]
    s0 = int(j["text_length"])
    n0 = s0 + len(ids.self_suffix)
    assert not allowed[:, n0:, s0:n0].any()  # NEXT never sees SELF
    assert allowed[:, n0:, n0:].any() and allowed[:, s0:n0, :s0].any()
    pad_cols = j["input_ids"][0] == tok.pad_token_id
    assert not allowed[0, n0:, pad_cols].any()  # real rows never see padding
    # NEXT positions restart where SELF positions start.
    assert torch.equal(j["position_ids"][:, s0], j["position_ids"][:, n0])
    assert j["next_positions"].tolist() == list(range(L - ids.k, L))


@pytest.mark.parametrize("lm_weight", [0.0, 0.5])
def test_joint_loss_gradients_equal_two_pass_gradients(lm_weight):
    tok, model, ids, texts = setup(attn="eager")
    excluded = excluded_target_ids(tok, ids)
    examples = [{"text": t, "next": texts[(i + 1) % len(texts)]} for i, t in enumerate(texts)]
    grads, losses = [], []
    for joint in (True, False):
        collate = PretextCollator(ids, tok.pad_token_id, excluded, max_length=64, joint=joint, lm=lm_weight > 0)
        module = PretextModel(model, PretextWeights(1.0, 0.7, lm_weight))
        model.zero_grad()
        out = module(**collate(examples))
        out["loss"].backward()
        losses.append({k: float(v.detach()) for k, v in out.items()})
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert losses[0].keys() == losses[1].keys()
    for k in losses[0]:
        assert losses[0][k] == pytest.approx(losses[1][k], abs=1e-5)
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-5, rtol=1e-4)
