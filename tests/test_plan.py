"""`adapt --dry-run` and `finetune --dry-run`: the plan of a launch, made without training or writing anything."""

import json
import re
from pathlib import Path

import pytest
import torch
from conftest import SENTENCES, make_tokenizer

from llama2vec.cli import main
from llama2vec.config import DataConfig, ModelConfig, PretextConfig, PromptConfig, TrainConfig
from llama2vec.errors import Llama2VecError
from llama2vec.plan import dry_run

PAPER = Path(__file__).resolve().parents[1] / "configs" / "paper"
NO_TARGET = {"gpus": None, "gpu_memory": None, "nodes": 1, "gpu_tflops": None, "host_memory": None}


@pytest.fixture(scope="module")
def llama_7b(tmp_path_factory):
    """A folder holding Llama-2-7B's config.json alone (its architecture; no weights, no tokenizer)."""
    from transformers import LlamaConfig

    folder = tmp_path_factory.mktemp("llama-2-7b")
    LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096,
                tie_word_embeddings=False).save_pretrained(folder)
    return folder


def adapt_args(model, out, *extra):
    return ["adapt", "--config", str(PAPER / "adapt-llama2-7b.yaml"), "--model", str(model), "--output", str(out),
            "--dry-run", *extra]


def test_the_paper_adaptation_on_8_gpus_fits_sharded_and_not_replicated(llama_7b, tmp_path, capsys):
    out = tmp_path / "never-written"
    assert main(adapt_args(llama_7b, out, "--plan-gpus", "8", "--plan-gpu-memory", "80")) == 2
    err = capsys.readouterr().err
    assert "the plan does not fit: each process needs" in err and "it fits with --fsdp (" in err

    assert main(adapt_args(llama_7b, out, "--fsdp", "--plan-gpus", "8", "--plan-gpu-memory", "80",
                           "--plan-gpu-tflops", "989")) == 0
    shown = capsys.readouterr().out
    assert "precision bf16-mixed" in shown and "rank 7 -> node 0 cuda:7" in shown
    assert "steps: 10,000 of 256 examples each" in shown and "time: about" in shown and shown.endswith("fits\n")
    assert not out.exists()


def test_the_plan_prices_the_model_the_run_builds(llama_7b):
    """Parameters counted off the model as the run builds it (placeholder rows added), each part priced by the
    rule it follows: 1/N of the weights, gradients and optimizer states under FSDP, a whole copy under DDP."""
    from llama2vec.prompts import resolve_prompt

    model, prompt, pretext = ModelConfig(model=str(llama_7b)), PromptConfig(), PretextConfig()
    data = DataConfig(max_length=1024)
    new = len(resolve_prompt(prompt).new_tokens())
    target = {**NO_TARGET, "gpus": 16, "gpu_memory": 80.0, "nodes": 2}
    fsdp = dry_run("adapt", model, TrainConfig(fsdp=True, max_steps=10, batch_size=2, gradient_checkpointing=True),
                   target, prompt, pretext, data)
    assert fsdp.shape.params == 6_738_415_616 + 2 * 4096 * new  # Llama-2-7B and the placeholders' rows
    assert fsdp.precision == "bf16-mixed" and fsdp.device["weights (1/16)"] == fsdp.shape.params * 4 / 16
    assert fsdp.device["optimizer (1/16)"] == 2 * fsdp.device["weights (1/16)"]
    assert [r[1:] for r in fsdp.target.ranks[7:9]] == [(0, 7, "cuda:7"), (1, 0, "cuda:0")]
    assert fsdp.work.passes[0][0] == 2 and fsdp.tokens == 10 * 2 * 16 * fsdp.example_tokens

    with pytest.raises(Llama2VecError, match="does not fit.*it fits with"):
        dry_run("adapt", model, TrainConfig(max_steps=10, batch_size=2), target, prompt, pretext, data)
    # A micro-batch twice as large holds twice the activations.
    big = dry_run("adapt", model, TrainConfig(fsdp=True, max_steps=10, batch_size=4, gradient_checkpointing=True),
                  target, prompt, pretext, data)
    assert big.device["activations"] == pytest.approx(2 * fsdp.device["activations"], rel=1e-6)


def test_nothing_fits_names_it(llama_7b, tmp_path, capsys):
    assert main(adapt_args(llama_7b, tmp_path / "o", "--fsdp", "--fsdp-offload", "--plan-gpus", "1",
                           "--plan-gpu-memory", "4")) == 2
    assert "no change of checkpointing, sharding or micro-batch makes it fit" in capsys.readouterr().err


def test_plan_flags_need_dry_run(llama_7b, tmp_path, capsys):
    assert main(["adapt", "--model", str(llama_7b), "--corpus", "c.jsonl", "--output", str(tmp_path / "o"),
                 "--plan-gpus", "8"]) == 2
    assert "--plan-gpus describe(s) the target of --dry-run: add --dry-run" in capsys.readouterr().err
    assert main(adapt_args(llama_7b, tmp_path / "o", "--plan-gpus", "8")) == 2
    assert "--plan-gpus and --plan-gpu-memory go together" in capsys.readouterr().err


