"""The released LLaRA checkpoints (BAAI/LLARA-pretrain, -passage, -document, -beir) load as their card
says: a tiny Llama checkpoint built like them (16 placeholders added to the tokenizer in their scrambled
id order, no llama2vec_config.json) against the card's usage code, written out here on its own."""

from __future__ import annotations

import logging

import numpy as np
import torch
from conftest import SENTENCES, make_tokenizer

from llama2vec import Llama2Vec

# The ids of <s1>..<s16> in the released tokenizers, less 32000 (the Llama-2 vocabulary size).
RELEASED = [8, 11, 4, 13, 7, 5, 2, 14, 0, 9, 12, 1, 10, 3, 6, 15]


def llara_like_checkpoint(folder):
    from tokenizers import processors
    from transformers import AutoConfig, AutoModelForCausalLM

    tok = make_tokenizer()
    bos = tok.convert_tokens_to_ids("<bos>")  # Llama's tokenizer opens every text with BOS
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A $B",
                                                                         special_tokens=[("<bos>", bos)])
    base = len(tok)
    for offset in range(16):  # add them in id order: <s9> first, then <s12>, <s7>, ...
        tok.add_tokens([f"<s{RELEASED.index(offset) + 1}>"])
    assert [tok.convert_tokens_to_ids(f"<s{i}>") - base for i in range(1, 17)] == RELEASED
    tok.pad_token = tok.unk_token  # the released tokenizers pad with unk
    torch.manual_seed(0)
    config = AutoConfig.for_model("llama", vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                  max_position_embeddings=1024, tie_word_embeddings=False)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def card_embeddings(folder, texts: list[str], query: bool, max_length: int = 512) -> np.ndarray:
    """The card's get_query_inputs / get_passage_inputs and pooling."""
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.padding_side = "left"
    model = AutoModel.from_pretrained(folder).eval()
    if query:
        suffix = '", predict the following passage within eight words: <s9><s10><s11><s12><s13><s14><s15><s16>'
    else:
        suffix = '", summarize the above passage within eight words: <s1><s2><s3><s4><s5><s6><s7><s8>'
    prefix_ids = tokenizer('"', return_tensors=None)["input_ids"]
    suffix_ids = tokenizer(suffix, return_tensors=None)["input_ids"][1:]
    rows = []
    for text in texts:
        inputs = tokenizer(text, return_tensors=None, max_length=max_length, truncation=True,
                           add_special_tokens=False)
        inputs["input_ids"] = prefix_ids + inputs["input_ids"] + suffix_ids
        inputs["attention_mask"] = [1] * len(inputs["input_ids"])
        rows.append(inputs)
    batch = tokenizer.pad(rows, padding=True, max_length=max_length, pad_to_multiple_of=8, return_tensors="pt")
    with torch.no_grad():
        out = model(**batch, return_dict=True, output_hidden_states=True)
    emb = out.hidden_states[-1][:, -8:, :].mean(dim=1)
    return torch.nn.functional.normalize(emb, dim=-1).numpy()


def test_a_released_llara_checkpoint_encodes_as_its_card_says(tmp_path, caplog):
    folder = llara_like_checkpoint(tmp_path / "llara")
    long = " ".join(SENTENCES * 12)  # about 700 tokens: over the 128 default and the card's 512
    texts = ["What is llama?", SENTENCES[3], " ".join(SENTENCES[:4]), " ".join(SENTENCES * 3), long]
    with caplog.at_level(logging.INFO, logger="llama2vec"):
        model = Llama2Vec.from_pretrained(str(folder), device="cpu", batch_size=2)
    assert "a LLaRA checkpoint" in caplog.text and "cut to 512 tokens" in caplog.text
    assert model.spec.max_length == model.spec.query_max_length == 512
    lengths = [len(ids) for ids in model.tokenize(texts)]
    assert lengths[3] > 128 and lengths[4] > 512  # the default length would cut the fourth, the card the fifth
    # The placeholders are the checkpoint's own, in its order: never added again nor re-initialised.
    from safetensors.torch import load_file

    saved = load_file(folder / "model.safetensors")["model.embed_tokens.weight"]
    assert len(model.tokenizer) == saved.shape[0] and torch.equal(model.model.get_input_embeddings().weight, saved)
    assert model.ids.self_suffix[-8:] == [model.tokenizer.convert_tokens_to_ids(f"<s{i}>") for i in range(1, 9)]
    for query in (True, False):
        ours = model.encode_queries(texts) if query else model.encode_corpus(texts)
        card = card_embeddings(folder, texts, query)
        assert np.abs(ours - card).max() <= 1e-5, (query, np.abs(ours - card).max())
