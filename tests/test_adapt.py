"""`adapt` end to end on a tiny random Llama: training, files, LoRA, resume, config files."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest
import torch
import yaml
from conftest import pretext_setup
from safetensors.torch import load_file

import llama2vec.models as models_mod
import llama2vec.train as train_mod
from llama2vec.adapt import ADAPT_CONFIGS, adapt
from llama2vec.cli import build_parser
from llama2vec.config import build_configs
from llama2vec.losses import PretextModel, PretextWeights


def run(model_dir, corpus, out, *flags: str) -> dict:
    argv = ["adapt", "--model", str(model_dir), "--corpus", str(corpus), "--output", str(out), "--batch-size", "2",
            "--max-length", "24", "--learning-rate", "1e-3", "--warmup-steps", "1", "--logging-steps", "1", *flags]
    args = build_parser().parse_args(argv)
    return adapt(*build_configs(args, *ADAPT_CONFIGS))


def killed_after(stop: int, real_save):
    """save_checkpoint that interrupts the run once the checkpoint of step `stop` is written."""

    def save(accelerator, out, step, keep, sharded=None):
        real_save(accelerator, out, step, keep, sharded)
        if step == stop:
            raise KeyboardInterrupt

    return save


def test_loss_is_finite_and_falls_on_a_repeated_batch():
    model, batch = pretext_setup(("the cat sat on the mat", "stock markets fell"))
    model.train()
    module = PretextModel(model, PretextWeights())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        out = module(**batch)
        out["loss"].backward()
        opt.step()
        opt.zero_grad()
        losses.append(out["loss"].item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.5 * losses[0]


def test_adapt_full_writes_a_model_that_reloads_identically(tiny_model_dir, tiny_corpus, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "adapted"
    before = load_file(tiny_model_dir / "model.safetensors")
    result = run(tiny_model_dir, tiny_corpus, out, "--max-steps", "4", "--save-steps", "1", "--full",
                 "--save-total-limit", "2")
    assert result["steps"] == 4 and result["pairs"] > 4
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-3", "checkpoint-4"]
    for name in ("config.json", "model.safetensors", "tokenizer.json", "llama2vec_config.json", "run_config.yaml",
                 "log.jsonl", "checkpoints/checkpoint-4/state.json"):
        assert (out / name).is_file(), name
    assert list((out / "logs").rglob("events.out.tfevents.*")), "TensorBoard logs missing"
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all(math.isfinite(r["ebae"]) and math.isfinite(r["ebar"]) for r in records)

    after = load_file(out / "model.safetensors")
    changed = [n for n in before if not torch.equal(before[n], after[n][: before[n].shape[0]])]
    assert sorted(changed) == sorted(before)  # full fine-tuning: every weight trained

    tok = AutoTokenizer.from_pretrained(out)
    assert tok.convert_tokens_to_ids("<s16>") == len(tok) - 1
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.tensor([tok("the cat sat <s1><s2>")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, result["model"](ids).logits, atol=1e-5, rtol=0)
    saved = json.loads((out / "llama2vec_config.json").read_text())
    assert saved["self_tokens"][0] == "<s1>" and saved["pooling"] == "mean" and saved["max_length"] == 24


def test_adapt_lora_trains_adapters_and_placeholders_only(tiny_model_dir, tiny_corpus, tmp_path, monkeypatch):
    seen = {}
    real_save = models_mod.save_model_folder

    def capture(model, *args):
        seen["trainable"] = {n for n, p in model.named_parameters() if p.requires_grad}
        seen["params"] = {n: p.detach().clone() for n, p in model.named_parameters()}
        return real_save(model, *args)

    monkeypatch.setattr(models_mod, "save_model_folder", capture)
    run(tiny_model_dir, tiny_corpus, tmp_path / "lora", "--max-steps", "3", "--lora", "--lora-r", "4")
    base = load_file(tiny_model_dir / "model.safetensors")
    trainable, params = seen["trainable"], seen["params"]
    assert any("lora_A" in n for n in trainable) and any("lora_B" in n for n in trainable)
    assert any("token_adapter" in n for n in trainable)  # the placeholder rows
    frozen = [n for n in params if n not in trainable]
    assert frozen
    compared = 0
    for name in frozen:
        key = name.replace("base_model.model.", "").replace(".base_layer", "")
        if key in base and base[key].shape == params[name].shape:
            assert torch.equal(params[name], base[key]), f"frozen {name} changed"
            compared += 1
    assert compared >= 14  # every projection of both layers and the norms
    assert all(params[n].abs().sum() > 0 for n in trainable if "lora_B" in n)  # lora_B starts at zero

    # The merged folder keeps the trained placeholder rows; every other row is the base model's.
    from transformers import AutoTokenizer

    merged = load_file(tmp_path / "lora" / "model.safetensors")["model.embed_tokens.weight"]  # (V + 16, H)
    rows = AutoTokenizer.from_pretrained(tmp_path / "lora").convert_tokens_to_ids([f"<s{i}>" for i in range(1, 17)])
    old = base["model.embed_tokens.weight"]  # (V, H)
    assert torch.equal(merged[: old.shape[0]], old)
    mean = old.mean(dim=0)  # where the placeholders started
    assert all(not torch.allclose(merged[r], mean, atol=1e-4) for r in rows)
    trained = next(p for n, p in params.items() if "token_adapter" in n and "delta" in n)  # (16, H)
    torch.testing.assert_close(merged[rows], trained, atol=1e-6, rtol=0)


def test_resume_continues_from_the_last_checkpoint(tiny_model_dir, tiny_corpus, tmp_path, monkeypatch):
    flags = ("--max-steps", "6", "--save-steps", "2", "--full")
    whole = run(tiny_model_dir, tiny_corpus, tmp_path / "whole", *flags)

    real_save = train_mod.save_checkpoint
    monkeypatch.setattr(train_mod, "save_checkpoint", killed_after(4, real_save))
    with pytest.raises(KeyboardInterrupt):
        run(tiny_model_dir, tiny_corpus, tmp_path / "cut", *flags)
    assert not (tmp_path / "cut" / "llama2vec_config.json").exists()
    monkeypatch.setattr(train_mod, "save_checkpoint", real_save)

    resumed = run(tiny_model_dir, tiny_corpus, tmp_path / "cut", *flags, "--resume")
    assert resumed["resumed_from"] == 4 and resumed["steps"] == 6
    steps = [json.loads(line)["step"] for line in (tmp_path / "cut" / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]
    a = load_file(tmp_path / "whole" / "model.safetensors")
    b = load_file(tmp_path / "cut" / "model.safetensors")
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=0)
    assert whole["last"]["loss"] == pytest.approx(resumed["last"]["loss"], abs=1e-5)


def test_config_file_values_and_flag_overrides(tiny_model_dir, tiny_corpus, tmp_path):
    cfg = tmp_path / "adapt.yaml"
    cfg.write_text(yaml.safe_dump({"train": {"learning_rate": 0.002, "batch_size": 3}, "ebar_weight": 0.25,
                                   "prompt_preset": "paper"}))
    out = tmp_path / "out"
    run(tiny_model_dir, tiny_corpus, out, "--config", str(cfg), "--max-steps", "1", "--learning-rate", "0.003")
    resolved = yaml.safe_load((out / "run_config.yaml").read_text())
    assert resolved["train"]["learning_rate"] == 0.003  # the flag wins
    assert resolved["train"]["batch_size"] == 2  # set by run()'s flags
    assert resolved["pretext"]["ebar_weight"] == 0.25 and resolved["prompt"]["prompt_preset"] == "paper"
    assert json.loads((out / "llama2vec_config.json").read_text())["pooling"] == "last"


def test_adapt_help_documents_every_option(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["adapt", "--help"])
    text = capsys.readouterr().out
    for flag in ("--max-steps", "--epochs", "--batch-size", "--learning-rate", "--seed", "--lora", "--full",
                 "--overwrite", "--resume", "--config", "--ebae-weight", "--ebar-weight", "--lm-weight",
                 "--stopwords", "--gradient-checkpointing", "--prompt-preset", "--num-placeholders", "--pooling"):
        assert flag in text, flag


def test_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    for checkpointing in (False, True):
        model, batch = pretext_setup(("the cat sat on the mat", "stock markets fell"))
        model.train()
        if checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            assert model.is_activation_checkpointing
        PretextModel(model, PretextWeights())(**batch)["loss"].backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-6, rtol=1e-5)


def test_adapt_with_lora_and_gradient_checkpointing(tiny_model_dir, tiny_corpus, tmp_path):
    flags = ("--max-steps", "2", "--lora", "--lora-r", "4")
    result = run(tiny_model_dir, tiny_corpus, tmp_path / "gc", *flags, "--gradient-checkpointing")
    plain = run(tiny_model_dir, tiny_corpus, tmp_path / "plain", *flags)
    assert result["steps"] == 2 and result["last"]["loss"] == pytest.approx(plain["last"]["loss"], abs=1e-5)
    a, b = load_file(tmp_path / "gc" / "model.safetensors"), load_file(tmp_path / "plain" / "model.safetensors")
    base = load_file(tiny_model_dir / "model.safetensors")
    assert any(not torch.equal(a[n][: base[n].shape[0]], base[n]) for n in base)  # it trained
    for name in a:  # recomputing activations (dropout masks included) changes nothing
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=0)


def test_length_grouping_keeps_a_random_order_and_cuts_padding():
    import numpy as np

    from llama2vec.train import EpochSampler, padding_fraction

    lengths = np.random.default_rng(0).integers(20, 129, size=1000)
    plain = EpochSampler(1000, seed=1)
    grouped = EpochSampler(1000, seed=1, lengths=lengths, batch_size=8)
    orders = []
    for epoch in (0, 1):
        grouped.set_epoch(epoch)
        orders.append(list(grouped))
        assert sorted(orders[-1]) == list(range(1000))  # every example once
    assert orders[0] != orders[1]
    grouped.set_epoch(0)
    assert list(grouped) == orders[0]  # depends only on (seed, epoch)
    assert padding_fraction(lengths, list(plain), 8) > 0.25
    assert padding_fraction(lengths, orders[0], 8) < 0.02


def test_gradient_accumulation_equals_one_larger_batch(tiny_model_dir, tiny_corpus, tmp_path):
    common = ("--max-steps", "3", "--warmup-steps", "2", "--no-group-by-length", "--full", "--learning-rate", "1e-2")
    run(tiny_model_dir, tiny_corpus, tmp_path / "one", *common, "--batch-size", "4")
    run(tiny_model_dir, tiny_corpus, tmp_path / "acc", *common, "--batch-size", "2", "--grad-accum", "2")
    one = [json.loads(line) for line in (tmp_path / "one" / "log.jsonl").read_text().splitlines()]
    acc = [json.loads(line) for line in (tmp_path / "acc" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in acc] == [1, 2, 3]
    assert [r["lr"] for r in acc] == [r["lr"] for r in one] == pytest.approx([5e-3, 1e-2, 0.0])
    for a, b in zip(one, acc):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
    a, b = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "acc" / "model.safetensors")
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-5, rtol=0)


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16"])
def test_mixed_precision_keeps_updates_too_small_for_bfloat16(tiny_model_dir, tiny_corpus, tmp_path, precision):
    # Adam moves every weight by about the learning rate: 1e-6 is under half a bfloat16 step of the
    # weights of about 0.02 here (2^-6 * 2^-8 / 2 = 3e-5), so only float32 master weights keep it.
    out = tmp_path / precision
    run(tiny_model_dir, tiny_corpus, out, "--max-steps", "2", "--full", "--learning-rate", "1e-6",
        "--warmup-steps", "0", "--precision", precision)
    base = load_file(tiny_model_dir / "model.safetensors")
    after = load_file(out / "model.safetensors")
    name = "model.layers.0.mlp.down_proj.weight"
    assert after[name].dtype == (torch.float32 if precision == "bf16-mixed" else torch.bfloat16)
    moved = (after[name].float() - base[name].to(after[name].dtype).float()).abs()
    share = (moved > 0).float().mean()  # of the weights that moved
    if precision == "bf16-mixed":
        assert share > 0.9 and moved.max() < 1e-5
        # ... while computing in bfloat16: the loss is near float32's, not equal to it.
        run(tiny_model_dir, tiny_corpus, tmp_path / "fp32", "--max-steps", "1", "--full", "--precision", "fp32")
        first = [json.loads((tmp_path / f / "log.jsonl").read_text().splitlines()[0])["loss"] for f in ("fp32", out)]
        assert first[0] != first[1] and first[0] == pytest.approx(first[1], rel=1e-2)
    else:
        assert share < 0.1  # rounded away, but on the few weights near 0


def test_flash_attention_is_named_where_it_cannot_run(tiny_model_dir, tiny_corpus, tmp_path, monkeypatch):
    from llama2vec.errors import Llama2VecError

    with pytest.raises(Llama2VecError, match="flash_attention_2 needs the flash-attn package"):
        run(tiny_model_dir, tiny_corpus, tmp_path / "a", "--attn-implementation", "flash_attention_2")
    real = importlib.util.find_spec
    installed = lambda name, *a: object() if name == "flash_attn" else real(name, *a)  # as if installed
    monkeypatch.setattr(importlib.util, "find_spec", installed)
    with pytest.raises(Llama2VecError, match="joint pass needs a 4-D attention mask.*--no-joint"):
        run(tiny_model_dir, tiny_corpus, tmp_path / "b", "--attn-implementation", "flash_attention_2")
    assert not (tmp_path / "b").exists()  # refused before anything is written


def test_lora_checkpoints_hold_the_trained_weights_only_and_resume(tiny_model_dir, tiny_corpus, tmp_path, monkeypatch):
    flags = ("--max-steps", "4", "--save-steps", "2", "--lora", "--lora-r", "4", "--lora-dropout", "0.1")
    run(tiny_model_dir, tiny_corpus, tmp_path / "whole", *flags)
    state = torch.load(tmp_path / "whole" / "checkpoints" / "checkpoint-4" / "pytorch_model.bin")
    assert state and all("lora_" in k or "token_adapter" in k for k in state)  # no frozen base weight
    assert any("token_adapter" in k for k in state)

    real_save = train_mod.save_checkpoint
    monkeypatch.setattr(train_mod, "save_checkpoint", killed_after(2, real_save))
    with pytest.raises(KeyboardInterrupt):
        run(tiny_model_dir, tiny_corpus, tmp_path / "cut", *flags)
    monkeypatch.setattr(train_mod, "save_checkpoint", real_save)
    assert run(tiny_model_dir, tiny_corpus, tmp_path / "cut", *flags, "--resume")["resumed_from"] == 2
    a, b = load_file(tmp_path / "whole" / "model.safetensors"), load_file(tmp_path / "cut" / "model.safetensors")
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=0)


def torchrun(*args: str, processes: int = 2) -> str:
    import os
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes), "-m", "llama2vec", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def ranks(out) -> list[dict]:
    return [json.loads((out / "ranks" / f"rank-{r}.json").read_text()) for r in range(2)]


def largest_difference(a: dict, b: dict) -> float:
    assert sorted(a) == sorted(b)
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.slow
def test_fsdp_equals_ddp_with_offload_checkpointing_and_clipping_holds_half_and_resumes(sized_model_dir, tiny_corpus,
                                                                                         tmp_path):
    """Two CPU processes under torchrun adapt a 110 MiB model by DDP, by --fsdp and by --fsdp --fsdp-offload,
    with gradient checkpointing and clipping: the three end within 1e-5 of each other; under FSDP the second
    process never holds a whole copy (the first reads the model and sends it its shards); the offloaded run
    resumes exactly from a checkpoint; clipping under FSDP clips what DDP clips."""
    import shutil

    from transformers import AutoModelForCausalLM

    common = ["adapt", "--model", str(sized_model_dir), "--corpus", str(tiny_corpus), "--device", "cpu", "--full",
              "--max-steps", "3", "--batch-size", "2", "--max-length", "24", "--logging-steps", "1",
              "--learning-rate", "1e-2", "--gradient-checkpointing", "--resume"]  # one checkpoint, at the end
    clip = ["--max-grad-norm", "0.05"]
    said = torchrun(*common, *clip, "--output", str(tmp_path / "ddp"))
    assert said.count('"steps": 3') == 1  # only the main process reports
    torchrun(*common, *clip, "--fsdp", "--output", str(tmp_path / "fsdp"))
    said = torchrun(*common, *clip, "--fsdp", "--fsdp-offload", "--save-steps", "1", "--output",
                    str(tmp_path / "offload"))
    assert said.count("FSDP: weights sharded over 2 processes, kept in CPU memory") == 2  # on each process
    weights = {name: load_file(tmp_path / name / "model.safetensors") for name in ("ddp", "fsdp", "offload")}
    base = load_file(sized_model_dir / "model.safetensors")
    assert not torch.equal(weights["fsdp"]["model.norm.weight"], base["model.norm.weight"])
    assert largest_difference(weights["fsdp"], weights["ddp"]) <= 1e-5
    assert largest_difference(weights["offload"], weights["ddp"]) <= 1e-5
    AutoModelForCausalLM.from_pretrained(tmp_path / "fsdp")  # a plain Hugging Face folder

    # The logged gradient norm is the global one (a process's own shard would give less), above the clip.
    norms = {name: [json.loads(line)["grad_norm"] for line in (tmp_path / name / "log.jsonl").read_text().splitlines()]
             for name in ("ddp", "fsdp", "offload")}
    assert min(norms["ddp"]) > 0.05 * 10
    for name in ("fsdp", "offload"):
        assert norms[name] == pytest.approx(norms["ddp"], rel=1e-4)
    # Without the clip the run goes elsewhere: clipping under FSDP acts, and as under DDP.
    torchrun(*common, "--max-grad-norm", "0", "--fsdp", "--output", str(tmp_path / "unclipped"))
    assert largest_difference(load_file(tmp_path / "unclipped" / "model.safetensors"), weights["fsdp"]) > 100 * 1e-5

    # Each process reports its device, where its weights live and its peak memory.
    copy_mib = sum(t.numel() * t.element_size() for t in base.values()) / 2**20
    reports = {name: ranks(tmp_path / name) for name in ("ddp", "fsdp", "offload")}
    for name, pair in reports.items():
        assert [r["device"] for r in pair] == ["cpu", "cpu"] and all(r["weights_on"] == ["cpu"] for r in pair), name
    assert [r["weights_mib"] for r in reports["ddp"]] == [pytest.approx(copy_mib, rel=0.02)] * 2
    assert [r["weights_mib"] for r in reports["fsdp"]] == [pytest.approx(copy_mib / 2, rel=0.02)] * 2
    grown = {name: [r["peak_rss_mib"]["loaded"] - r["peak_rss_mib"]["start"] for r in pair]
             for name, pair in reports.items()}
    assert grown["ddp"][1] >= copy_mib, grown  # DDP: every process reads a whole copy
    assert grown["fsdp"][1] < copy_mib and grown["offload"][1] < copy_mib, grown  # FSDP: its half, never a copy

    # Resumed from its sharded checkpoint at step 2, the offloaded run ends where the uninterrupted one did.
    cut = tmp_path / "cut"
    shutil.copytree(tmp_path / "offload", cut)
    shutil.rmtree(cut / "checkpoints" / "checkpoint-3")
    for name in ("llama2vec_config.json", "model.safetensors"):
        (cut / name).unlink()
    assert (cut / "checkpoints" / "checkpoint-2" / "fsdp").is_dir()  # every process's shards
    torchrun(*common, *clip, "--fsdp", "--fsdp-offload", "--save-steps", "1", "--output", str(cut))
    assert [json.loads(line)["step"] for line in (cut / "log.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert largest_difference(load_file(cut / "model.safetensors"), weights["offload"]) <= 1e-6


def test_fsdp_in_one_process_offloads(tiny_model_dir, tiny_corpus, tmp_path):
    """--fsdp in one process, without a launcher (one GPU whose model does not fit it, with --fsdp-offload), trains
    as plainly as without it."""
    plain = run(tiny_model_dir, tiny_corpus, tmp_path / "plain", "--max-steps", "2", "--full")
    sharded = run(tiny_model_dir, tiny_corpus, tmp_path / "sharded", "--max-steps", "2", "--full", "--fsdp",
                  "--fsdp-offload")
    assert sharded["rank"]["weights_on"] == ["cpu"] and plain["steps"] == sharded["steps"] == 2
    assert largest_difference(load_file(tmp_path / "plain" / "model.safetensors"),
                              load_file(tmp_path / "sharded" / "model.safetensors")) <= 1e-5


@pytest.mark.slow
def test_fsdp_finetune_equals_ddp(tiny_model_dir, tmp_path):
    from conftest import SENTENCES

    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"query": SENTENCES[i], "pos": [SENTENCES[(i + 1) % 8]],
                                         "neg": [SENTENCES[(i + 2) % 8]]}) + "\n" for i in range(8)))
    common = ["finetune", "--model", str(tiny_model_dir), "--train", str(train), "--device", "cpu", "--full",
              "--max-steps", "2", "--batch-size", "2", "--group-size", "2", "--learning-rate", "1e-3"]
    torchrun(*common, "--output", str(tmp_path / "ddp"))
    torchrun(*common, "--fsdp", "--output", str(tmp_path / "fsdp"))
    ddp, fsdp = load_file(tmp_path / "ddp" / "model.safetensors"), load_file(tmp_path / "fsdp" / "model.safetensors")
    for name in ddp:
        torch.testing.assert_close(fsdp[name], ddp[name], atol=1e-5, rtol=0)
