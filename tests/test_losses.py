"""The bag-of-words loss against hand computations, and which tokens may be targets."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_model, make_tokenizer, pretext_setup

from llama2vec.collate import excluded_target_ids, target_sets
from llama2vec.config import PromptConfig
from llama2vec.losses import PretextModel, PretextWeights, bow_loss
from llama2vec.models import add_placeholder_tokens
from llama2vec.prompts import prompt_ids, resolve_prompt


def test_bow_loss_by_hand():
    # Two placeholder positions over a vocabulary of 4; max-pooling picks [2, 1, 0, 0].
    logits = torch.tensor([[[2.0, 0.0, -1.0, 0.0], [0.0, 1.0, 0.0, -3.0]]])  # (1, 2, 4)
    targets, mask = target_sets([[1, 3, 1, 3, 1]], excluded=set())  # repeated ids count once
    assert targets.tolist() == [[1, 3]]
    z = [2.0, 1.0, 0.0, 0.0]
    log_norm = math.log(sum(math.exp(v) for v in z))
    expected = -((z[1] - log_norm) + (z[3] - log_norm)) / 2
    assert bow_loss(logits, targets, mask).item() == pytest.approx(expected, abs=1e-6)


def test_bow_loss_single_position_and_padding_targets():
    logits = torch.tensor([[[0.0, 1.0, 2.0]], [[3.0, 0.0, 0.0]]])  # (2, 1, 3): K = 1
    targets, mask = target_sets([[2], [0, 1]], excluded=set())
    assert mask.tolist() == [[True, False], [True, True]]
    logp = logits[:, 0].log_softmax(-1)
    expected = torch.stack([-logp[0, 2], -(logp[1, 0] + logp[1, 1]) / 2])
    torch.testing.assert_close(bow_loss(logits, targets, mask), expected)


def test_special_tokens_and_placeholders_are_never_targets():
    tok = make_tokenizer()
    model = make_model(len(tok))
    spec = resolve_prompt(PromptConfig())
    placeholder_ids = add_placeholder_tokens(tok, model, spec.new_tokens())
    ids = prompt_ids(spec, tok)
    excluded = excluded_target_ids(tok, ids)
    for special in (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id, *placeholder_ids):
        assert special in excluded
    text = [tok.bos_token_id, 7, 7, placeholder_ids[0], tok.eos_token_id, 9]
    targets, mask = target_sets([text], excluded)
    assert targets[mask].tolist() == [7, 9]


def test_stopword_filter_drops_stopwords_and_punctuation_only():
    tok = make_tokenizer()
    spec = resolve_prompt(PromptConfig(prompt_preset="paper"))
    ids = prompt_ids(spec, tok)
    plain = excluded_target_ids(tok, ids)
    filtered = excluded_target_ids(tok, ids, stopwords=True)
    (the,), (comma,), (cat,) = (tok(w, add_special_tokens=False)["input_ids"] for w in (" the", ",", " capital"))
    assert the in filtered and comma in filtered and cat not in filtered
    assert the not in plain and plain < filtered


def test_pretext_model_reports_parts_and_weights():
    model, batch = pretext_setup(("a cat sat", "the team won the final"))
    tok_size = model.get_input_embeddings().weight.shape[0]
    with torch.no_grad():
        out = PretextModel(model, PretextWeights(0.05, 0.05, 0.0))(**batch)
    assert set(out) == {"loss", "ebae", "ebar"}
    assert out["loss"].item() == pytest.approx(0.05 * out["ebae"].item() + 0.05 * out["ebar"].item(), rel=1e-6)
    # A random model is near-uniform over the vocabulary: loss ~ log |V|.
    assert out["ebae"].item() == pytest.approx(math.log(tok_size), rel=0.05)


@pytest.mark.parametrize("lm_weight", [0.0, 0.5])
def test_placeholder_logits_equal_logits_everywhere(lm_weight):
    """The fast path (logits only where a loss reads them) gives the plain path's losses and gradients."""
    from llama2vec.collate import PretextCollator, excluded_target_ids
    from llama2vec.prompts import prompt_ids

    tok = make_tokenizer()
    model = make_model(len(tok))
    spec = resolve_prompt(PromptConfig())
    add_placeholder_tokens(tok, model, spec.new_tokens())
    ids = prompt_ids(spec, tok)
    a, b = (tok(t, add_special_tokens=False)["input_ids"] for t in ("a cat sat on the mat", "the team won"))
    batch = PretextCollator(ids, tok.pad_token_id, excluded_target_ids(tok, ids), 32, lm=lm_weight > 0)(
        [{"text": a, "next": b}, {"text": b, "next": a}])
    weights = PretextWeights(1.0, 1.0, lm_weight)
    results = []
    for everywhere in (False, True):
        model.zero_grad()
        out = PretextModel(model, weights, all_logits=everywhere)(**batch)
        out["loss"].backward()
        results.append(({k: v.item() for k, v in out.items()}, [p.grad.clone() for p in model.parameters()]))
    (fast, fast_grads), (plain, plain_grads) = results
    assert set(fast) == set(plain) == {"loss", "ebae", "ebar"} | ({"lm"} if lm_weight else set())
    for key in fast:
        assert fast[key] == pytest.approx(plain[key], abs=1e-5)
    for g1, g2 in zip(fast_grads, plain_grads):
        torch.testing.assert_close(g1, g2, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("k", [1, 3])
def test_last_states_equal_the_full_forward(attn, k):
    """The fast path (the last layer only at the k positions read) against the full forward: same
    states and same gradients, on a left-padded batch of mixed lengths."""
    from conftest import make_model

    from llama2vec.collate import left_pad
    from llama2vec.losses import decoder_states, last_states

    model = make_model(100, attn=attn).train()  # train mode: the fine-tuning path (no dropout configured)
    rows = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14], [15, 16, 17, 18, 19]]
    ids, mask, positions = left_pad(rows, pad_id=0)

    def run(fn):
        model.zero_grad()
        out = fn(model, ids, positions, mask, k) if fn is last_states else fn(model, ids, positions, mask)[:, -k:]
        (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    fast, fast_grads = run(last_states)
    full, full_grads = run(decoder_states)
    assert fast.shape == (3, k, 32)
    torch.testing.assert_close(fast, full, atol=1e-5, rtol=1e-4)
    assert fast_grads.keys() == full_grads.keys()
    for name in full_grads:
        torch.testing.assert_close(fast_grads[name], full_grads[name], atol=1e-5, rtol=1e-4, msg=name)


def test_last_states_fall_back_for_other_decoders():
    from conftest import make_model

    from llama2vec.collate import left_pad
    from llama2vec.losses import decoder_states, last_states

    model = make_model(100, arch="gpt2")
    ids, mask, positions = left_pad([[5, 6, 7], [8, 9]], pad_id=0)
    torch.testing.assert_close(last_states(model, ids, positions, mask, 2),
                               decoder_states(model, ids, positions, mask)[:, -2:])
