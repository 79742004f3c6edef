"""Typed configuration: dataclasses grouped by concern, read from YAML and overridden by flags.

Every field becomes a command-line flag (``learning_rate`` -> ``--learning-rate``) whose help is
the field's ``help`` metadata. A YAML/JSON file given with ``--config`` supplies values first;
flags given on the command line win. The resolved configuration is saved beside every output.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .errors import Llama2VecError
from .store import atomic_write, check_text, parse_json_text, read_text_file


def opt(default: Any, help: str, **extra: Any) -> Any:
    """A dataclass field with a default and a help text for its flag."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **extra})
    return field(default=default, metadata={"help": help, **extra})


# --------------------------------------------------------------------------------------------
# Configuration groups


# Encoding backends (see Llama2Vec.from_pretrained).
BACKENDS = ("torch", "torch-bfloat16", "torch-compile", "onnx-int8", "onnx")

# Training precisions (see TrainConfig.precision).
PRECISIONS = ("auto", "fp32", "bf16-mixed", "bf16")


@dataclass
class ModelConfig:
    model: str = opt("smollm2", "Hub id, local Hugging Face folder, or 'smollm2' (bundled default).")
    dtype: str = opt("auto", "auto (float32 on CPU, bfloat16 on CUDA), float32, bfloat16 or float16.")
    device: str = opt("auto", "auto, cpu, cuda or cuda:N.")
    attn_implementation: str = opt("sdpa", "Attention kernel: sdpa, eager, or flash_attention_2 (needs the flash-attn "
                                           "package and a GPU; takes no 4-D mask, so not for adapt's joint pass).")

    def __post_init__(self) -> None:
        _check_choice("dtype", self.dtype, ("auto", "float32", "bfloat16", "float16"))
        _check_choice("attn_implementation", self.attn_implementation, ("sdpa", "eager", "flash_attention_2"))
        if self.attn_implementation == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
            raise Llama2VecError("attn_implementation flash_attention_2 needs the flash-attn package "
                                 "(pip install 'llama2vec[gpu]' on a CUDA machine)")


@dataclass
class PromptConfig:
    """How a text is wrapped so that the LLM writes its embedding at placeholder positions.

    A text T becomes ``[BOS] prefix T self_suffix <self placeholders>`` (SELF prompt, used by
    EBAE and for passages) or ``[BOS] prefix T next_suffix <next placeholders>`` (NEXT prompt, used
    by EBAR and for queries). The embedding is pooled over the placeholder positions.
    """

    prompt_preset: str = opt("llara", "Prompt preset: llara (8 placeholders, mean) or paper (1, last).")
    prefix: str | None = opt(None, "Text before T (preset default if unset).")
    self_suffix: str | None = opt(None, "Text between T and the SELF placeholders.")
    next_suffix: str | None = opt(None, "Text between T and the NEXT placeholders.")
    num_placeholders: int | None = opt(None, "K: placeholders per task (llara preset only).")
    pooling: str | None = opt(None, "Pooling of placeholder hidden states: mean or last.")
    query_prompt: str = opt("next", "Prompt for queries at retrieval time: next (NEXT prompt) or self.")

    def __post_init__(self) -> None:
        _check_choice("prompt_preset", self.prompt_preset, ("llara", "paper"))
        _check_choice("query_prompt", self.query_prompt, ("next", "self"))
        if self.pooling is not None:
            _check_choice("pooling", self.pooling, ("mean", "last"))
        if self.num_placeholders is not None and self.num_placeholders < 1:
            raise Llama2VecError("num_placeholders must be at least 1")


@dataclass
class PretextConfig:
    ebae_weight: float = opt(1.0, "Weight of the EBAE loss (predict the text's own tokens).")
    ebar_weight: float = opt(1.0, "Weight of the EBAR loss (predict the next passage's tokens).")
    lm_weight: float = opt(0.0, "Weight of an extra next-token LM loss on T (released code: 1).")
    stopwords: bool = opt(False, "Leave English stopwords and punctuation out of the targets.")
    joint: bool = opt(True, "One joint pass for both tasks (else two separate passes).")


