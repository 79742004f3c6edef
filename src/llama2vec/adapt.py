"""`llama2vec adapt`: unsupervised Llama2Vec adaptation (EBAE + EBAR) of a causal LM."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from .card import record_training, write_card
from .collate import PretextCollator, excluded_target_ids
from .config import DataConfig, ModelConfig, PretextConfig, PromptConfig, TrainConfig, save_resolved, to_dict
from .data import PairDataset, build_pair_cache, check_pair_cache, pair_cache_fingerprint, wait_for_pair_cache
from .encoder import truncation
from .errors import Llama2VecError
from .losses import PretextModel, PretextWeights
from .models import add_placeholder_tokens, apply_lora, resolve_device
from .prompts import prompt_ids, resolve_prompt
from .train import (
    finish,
    is_main_rank,
    load_training_lm,
    make_accelerator,
    prepare_output,
    resolve_precision,
    run_training,
)

log = logging.getLogger(__name__)

ADAPT_CONFIGS = (ModelConfig, PromptConfig, PretextConfig, DataConfig, TrainConfig)


def pair_cache(corpus: Path, tokenizer, folder: Path, data_cfg: DataConfig, builds: bool) -> Path:
    """The (text, next text) pairs: a cache made ahead (--pairs), or one that the process that `builds`
    writes into `folder` while the others wait for it."""
    if data_cfg.pairs:
        return check_pair_cache(data_cfg.pairs, tokenizer)
    chunk_tokens = data_cfg.chunk_tokens or data_cfg.max_length
    if builds:
        return build_pair_cache(corpus, tokenizer, folder, chunk_tokens, data_cfg.min_chunk_tokens,
                                data_cfg.max_documents, workers=data_cfg.chunk_workers)
    fp = pair_cache_fingerprint(corpus, tokenizer, chunk_tokens, data_cfg.min_chunk_tokens, data_cfg.max_documents)
    return wait_for_pair_cache(folder, fp)


def adapt(model_cfg: ModelConfig, prompt_cfg: PromptConfig, pretext_cfg: PretextConfig, data_cfg: DataConfig,
          train_cfg: TrainConfig) -> dict:
    """Adapt `model_cfg.model` on `data_cfg.corpus`; write the adapted model to `train_cfg.output`.

    Returns a summary: output folder, steps, seconds, last logged losses and (on the main
    process) the trained model as saved.
    """
    if not data_cfg.corpus and not data_cfg.pairs:
        raise Llama2VecError("--corpus (or --pairs) is required")
    corpus = Path(data_cfg.corpus or "")
    if not data_cfg.pairs and not corpus.is_file():
        raise Llama2VecError(f"{corpus}: corpus file not found")
    if pretext_cfg.joint and model_cfg.attn_implementation == "flash_attention_2":
        raise Llama2VecError("the joint pass needs a 4-D attention mask, which flash_attention_2 does not take: use "
                             "--attn-implementation sdpa, or --no-joint (two passes, about 1.8x the compute)")
    out = prepare_output(train_cfg)
    model_cfg, precision = resolve_precision(model_cfg, train_cfg)
    device = resolve_device(model_cfg.device)  # the process group and this process's device come first
    accelerator = make_accelerator(train_cfg, device, out, precision)
    tokenizer, lm = load_training_lm(model_cfg, train_cfg, device)
    accelerator.wait_for_everyone()  # the main process has made the output folder
    spec = resolve_prompt(prompt_cfg, data_cfg.max_length)
    placeholder_ids = add_placeholder_tokens(tokenizer, lm, spec.new_tokens())
    ids = prompt_ids(spec, tokenizer)
    if is_main_rank():
        save_resolved(out / "run_config.yaml", model_cfg, prompt_cfg, pretext_cfg, data_cfg, train_cfg,
                  extra={"command": "adapt"})

    cache = pair_cache(corpus, tokenizer, out / "data" / "pairs", data_cfg, accelerator.is_main_process)
    dataset = PairDataset(cache)
    log.info("adaptation data: %s", dataset.meta)
    chunk_lengths = np.diff(dataset.offsets)  # tokens of every chunk, (C,)
    pair_chunks = np.concatenate([dataset.pairs, dataset.pairs + 1])  # texts and next texts
    cut = truncation(chunk_lengths[pair_chunks].tolist(), data_cfg.max_length, "adaptation chunks")
    collator = PretextCollator(ids, tokenizer.pad_token_id, excluded_target_ids(tokenizer, ids, pretext_cfg.stopwords),
                               data_cfg.max_length, joint=pretext_cfg.joint, lm=pretext_cfg.lm_weight > 0)

    torch.manual_seed(train_cfg.seed)
    if train_cfg.gradient_checkpointing:
        lm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if train_cfg.lora:
        lm = apply_lora(lm, train_cfg.lora_r, train_cfg.lora_alpha, train_cfg.lora_dropout, placeholder_ids)
    module = PretextModel(lm, PretextWeights(pretext_cfg.ebae_weight, pretext_cfg.ebar_weight, pretext_cfg.lm_weight))
    flat = {k: v for group in to_dict(model_cfg, pretext_cfg, data_cfg, train_cfg).values() for k, v in group.items()}
    lengths = dataset.text_lengths() if data_cfg.group_by_length else None
    result = run_training(accelerator, module, dataset, collator, train_cfg, out, "adapt", flat, lengths=lengths)

    finish(accelerator, result, tokenizer, spec, out, train_cfg.gradient_checkpointing)
    if is_main_rank():
        record_training(out, result)
        write_card(out)
    result.update(pairs=len(dataset), data=dataset.meta, truncation=cut)
    return result
