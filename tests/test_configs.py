"""The shipped configs, each run end to end: the accelerate launch file (DDP) launches the paper's fine-tuning
recipe, and the paper's adaptation recipe runs on the bundled SmolLM2 under torchrun with --fsdp, with only the
model, data and sizes overridden."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from conftest import SENTENCES

from llama2vec.adapt import ADAPT_CONFIGS
from llama2vec.cli import build_parser
from llama2vec.config import FINETUNE_CONFIGS, build_configs

CONFIGS = Path(__file__).parent.parent / "configs"


def launch(*command: str, **env: str) -> str:
    import os
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", *command], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **env})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def test_every_config_file_is_one_a_test_runs():
    assert sorted(p.name for p in (CONFIGS / "accelerate").iterdir()) == ["ddp.yaml"]
    assert sorted(p.name for p in (CONFIGS / "paper").iterdir()) == ["adapt-llama2-7b.yaml",
                                                                    "finetune-msmarco-llama2-7b.yaml"]


@pytest.mark.slow
def test_the_msmarco_recipe_runs_under_accelerate_launch_with_the_ddp_file(tiny_model_dir, tmp_path):
    """`accelerate launch --config_file configs/accelerate/ddp.yaml` with two processes (gloo on CPUs): the
    released MS MARCO recipe (LoRA, cross-device negatives) trains, each process on its own device."""
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"query": SENTENCES[i], "pos": [SENTENCES[(i + 1) % 8]],
                                         "neg": [SENTENCES[(i + j) % 8] for j in range(2, 5)]}) + "\n"
                             for i in range(8)))
    out = tmp_path / "ft"
    said = launch("accelerate.commands.launch", "--config_file", str(CONFIGS / "accelerate" / "ddp.yaml"),
                  "--num_processes", "2", "-m", "llama2vec", "finetune",
                  "--config", str(CONFIGS / "paper" / "finetune-msmarco-llama2-7b.yaml"),
                  "--model", str(tiny_model_dir),
                  "--train", str(train), "--output", str(out), "--max-steps", "2", "--batch-size", "2",
                  "--group-size", "4", "--lora-r", "4", "--query-max-length", "16", "--passage-max-length", "24",
                  "--gradient-checkpointing", "--warmup-steps", "1", "--logging-steps", "1")
    assert said.count('"steps": 2') == 1  # the main process reports
    reports = [json.loads((out / "ranks" / f"rank-{r}.json").read_text()) for r in range(2)]
    assert [(r["rank"], r["world_size"], r["device"]) for r in reports] == [(0, 2, "cpu"), (1, 2, "cpu")]
    saved = yaml.safe_load((out / "run_config.yaml").read_text())
    train = saved["finetunetrain"]
    assert train["lora"] is True and train["lora_r"] == 4 and saved["contrastive"]["cross_device"]
    assert (out / "llama2vec_config.json").is_file()


def test_the_paper_recipes_hold_the_paper_settings():
    args = build_parser().parse_args(["adapt", "--config", str(CONFIGS / "paper" / "adapt-llama2-7b.yaml")])
    model, prompt, pretext, data, train = build_configs(args, *ADAPT_CONFIGS)
    assert model.model == "meta-llama/Llama-2-7b-hf" and data.max_length == 1024 and pretext.joint
    assert train.max_steps == 10_000 and train.learning_rate == 1e-5 and not train.lora
    assert 8 * train.batch_size * train.grad_accum == 256  # the global batch on 8 GPUs
    assert train.gradient_checkpointing and train.precision == "auto"  # bf16-mixed on CUDA

    args = build_parser().parse_args(["finetune", "--config",
                                      str(CONFIGS / "paper" / "finetune-msmarco-llama2-7b.yaml")])
    model, prompt, con, train = build_configs(args, *FINETUNE_CONFIGS)
    assert (train.lora, train.lora_r, train.lora_alpha, train.lora_dropout) == (True, 64, 16, 0.1)
    assert (con.group_size, con.temperature, con.query_max_length, con.passage_max_length) == (16, 0.01, 64, 160)
    assert con.cross_device and train.learning_rate == 3e-4 and train.epochs == 1 and prompt.query_prompt == "next"


# glibc keeps freed memory for reuse, so that a process's resident memory grows past what it holds; with a fixed
# mmap threshold large blocks go back to the system when freed, and the peak follows the tensors held.
LIVE_MEMORY = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def planned_mib(command: list[str]) -> float:
    """The memory a process needs by `llama2vec ... --dry-run` for 2 processes on this machine, MiB."""
    shown = launch(*command[command.index("llama2vec"):], "--dry-run", WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                   RANK="0", LOCAL_RANK="0")
    return float(re.search(r"peak \(held \+ the larger phase\) +([\d.]+) GiB", shown).group(1)) * 1024


@pytest.mark.slow
@pytest.mark.integration
def test_the_adaptation_recipe_runs_on_the_bundled_model_under_fsdp(tmp_path):
    """The paper's adaptation recipe on SmolLM2 under torchrun, 2 CPU processes, --fsdp and --fsdp-offload, for
    2 steps: it trains and saves a plain model folder and its sharded checkpoint (resumed exactly: see
    test_adapt's FSDP test). Its dry run's memory a process is within 25% of each process's measured peak, with
    --fsdp and without (DDP)."""
    from llama2vec.models import resolve_model_path

    resolve_model_path("smollm2")  # converted once, before two processes would race to
    corpus = tmp_path / "wiki.jsonl"
    corpus.write_text("".join(json.dumps({"id": str(i), "title": f"T{i}", "text": " ".join(SENTENCES * 4)}) + "\n"
                              for i in range(4)))
    out = tmp_path / "adapted"
    command = ["torch.distributed.run", "--nproc-per-node", "2", "-m", "llama2vec", "adapt",
               "--config", str(CONFIGS / "paper" / "adapt-llama2-7b.yaml"), "--model", "smollm2", "--device", "cpu",
               "--corpus", str(corpus), "--output", str(out), "--max-steps", "2", "--batch-size", "1",
               "--grad-accum", "2", "--max-length", "32", "--logging-steps", "1", "--fsdp", "--fsdp-offload"]
    launch(*command, **LIVE_MEMORY)
    plan = planned_mib(command)
    peaks = [json.loads(p.read_text())["peak_rss_mib"]["end"] for p in sorted((out / "ranks").iterdir())]
    assert len(peaks) == 2 and all(abs(plan - peak) <= 0.25 * peak for peak in peaks), (plan, peaks)
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2] and (out / "llama2vec_config.json").is_file()
    saved = yaml.safe_load((out / "run_config.yaml").read_text())
    assert saved["train"]["learning_rate"] == 1e-5 and saved["train"]["gradient_checkpointing"] is True
    assert saved["train"]["fsdp_offload"] is True and (out / "checkpoints" / "checkpoint-2" / "fsdp").is_dir()

    ddp = [c for c in command if c not in ("--fsdp", "--fsdp-offload")]  # a whole copy a process
    ddp[ddp.index(str(out))] = str(tmp_path / "ddp")
    ddp[ddp.index("--max-steps") + 1] = "1"
    launch(*ddp, **LIVE_MEMORY)
    plan = planned_mib(ddp)
    peaks = [json.loads(p.read_text())["peak_rss_mib"]["end"] for p in sorted((tmp_path / "ddp" / "ranks").iterdir())]
    assert len(peaks) == 2 and all(abs(plan - peak) <= 0.25 * peak for peak in peaks), (plan, peaks)