@dataclass
class DataConfig:
    corpus: str | None = opt(None, "Corpus: JSONL {text[,title,id]}, .txt (blank-line blocks) or .parquet.")
    max_length: int = opt(128, "Tokens of T kept per example (prompt excluded).")
    chunk_tokens: int | None = opt(None, "Target tokens per chunk (default: max_length).")
    min_chunk_tokens: int = opt(16, "Chunks shorter than this are dropped.")
    max_documents: int | None = opt(None, "Read at most this many documents.")
    group_by_length: bool = opt(True, "Batch chunks of similar length together (less padding).")
    pairs: str | None = opt(None, "A pair cache made ahead by `llama2vec data chunk`, used instead of --corpus.")
    chunk_workers: int = opt(1, "Processes that chunk the corpus into the pair cache.")

    def __post_init__(self) -> None:
        if self.max_length < 1:
            raise Llama2VecError("max_length must be positive")


@dataclass
class TrainConfig:
    output: str | None = opt(None, "Output folder for the model, checkpoints and logs.")
    max_steps: int = opt(-1, "Optimizer steps to run (-1: use --epochs).")
    epochs: float = opt(1.0, "Passes over the data when --max-steps is not set.")
    batch_size: int = opt(8, "Examples per device per step.")
    grad_accum: int = opt(1, "Gradient accumulation steps.")
    learning_rate: float = opt(5e-5, "Peak learning rate.")
    warmup_steps: int = opt(10, "Linear warm-up steps.")
    weight_decay: float = opt(0.0, "AdamW weight decay.")
    seed: int = opt(42, "Random seed (model init of new tokens, data order, dropout).")
    lora: bool = opt(False, "Train LoRA adapters (merged on save) instead of all weights.")
    lora_r: int = opt(64, "LoRA rank.")
    lora_alpha: int = opt(16, "LoRA alpha.")
    lora_dropout: float = opt(0.1, "LoRA dropout.")
    precision: str = opt("auto", "fp32; bf16-mixed (bfloat16 compute, float32 weights and optimizer states); "
                                 "bf16 (bfloat16 weights too: half the memory, but updates under 1/256 of a weight "
                                 "are lost). auto: bf16-mixed on CUDA, fp32 on CPU.")
    gradient_checkpointing: bool = opt(False, "Recompute activations in backward to save memory.")
    fsdp: bool = opt(False, "Shard weights, gradients and optimizer states over the processes with torch's FSDP2 "
                            "(each decoder layer one unit), on any device under torchrun; all weights only. The "
                            "main process reads the model, the others receive their shards: one whole copy in all.")
    fsdp_offload: bool = opt(False, "With --fsdp: keep the sharded weights, gradients and optimizer states in CPU "
                                    "memory (the optimizer steps there); a GPU holds only the layers being computed.")
    max_grad_norm: float = opt(1.0, "Clip the gradients' global norm to this (0: no clipping).")
    logging_steps: int = opt(10, "Log losses every N steps.")
    save_steps: int = opt(50, "Write a checkpoint every N steps.")
    save_total_limit: int = opt(2, "Checkpoints kept.")
    overwrite: bool = opt(False, "Delete an existing output folder first.")
    resume: bool = opt(False, "Continue from the last complete checkpoint in the output folder.")

    def __post_init__(self) -> None:
        if self.overwrite and self.resume:
            raise Llama2VecError("--overwrite and --resume exclude each other")
        if self.batch_size < 1 or self.grad_accum < 1:
            raise Llama2VecError("batch_size and grad_accum must be positive")
        _check_choice("precision", self.precision, PRECISIONS)
        if self.fsdp and self.lora:
            raise Llama2VecError("--fsdp trains all weights (--full); LoRA adapters are small enough for DDP")
        if self.fsdp_offload and not self.fsdp:
            raise Llama2VecError("--fsdp-offload goes with --fsdp")
        if self.max_grad_norm < 0:
            raise Llama2VecError("max_grad_norm must be 0 (no clipping) or positive")


