"""`llama2vec finetune`: contrastive fine-tuning for retrieval (InfoNCE with hard, in-batch and
cross-process negatives). Queries use the NEXT prompt, passages the SELF prompt."""

from __future__ import annotations

import hashlib
import logging
import random
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .card import record_training, write_card
from .collate import left_pad
from .config import (
    ContrastiveConfig,
    FinetuneTrainConfig,
    ModelConfig,
    PromptConfig,
    save_resolved,
    to_dict,
)
from .encoder import pool, truncation
from .errors import Llama2VecError
from .formats import TrainExample, read_train
from .losses import last_states, unwrap_lm
from .models import add_placeholder_tokens, apply_lora, resolve_device, resolve_model_path
from .prompts import CONFIG_NAME, PromptIds, PromptSpec, cut, prompt_ids, resolve_prompt, text_rule
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


# --------------------------------------------------------------------------------------------
# The loss


def infonce(q: torch.Tensor, p: torch.Tensor, temperature: float, group_size: int, offset: int = 0) -> torch.Tensor:
    """InfoNCE over cosine scores.

    q (B, H) and p (N, H) L2-normalised; p holds consecutive groups of `group_size` passages,
    the first of each group the positive. Query i's positive is p[(offset + i) * group_size];
    every other passage (its hard negatives, other queries' passages) is a negative.
    """
    scores = q @ p.T / temperature  # (B, N)
    target = (offset + torch.arange(q.shape[0], device=q.device)) * group_size  # (B,)
    return F.cross_entropy(scores.float(), target)


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every process's gradient for this process's rows, so the
    loss of each process trains the passages of all (equal row counts on every process)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)  # (W * N, H)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        n = grad.shape[0] // dist.get_world_size()
        return grad[dist.get_rank() * n: (dist.get_rank() + 1) * n]


