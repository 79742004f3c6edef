"""Tiny random models and an in-memory tokenizer, built in seconds on CPU."""

from __future__ import annotations

import json
import os

import pytest
import torch

torch.set_flush_denormal(True)
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):  # pytest -n N: the cores shared out, not N x all of them
    import faiss  # its OpenMP threads spin while they wait: oversubscribed, they slow every worker

    _threads = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    torch.set_num_threads(_threads)
    faiss.omp_set_num_threads(_threads)

SENTENCES = [
    "The cat sat on the mat. It was a sunny day!",
    "Dense retrieval maps queries and passages to vectors.",
    "A decoder only model predicts the next token from the previous ones.",
    "Paris is the capital of France, and Berlin is the capital of Germany.",
    "Stock markets fell sharply on Monday as investors worried about rates.",
    "The team won the final match after a late goal in extra time.",
    "Summarize the above passage within eight words, predict the following passage.",
    "Music, films and books: the entertainment industry grew last year.",
]


def make_tokenizer():
    """A byte-level BPE tokenizer trained in memory, with BOS/EOS/PAD/UNK."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<bos>", "<eos>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(SENTENCES * 3, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>", unk_token="<unk>")


def make_model(vocab_size: int, arch: str = "llama", attn: str = "sdpa", seed: int = 0):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    common = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  tie_word_embeddings=True)
    if arch == "gpt2":
        common = dict(vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=4, n_positions=512)
    elif arch == "gpt_neox":
        common = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, max_position_embeddings=512)
    config = AutoConfig.for_model(arch, **common)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


def write_tiny_model(folder):
    """A local Hugging Face folder holding a tiny random Llama and its tokenizer."""
    tok = make_tokenizer()
    make_model(len(tok)).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture
def tiny_model_dir(tmp_path_factory):
    """A local Hugging Face folder holding a tiny random Llama and its tokenizer."""
    return write_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def sized_model_dir(tmp_path_factory):
    """A random Llama of about 110 MiB in float32 (12 layers of width 512, no tensor above 2 MiB), with the tiny
    tokenizer: large enough for a process's memory to show whether it held a whole copy."""
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = tmp_path_factory.mktemp("sized-llama")
    tok = make_tokenizer()
    torch.manual_seed(0)
    config = AutoConfig.for_model("llama", vocab_size=1024, hidden_size=512, intermediate_size=1024,
                                  num_hidden_layers=12, num_attention_heads=8, num_key_value_heads=4,
                                  max_position_embeddings=512, tie_word_embeddings=True)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture
def tiny_corpus(tmp_path):
    """A JSONL corpus of documents long enough for several chunks each."""
    path = tmp_path / "corpus.jsonl"
    with path.open("w") as fh:
        for d in range(4):
            text = " ".join(SENTENCES[(d + i) % len(SENTENCES)] for i in range(8))
            fh.write(json.dumps({"id": f"d{d}", "title": f"Doc {d}", "text": text}) + "\n")
    return path


def pretext_setup(texts: tuple[str, str], preset: str = "llara"):
    """(model with placeholders, a collated pretext batch of the two texts as each other's next)."""
    from llama2vec.collate import PretextCollator, excluded_target_ids
    from llama2vec.config import PromptConfig
    from llama2vec.models import add_placeholder_tokens
    from llama2vec.prompts import prompt_ids, resolve_prompt

    tok = make_tokenizer()
    model = make_model(len(tok))
    spec = resolve_prompt(PromptConfig(prompt_preset=preset))
    add_placeholder_tokens(tok, model, spec.new_tokens())
    ids = prompt_ids(spec, tok)
    a, b = (tok(t, add_special_tokens=False)["input_ids"] for t in texts)
    batch = PretextCollator(ids, tok.pad_token_id, excluded_target_ids(tok, ids), 32)(
        [{"text": a, "next": b}, {"text": b, "next": a}])
    return model, batch