@dataclass
class ContrastiveConfig:
    train: str | None = opt(None, "Training JSONL: {query, pos: [...], neg: [...]} per line.")
    group_size: int = opt(4, "Passages per query: 1 positive + group_size-1 hard negatives.")
    temperature: float = opt(0.02, "Softmax temperature on cosine scores.")
    query_max_length: int = opt(64, "Tokens of a query kept (prompt excluded).")
    passage_max_length: int = opt(128, "Tokens of a passage kept (prompt excluded).")
    cross_device: bool = opt(True, "Use the passages of every process as negatives when distributed.")
    max_examples: int | None = opt(None, "Use only the first N training examples.")

    def __post_init__(self) -> None:
        if self.group_size < 1:
            raise Llama2VecError("group_size must be at least 1")
        if self.temperature <= 0:
            raise Llama2VecError("temperature must be positive")


@dataclass
class FinetuneTrainConfig(TrainConfig):
    lora: bool = opt(True, "Train LoRA adapters (merged on save); --full trains all weights.")
    learning_rate: float = opt(1e-4, "Peak learning rate.")
    batch_size: int = opt(4, "Queries per device per step.")
    lora_r: int = opt(16, "LoRA rank.")
    lora_alpha: int = opt(32, "LoRA alpha.")


FINETUNE_CONFIGS = (ModelConfig, PromptConfig, ContrastiveConfig, FinetuneTrainConfig)


# --------------------------------------------------------------------------------------------
# Flags and YAML


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise Llama2VecError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


def _base_type(tp: Any) -> Any:
    """int | None -> int; Literal handled as str."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _base_type(args[0])
    if typing.get_origin(tp) is Literal:
        return str
    return tp


def add_flags(parser: argparse.ArgumentParser, *classes: type, aliases: dict[str, list[str]] | None = None) -> None:
    """Add one flag per dataclass field. Defaults are suppressed so that unset flags are absent."""
    aliases = aliases or {}
    for cls in classes:
        group = parser.add_argument_group(cls.__name__.removesuffix("Config").lower())
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            tp = _base_type(hints[f.name])
            names = [f"--{f.name.replace('_', '-')}", *aliases.get(f.name, [])]
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            help_text = f.metadata.get("help", "") + ("" if default is None else f" (default: {default})")
            if tp is bool:
                group.add_argument(*names, dest=f.name, action=argparse.BooleanOptionalAction,
                                   default=argparse.SUPPRESS, help=help_text)
            else:
                group.add_argument(*names, dest=f.name, type=tp, default=argparse.SUPPRESS,
                                   help=help_text, metavar=f.name.upper())
    parser.add_argument("--config", type=Path, default=None,
                        help="YAML or JSON file of options; flags given here override it.")


class _YamlLoader(yaml.SafeLoader):
    """SafeLoader whose constructor errors (``!!int abc``, ``!!timestamp x``, the date 2024-13-45
    raise ValueError, KeyError, AttributeError...) become YAML errors at the node's line."""

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep)
        except (yaml.YAMLError, RecursionError):
            raise
        except Exception as e:
            raise yaml.constructor.ConstructorError(None, None, f"bad value: {e}", node.start_mark) from None


