"""The shipped configs: accelerate launch files that accelerate reads, and the paper's recipes, whose every
option llama2vec knows and which run on the bundled SmolLM2 with only the model, data and size overridden."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import SENTENCES

from llama2vec.adapt import ADAPT_CONFIGS
from llama2vec.cli import build_parser, main
from llama2vec.config import FINETUNE_CONFIGS, build_configs

CONFIGS = Path(__file__).parent.parent / "configs"


@pytest.mark.parametrize("name, kind", [("ddp", "MULTI_GPU"), ("fsdp", "FSDP"), ("deepspeed-zero2", "DEEPSPEED"),
                                        ("deepspeed-zero3", "DEEPSPEED")])
def test_accelerate_reads_the_launch_configs(name, kind):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(CONFIGS / "accelerate" / f"{name}.yaml"))
    assert config.distributed_type.value == kind and config.mixed_precision == "bf16"
    if kind == "FSDP":
        assert config.fsdp_config["fsdp_version"] == 2
        assert config.fsdp_config["fsdp_transformer_layer_cls_to_wrap"] == "LlamaDecoderLayer"
        assert config.fsdp_config["fsdp_state_dict_type"] == "FULL_STATE_DICT"
    if kind == "DEEPSPEED":
        assert config.deepspeed_config["zero_stage"] == int(name[-1])
        paper = yaml.safe_load((CONFIGS / "paper" / "adapt-llama2-7b.yaml").read_text())
        assert config.deepspeed_config["gradient_accumulation_steps"] == paper["train"]["grad_accum"]


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


@pytest.mark.slow
@pytest.mark.integration
def test_the_adaptation_recipe_runs_on_the_bundled_model(tmp_path):
    corpus = tmp_path / "wiki.jsonl"
    corpus.write_text("".join(json.dumps({"id": str(i), "title": f"T{i}", "text": " ".join(SENTENCES * 4)}) + "\n"
                              for i in range(4)))
    out = tmp_path / "adapted"
    assert main(["adapt", "--config", str(CONFIGS / "paper" / "adapt-llama2-7b.yaml"), "--model", "smollm2",
                 "--corpus", str(corpus), "--output", str(out), "--max-steps", "2", "--batch-size", "2",
                 "--grad-accum", "2", "--max-length", "48", "--logging-steps", "1"]) == 0
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2] and (out / "llama2vec_config.json").is_file()
    saved = yaml.safe_load((out / "run_config.yaml").read_text())
    assert saved["train"]["learning_rate"] == 1e-5 and saved["train"]["gradient_checkpointing"] is True