def test_shape_equals_the_loaded_model_and_its_lora(tiny_model_dir):
    """The meta-device count equals the real model's, placeholders and LoRA adapters included."""
    from llama2vec.models import add_placeholder_tokens, apply_lora, load_causal_lm, load_tokenizer
    from llama2vec.plan import model_shape
    from llama2vec.prompts import resolve_prompt

    cfg = ModelConfig(model=str(tiny_model_dir), device="cpu")
    tokens = resolve_prompt(PromptConfig()).new_tokens()
    for lora in (False, True):
        tok, lm, _ = load_causal_lm(cfg, str(tiny_model_dir), torch.device("cpu"))
        ids = add_placeholder_tokens(tok, lm, tokens)
        if lora:
            lm = apply_lora(lm, 8, 16, 0.0, ids)
        shape = model_shape(cfg, str(tiny_model_dir), torch.float32, tokens, load_tokenizer(str(tiny_model_dir)),
                            lora, 8)
        distinct = {id(p): p for p in lm.parameters()}.values()
        assert shape.params == sum(p.numel() for p in distinct)
        assert shape.trainable == sum(p.numel() for p in distinct if p.requires_grad)
        assert shape.layers == 2 and shape.vocab == len(tok)


def write_corpus(path: Path, documents: int) -> Path:
    with path.open("w") as fh:
        for d in range(documents):
            text = " ".join(SENTENCES[(d * 3 + i) % len(SENTENCES)] for i in range(4 + d % 9))
            fh.write(json.dumps({"id": f"d{d}", "title": f"Doc {d}", "text": text}) + "\n")
    return path


def test_steps_come_from_the_corpus_exactly_or_from_a_sample(tiny_model_dir, tmp_path):
    """A small corpus is chunked whole (the pairs adapt will train on); a large one is estimated from its first
    documents, close to the count that chunking it all gives."""
    from llama2vec.data import PairDataset, build_pair_cache
    from llama2vec.models import add_placeholder_tokens
    from llama2vec.plan import SAMPLE_DOCUMENTS, estimate_pairs
    from llama2vec.prompts import resolve_prompt

    tok = make_tokenizer()
    add_placeholder_tokens(tok, None, resolve_prompt(PromptConfig()).new_tokens())
    for documents in (50, 3 * SAMPLE_DOCUMENTS):
        corpus = write_corpus(tmp_path / f"c{documents}.jsonl", documents)
        data = DataConfig(corpus=str(corpus), max_length=24, min_chunk_tokens=4)
        pairs, note = estimate_pairs(corpus, tok, data)
        exact = len(PairDataset(build_pair_cache(corpus, tok, tmp_path / f"p{documents}", 24, 4)))
        if documents < SAMPLE_DOCUMENTS:
            assert pairs == exact and note == f"the pairs of {corpus}"
        else:
            assert abs(pairs - exact) <= 0.1 * exact and note.startswith("estimated from the first 200")


def test_finetune_plan_counts_the_examples_and_fits_here(tiny_model_dir, tmp_path, capsys):
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"query": f"q{i}", "pos": [SENTENCES[i % 5]], "neg": [SENTENCES[(i + 1) % 5]]})
                             + "\n" for i in range(10)))
    assert main(["finetune", "--model", str(tiny_model_dir), "--train", str(train), "--output", str(tmp_path / "o"),
                 "--device", "cpu", "--batch-size", "4", "--group-size", "2", "--dry-run"]) == 0
    shown = capsys.readouterr().out
    assert "steps: 3 of 4 examples each (the examples of" in shown  # ceil(10 / 4) batches, one epoch
    assert "LoRA" in shown and "devices: rank 0 -> node 0 cpu" in shown and shown.endswith("fits\n")
    assert not (tmp_path / "o").exists()


def run_cli(*args: str, **env: str) -> str:
    import os
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "llama2vec", *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **env})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow
@pytest.mark.parametrize("checkpointing", [False, True])
def test_the_planned_peak_meets_the_measured_one_where_activations_weigh(sized_model_dir, tmp_path, checkpointing):
    """A 110 MiB model on 4 x 160-token rows, where the activations weigh (a third of the peak; under gradient
    checkpointing the layer inputs and one layer's, much less): the dry run's peak is within 25% of the peak
    resident memory the run reaches (glibc's mmap threshold fixed, so that freed blocks leave the process: see
    test_configs.LIVE_MEMORY)."""
    corpus = tmp_path / "long.jsonl"
    corpus.write_text("".join(json.dumps({"id": str(d), "title": f"T{d}", "text": " ".join(SENTENCES * 30)}) + "\n"
                              for d in range(4)))
    args = ["adapt", "--model", str(sized_model_dir), "--device", "cpu", "--corpus", str(corpus), "--output",
            str(tmp_path / "out"), "--max-steps", "2", "--batch-size", "4", "--max-length", "128", "--precision",
            "fp32", "--save-steps", "0", *(["--gradient-checkpointing"] if checkpointing else [])]
    shown = run_cli(*args, "--dry-run")
    planned = float(re.search(r"peak \(held \+ the larger phase\) +([\d.]+) GiB", shown).group(1)) * 1024
    activations = float(re.search(r"activations +([\d.]+) GiB", shown).group(1)) * 1024
    run_cli(*args, MALLOC_MMAP_THRESHOLD_="65536")
    peak = json.loads((tmp_path / "out" / "ranks" / "rank-0.json").read_text())["peak_rss_mib"]["end"]
    assert activations > (0.05 if checkpointing else 0.25) * peak, (activations, peak)
    assert abs(planned - peak) <= 0.25 * peak, (planned, peak)


def test_a_process_peak_is_its_own_not_its_parents():
    """The rank report's peak is the process's own: a command started by a process holding 600 MiB (a test
    runner, a notebook) does not report their memory as its peak."""
    import subprocess
    import sys

    held = bytearray(600 * 2**20)  # resident: written below
    held[:: 4096] = b"x" * len(held[:: 4096])
    shown = subprocess.run([sys.executable, "-c", "from llama2vec.train import peak_rss_mib; print(peak_rss_mib())"],
                           capture_output=True, text=True, check=True).stdout
    assert float(shown) < 500, shown
    del held