def gather_passages(p: torch.Tensor) -> tuple[torch.Tensor, int]:
    """All processes' passages (differentiable, in rank order) and this process's rank.
    Every process holds the same number of queries (accelerate evens the batches)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return p, 0
    return _GatherWithGrad.apply(p), dist.get_rank()


class ContrastiveModel(nn.Module):
    """forward(batch) -> {'loss', 'accuracy'}: embeds queries and passages, then InfoNCE."""

    def __init__(self, model: nn.Module, k: int, pooling: str, temperature: float, group_size: int,
                 cross_device: bool = True):
        super().__init__()
        self.model, self.k, self.pooling = model, k, pooling
        self.temperature, self.group_size, self.cross_device = temperature, group_size, cross_device

    def embed(self, input_ids, attention_mask, position_ids) -> torch.Tensor:
        states = last_states(unwrap_lm(self.model), input_ids, position_ids, attention_mask, self.k)  # (B, K, H)
        return pool(states, self.pooling)  # (B, H)

    def forward(self, **batch: torch.Tensor) -> dict[str, torch.Tensor]:
        q = self.embed(batch["q_input_ids"], batch["q_attention_mask"], batch["q_position_ids"])  # (B, H)
        p = self.embed(batch["p_input_ids"], batch["p_attention_mask"], batch["p_position_ids"])  # (B*G, H)
        offset = 0
        if self.cross_device:
            p, rank = gather_passages(p)
            offset = rank * q.shape[0]  # index of this process's first query in the global batch
        loss = infonce(q, p, self.temperature, self.group_size, offset)
        with torch.no_grad():
            scores = q @ p.T  # (B, N)
            target = (offset + torch.arange(q.shape[0], device=q.device)) * self.group_size
            accuracy = (scores.argmax(dim=1) == target).float().mean()
        return {"loss": loss, "accuracy": accuracy}


# --------------------------------------------------------------------------------------------
# Data


class GroupDataset:
    """Item i: the query and a group of passages (a positive, then group_size-1 negatives),
    drawn reproducibly from (seed, i)."""

    def __init__(self, examples: list[TrainExample], group_size: int, seed: int):
        self.examples, self.group_size, self.seed = examples, group_size, seed

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict:
        e = self.examples[i]
        rng = random.Random(int(hashlib.sha1(f"{self.seed}:{i}".encode()).hexdigest(), 16))
        n = self.group_size - 1
        negs = rng.sample(e.neg, n) if len(e.neg) >= n else [rng.choice(e.neg) for _ in range(n)] if n else []
        return {"query": e.query, "passages": [rng.choice(e.pos), *negs]}


class ContrastiveCollator:
    """Tokenises queries and passages into left-padded batches, cut and prompted as the encoder does
    (`prompts.text_rule`, on the tokenizer's truncation side)."""

    def __init__(self, tokenizer, ids: PromptIds, spec: PromptSpec):
        self.tokenizer, self.ids, self.spec = tokenizer, ids, spec

    def rows(self, texts: list[str], kind: str) -> list[list[int]]:
        limit, task = text_rule(self.spec, kind)
        side = self.tokenizer.truncation_side
        return [self.ids.wrap(cut(t, limit, side), task)
                for t in self.tokenizer(texts, add_special_tokens=False)["input_ids"]]

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        pad = self.tokenizer.pad_token_id
        q = left_pad(self.rows([e["query"] for e in examples], "query"), pad)
        p = left_pad(self.rows([t for e in examples for t in e["passages"]], "passage"), pad)
        batch = {f"q_{k}": v for k, v in zip(("input_ids", "attention_mask", "position_ids"), q)}
        batch.update({f"p_{k}": v for k, v in zip(("input_ids", "attention_mask", "position_ids"), p)})
        batch["n_tokens"] = q[1].sum() + p[1].sum()
        return batch


def training_truncation(tokenizer, examples: list[TrainExample], query_max_length: int,
                        passage_max_length: int) -> dict:
    """How many distinct queries and passages of the training data are cut (logged when any are)."""
    queries = list(dict.fromkeys(e.query for e in examples))
    passages = list(dict.fromkeys(p for e in examples for p in e.pos + e.neg))
    out = {}
    for name, texts, limit in (("queries", queries, query_max_length), ("passages", passages, passage_max_length)):
        lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
        out[name] = truncation(lengths, limit, f"training {name}")
    return out


# --------------------------------------------------------------------------------------------
# The stage




def finetune(model_cfg: ModelConfig, prompt_cfg: PromptConfig, con_cfg: ContrastiveConfig,
             train_cfg: FinetuneTrainConfig) -> dict:
    """Fine-tune `model_cfg.model` (a llama2vec folder keeps its prompt; any causal LM gets the
    prompt options) on `con_cfg.train`; write a llama2vec model folder to `train_cfg.output`."""
    if not con_cfg.train:
        raise Llama2VecError("--train is required")
    examples = read_train(con_cfg.train, min_negatives=1 if con_cfg.group_size > 1 else 0,
                          limit=con_cfg.max_examples or None)
    out = prepare_output(train_cfg)
    path = resolve_model_path(model_cfg.model)
    model_cfg, precision = resolve_precision(model_cfg, train_cfg)
    device = resolve_device(model_cfg.device)  # the process group and this process's device come first
    accelerator = make_accelerator(train_cfg, device, out, precision)
    tokenizer, lm = load_training_lm(model_cfg, train_cfg, device, path)
    if (Path(path) / CONFIG_NAME).is_file():
        spec = PromptSpec.load(path)
        log.info("using the prompt saved with %s (%s preset)", path, spec.preset)
    else:
        spec = resolve_prompt(prompt_cfg)
    spec.max_length, spec.query_max_length = con_cfg.passage_max_length, con_cfg.query_max_length
    spec.query_task = prompt_cfg.query_prompt
    placeholder_ids = add_placeholder_tokens(tokenizer, lm, spec.new_tokens())
    ids = prompt_ids(spec, tokenizer)
    accelerator.wait_for_everyone()  # the main process has made the output folder
    if is_main_rank():
        save_resolved(out / "run_config.yaml", model_cfg, prompt_cfg, con_cfg, train_cfg, extra={"command": "finetune"})

    torch.manual_seed(train_cfg.seed)
    if train_cfg.gradient_checkpointing:
        lm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    head = lm.get_output_embeddings()
    if head is not None and head.weight is not lm.get_input_embeddings().weight:
        # Embeddings never reach an untied LM head, and DDP wants every trainable weight used.
        head.weight.requires_grad_(False)
    if train_cfg.lora:
        lm = apply_lora(lm, train_cfg.lora_r, train_cfg.lora_alpha, train_cfg.lora_dropout, placeholder_ids)
    module = ContrastiveModel(lm, spec.k, spec.pooling, con_cfg.temperature, con_cfg.group_size, con_cfg.cross_device)
    dataset = GroupDataset(examples, con_cfg.group_size, train_cfg.seed)
    collator = ContrastiveCollator(tokenizer, ids, spec)
    truncated = training_truncation(tokenizer, examples, con_cfg.query_max_length, con_cfg.passage_max_length)
    flat = {k: v for group in to_dict(model_cfg, con_cfg, train_cfg).values() for k, v in group.items()}
    result = run_training(accelerator, module, dataset, collator, train_cfg, out, "finetune", flat)

    finish(accelerator, result, tokenizer, spec, out, train_cfg.gradient_checkpointing)
    if is_main_rank():
        record_training(out, result)
        write_card(out)
    result.update(examples=len(examples), truncation=truncated)
    return result