def _parse_yaml(path: Path, text: str) -> Any:
    """YAML (safe tags only); errors name the file and line."""
    try:
        return yaml.load(text, Loader=_YamlLoader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise Llama2VecError(f"{where}: not valid YAML: {e.problem or e.context}") from None
    except yaml.reader.ReaderError as e:
        line = text[: e.position].count("\n") + 1
        raise Llama2VecError(f"{path}:{line}: not valid YAML: {e.reason}") from None
    except (yaml.YAMLError, RecursionError) as e:
        raise Llama2VecError(f"{path}: not valid YAML: {e}") from None


def load_config_file(path: Path | None) -> dict[str, Any]:
    """Read a flat or grouped YAML/JSON mapping of option names to values (a .json file as strict
    JSON, any other as YAML). Errors name the file, and the line where there is one."""
    if path is None:
        return {}
    text = read_text_file(path, "config file not found")
    if not text.strip():
        return {}
    data = parse_json_text(path, text) if path.suffix.lower() == ".json" else _parse_yaml(path, text)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise Llama2VecError(f"{path}: the top level must be a mapping of option names to values")
    flat: dict[str, Any] = {}
    for key, value in data.items():
        group = value.items() if isinstance(value, dict) else [(key, value)]  # grouped: {train: {learning_rate: ...}}
        for name, v in group:
            if not isinstance(name, str):
                raise Llama2VecError(f"{path}: option names must be strings, got {name!r:.60}")
            flat[name.replace("-", "_")] = v
    return flat


def _file_value(path: Path, name: str, value: Any, hint: Any) -> Any:
    """A config file's value for field `name`, checked against the field's type. Numbers may be
    written as text, as on the command line (YAML reads 5e-5 as a string)."""
    tp, optional = _base_type(hint), type(None) in typing.get_args(hint)
    if value is None and optional:
        return None
    if tp is bool and isinstance(value, bool):
        return value
    if tp is str and isinstance(value, str):
        check_text(value, f"{path}: option {name!r}")
        return value
    if tp in (int, float) and isinstance(value, (int, float, str)) and not isinstance(value, bool):
        try:
            number = tp(value) if tp is float or not isinstance(value, float) else None
        except (ValueError, OverflowError):
            number = None
        if number is not None and (tp is int or math.isfinite(number)):
            return number
    kind = {bool: "true or false", int: "an integer", float: "a finite number", str: "a string"}.get(tp, str(tp))
    raise Llama2VecError(f"{path}: option {name!r} must be {kind}{' or null' if optional else ''}, got {value!r:.60}")


def build_configs(args: argparse.Namespace, *classes: type) -> list[Any]:
    """Instantiate each dataclass from (config file values, then flags). The file's values are
    checked against the field types, and an error they cause names the file."""
    path = getattr(args, "config", None)
    values = load_config_file(path)
    flags = {k: v for k, v in vars(args).items() if k not in ("config", "func", "command", "verbose", "log_file")}
    hints = {}
    for cls in classes:
        cls_hints = typing.get_type_hints(cls)
        hints.update({f.name: cls_hints[f.name] for f in dataclasses.fields(cls)})
    unknown = sorted((set(values) | set(flags)) - set(hints))
    if unknown:
        where = f"{path}: " if set(unknown) & set(values) else ""
        raise Llama2VecError(f"{where}unknown option(s) in the config file: {', '.join(unknown)}")
    from_file = {k: _file_value(path, k, v, hints[k]) for k, v in values.items() if k not in flags}
    values = {**from_file, **flags}
    out = []
    for cls in classes:
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in values.items() if k in names}
        where = f"{path}: " if names & set(from_file) else ""
        try:
            out.append(cls(**kwargs))
        except Llama2VecError as e:
            raise Llama2VecError(f"{where}{e}") from None
        except (TypeError, ValueError) as e:
            raise Llama2VecError(f"{where}bad option value: {e}") from None
    return out


def to_dict(*configs: Any) -> dict[str, dict[str, Any]]:
    """Group name -> field values, for saving beside outputs."""
    return {type(c).__name__.removesuffix("Config").lower(): dataclasses.asdict(c) for c in configs}


def save_resolved(path: Path, *configs: Any, extra: dict[str, Any] | None = None) -> None:
    data = to_dict(*configs)
    if extra:
        data.update(extra)
    text = json.dumps(data, indent=2) if path.suffix == ".json" else yaml.safe_dump(data, sort_keys=False)
    atomic_write(path, text)
