"""`Llama2Vec`: encode queries and passages with an (adapted, fine-tuned or plain) causal LM
(`llama2vec encode` writes them to folders: see `embeddings`).

Queries use the prompt named by the model's `query_task` (NEXT by default, as in the method);
passages use the SELF prompt. Embeddings are pooled over the placeholder positions and
L2-normalised, so the inner product is the cosine similarity.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import numpy as np
import torch

from .collate import left_pad
from .config import BACKENDS, ModelConfig, PromptConfig
from .errors import Llama2VecError
from .formats import passage_text
from .losses import last_states, unwrap_lm
from .models import add_placeholder_tokens, load_causal_lm, resolve_model_path
from .onnx_int8 import OnnxDecoder, cached_export
from .prompts import CONFIG_NAME, LLARA_K, PromptIds, PromptSpec, cut, prompt_ids, resolve_prompt, text_rule

log = logging.getLogger(__name__)


def pool(states: torch.Tensor, how: str) -> torch.Tensor:
    """(B, K, H) placeholder states -> (B, H) L2-normalised embeddings."""
    emb = states.mean(dim=1) if how == "mean" else states[:, -1]
    return torch.nn.functional.normalize(emb.float(), dim=-1)


def embed_ids(model, ids: PromptIds, rows: list[list[int]], task: str, pad_id: int, pooling: str,
              onnx: OnnxDecoder | None = None, states_fn=None) -> torch.Tensor:
    """Embeddings (B, H) of tokenised texts (prompt not yet added) for task 'self' or 'next'.
    Differentiable: the contrastive trainer calls it too. With `onnx`, ONNX Runtime runs the decoder;
    with `states_fn`, that function runs the torch model in place of `last_states` (the compiled one)."""
    input_ids, mask, positions = left_pad([ids.wrap(r, task) for r in rows], pad_id)  # (B, L) each
    if onnx is not None:
        return pool(onnx(input_ids, mask, positions), pooling)
    device = next(model.parameters()).device
    states = (states_fn or last_states)(unwrap_lm(model), input_ids.to(device), positions.to(device),
                                        mask.to(device), ids.k)
    return pool(states, pooling)  # the K embedding tokens close every row


def compiled_last_states(device: torch.device):
    """`last_states` compiled by TorchInductor with the weights frozen into the graph
    (`torch.compile(..., options={"freezing": True})`): the norms, rotary embedding, activation and
    residual additions, one pass over the activations each in eager torch, fuse into few loops.
    Shapes are dynamic, so one compilation serves every batch; a one-row batch, which the compiler
    would specialise in a graph of its own, runs as two copies of its row. Inference only: the
    weights are read at the first call."""
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("clang++")
    if device.type == "cpu" and not compiler:
        raise Llama2VecError("backend torch-compile needs a C++ compiler (g++ or clang++, or CXX set)")
    compiled = torch.compile(last_states, dynamic=True, options={"freezing": True})

    def states(lm, input_ids, position_ids, attention_mask, k: int) -> torch.Tensor:
        if input_ids.shape[0] > 1:
            return compiled(lm, input_ids, position_ids, attention_mask, k)
        rows = (t.repeat(2, 1) for t in (input_ids, position_ids, attention_mask))
        return compiled(lm, *rows, k)[:1]

    return states


DEFAULT_MAX_LENGTH = 128
LLARA_MAX_LENGTH = 512  # the released LLaRA checkpoints' cards keep texts up to 512 tokens


def is_llara_checkpoint(path: str, tokenizer=None) -> bool:
    """A released LLaRA checkpoint (BAAI/LLARA-pretrain, -passage, -document, -beir, or one trained with
    their code): no llama2vec_config.json, and its tokenizer (loaded when not given) already holds the
    16 placeholders."""
    from .models import load_tokenizer

    if (Path(path) / CONFIG_NAME).is_file():
        return False
    vocab = (tokenizer or load_tokenizer(path)).get_vocab()
    return all(f"<s{i}>" in vocab for i in range(1, 2 * LLARA_K + 1))


def model_spec(name: str, prompt: PromptConfig | None = None, max_length: int | None = None,
               tokenizer=None) -> tuple[str, PromptSpec]:
    """(the model's folder or hub id, how it encodes) without loading its weights: a llama2vec folder's
    llama2vec_config.json; for a released LLaRA checkpoint, its card's prompt and lengths; else the
    prompt of `prompt` (default: llara) with texts cut to `max_length` tokens (default 128). `tokenizer`:
    the model's, when already loaded."""
    path = resolve_model_path(name)
    if (Path(path) / CONFIG_NAME).is_file() and prompt is None:
        return path, PromptSpec.load(path)
    if prompt is None and is_llara_checkpoint(path, tokenizer):
        spec = resolve_prompt(PromptConfig(), max_length or LLARA_MAX_LENGTH)
        spec.query_max_length = spec.max_length
        log.info("%s: a LLaRA checkpoint (<s1>..<s16> in its tokenizer, no %s): the llara prompt, queries and "
                 "passages cut to %d tokens, its own placeholder ids", name, CONFIG_NAME, spec.max_length)
        return path, spec
    return path, resolve_prompt(prompt or PromptConfig(), max_length or DEFAULT_MAX_LENGTH)


class Llama2Vec:
    """A retrieval encoder around a causal LM. `encode_queries` and `encode_corpus` return
    (N, H) float32 L2-normalised arrays, the interface BEIR- and MTEB-style evaluators call.

    `onnx`: an `OnnxDecoder` that runs the decoder instead of torch (see `from_pretrained`'s
    backend)."""

    def __init__(self, model, tokenizer, spec: PromptSpec, batch_size: int = 16, show_progress: bool = False,
                 onnx: OnnxDecoder | None = None, compile: bool = False, source: str | None = None,
                 backend: str = "torch"):
        self.model, self.tokenizer, self.spec = model.eval(), tokenizer, spec
        self.source, self.backend = source, backend  # the model folder or hub id, and how it runs
        self.ids = prompt_ids(spec, tokenizer)
        self.batch_size, self.show_progress, self.onnx = batch_size, show_progress, onnx
        self.states_fn = compiled_last_states(next(model.parameters()).device) if compile else None

    @classmethod
    def from_pretrained(cls, name: str, device: str = "auto", dtype: str = "auto", prompt: PromptConfig | None = None,
                        max_length: int | None = None, attn_implementation: str = "sdpa", backend: str = "torch",
                        **kwargs) -> Llama2Vec:
        """Open a llama2vec model folder (its llama2vec_config.json says how to encode), a released
        LLaRA checkpoint (BAAI/LLARA-passage and its siblings: the card's prompt, 512 tokens), or any
        causal LM (hub id, folder, 'smollm2') with the prompt of `prompt` (default: llara, texts cut to
        `max_length` tokens, default 128).

        backend: 'torch'; 'torch-bfloat16' (torch in bfloat16 on any device: on a CPU with
        bfloat16 instructions, such as AVX-512 BF16, far faster than float32); 'torch-compile' (torch
        compiled by TorchInductor at the first batch, see `compiled_last_states`: a fixed cost of
        about a minute and a half on two CPU cores, then faster float32 encoding; for large
        corpora); 'onnx-int8' (CPU: int8 weights through ONNX Runtime, exported once and cached); or
        'onnx' (the same export in float32: torch's embeddings, faster than eager torch on a CPU)."""
        if backend not in BACKENDS:
            raise Llama2VecError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
        kwargs["backend"] = backend
        if backend == "torch-bfloat16":
            backend, dtype = "torch", "bfloat16"
        if backend == "torch-compile":
            backend, kwargs["compile"] = "torch", True
        path = resolve_model_path(name)
        if backend != "torch":
            device, dtype = "cpu", "float32"  # the export starts from the float32 CPU model
        cfg = ModelConfig(model=name, device=device, dtype=dtype, attn_implementation=attn_implementation)
        tokenizer, model, _ = load_causal_lm(cfg, path)
        path, spec = model_spec(name, prompt, max_length, tokenizer)
        add_placeholder_tokens(tokenizer, model, spec.new_tokens())
        if backend != "torch":
            k = prompt_ids(spec, tokenizer).k
            onnx_path = cached_export(path, unwrap_lm(model).base_model, k, tokenizer.pad_token_id,
                                      quantise=backend == "onnx-int8", tokens=spec.new_tokens())
            kwargs["onnx"] = OnnxDecoder(onnx_path)
        return cls(model, tokenizer, spec, source=path, **kwargs)

    @property
    def dim(self) -> int:
        return self.model.config.hidden_size

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        """Token ids of texts, whole (no special tokens)."""
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []

    def fit(self, rows: list[list[int]], kind: str) -> tuple[list[list[int]], str]:
        """Token ids of texts of `kind` ('query' or 'passage') cut to its limit on the tokenizer's side, and
        the prompt task to encode them with: the rule of `prompts.text_rule`, for every path that encodes."""
        limit, task = text_rule(self.spec, kind)
        side = self.tokenizer.truncation_side
        return [cut(r, limit, side) for r in rows], task

    def encode_texts(self, texts: list[str], kind: str, batch_size: int | None = None) -> np.ndarray:
        """Embeddings (N, H) of texts of `kind` ('query' or 'passage')."""
        return self.encode_ids(*self.fit(self.tokenize(list(texts)), kind), batch_size)

    @torch.inference_mode()
    def encode_ids(self, rows: list[list[int]], task: str, batch_size: int | None = None) -> np.ndarray:
        """Embed tokenised texts in batches sorted by length (longest first); original order out."""
        from tqdm.auto import tqdm

        batch_size = batch_size or self.batch_size
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
        out = np.zeros((len(rows), self.dim), dtype=np.float32)
        pad = self.tokenizer.pad_token_id
        for start in tqdm(range(0, len(order), batch_size), desc=f"encoding ({task})", unit="batch",
                          disable=not self.show_progress):
            idx = order[start: start + batch_size]
            emb = embed_ids(self.model, self.ids, [rows[i] for i in idx], task, pad, self.spec.pooling, self.onnx,
                            self.states_fn)
            out[idx] = emb.cpu().numpy()
        return out

    def encode_queries(self, queries: list[str], batch_size: int | None = None, **kwargs) -> np.ndarray:
        return self.encode_texts(queries, "query", batch_size)

    def encode_corpus(self, corpus: list[str] | list[dict], batch_size: int | None = None, **kwargs) -> np.ndarray:
        texts = [passage_text(c) if isinstance(c, dict) else c for c in corpus]
        return self.encode_texts(texts, "passage", batch_size)

    def encode(self, inputs, *, task_metadata: object = None, hf_split: str = "", hf_subset: str = "",
               prompt_type: str | None = None, **kwargs) -> np.ndarray:
        """MTEB's encoder protocol (mteb 2.x): `inputs` is a DataLoader of batches (dicts of lists).
        Queries (`prompt_type` "query") are encoded as `encode_queries` does, from "text"; documents
        and the texts of other tasks as `encode_corpus` does, from "title" and "body" when the batch
        holds them (MTEB's "text" joins the title with a space), else from "text". The keyword
        `batch_size` (MTEB's `encode_kwargs`) sets the encoding batch."""
        query = prompt_type == "query"  # MTEB's PromptType is a str enum
        texts: list = []
        for batch in inputs:
            if "text" not in batch:
                raise Llama2VecError(f"Llama2Vec encodes text only; MTEB gave a batch of {', '.join(batch)}")
            if not query and "body" in batch:
                titles = batch.get("title") or [""] * len(batch["body"])
                texts += [{"title": t, "text": b} for t, b in zip(titles, batch["body"])]
            else:
                texts += list(batch["text"])
        if query:
            return self.encode_queries(texts, kwargs.get("batch_size"))
        return self.encode_corpus(texts, kwargs.get("batch_size"))

    def similarity(self, embeddings1, embeddings2):
        """MTEB's score matrix: the inner product, the cosine of these L2-normalised embeddings."""
        from mteb.similarity_functions import dot_score

        return dot_score(embeddings1, embeddings2)

    def similarity_pairwise(self, embeddings1, embeddings2):
        """MTEB's scores of row i with row i: the inner product."""
        from mteb.similarity_functions import pairwise_dot_score

        return pairwise_dot_score(embeddings1, embeddings2)

    @property
    def mteb_model_meta(self):
        """MTEB's `ModelMeta` (needs mteb): the hub id, or 'llama2vec/<folder name>' for a local folder,
        and a revision that names the weights, prompt and backend (MTEB keys its result cache by the
        two, so another model folder of the same name is not taken for this one)."""
        if getattr(self, "_mteb_meta", None) is None:
            try:
                from mteb.models.model_meta import ModelMeta
            except ImportError as e:
                raise Llama2VecError("MTEB's model metadata needs mteb: pip install 'llama2vec[mteb]'") from e
            from .store import fingerprint, fingerprint_key, model_identity

            source = self.source or "unknown"
            local = Path(source).expanduser().is_dir()
            name = source if "/" in source and not local else f"llama2vec/{Path(source).expanduser().resolve().name}"
            revision = fingerprint_key(fingerprint(model=model_identity(source), prompt=vars(self.spec),
                                                   backend=self.backend))
            self._mteb_meta = ModelMeta(
                loader=None, name=name, revision=revision, release_date=None, languages=None,
                n_parameters=sum(p.numel() for p in self.model.parameters()), memory_usage_mb=None,
                max_tokens=self.spec.max_length, embed_dim=self.dim, license=None, open_weights=None,
                public_training_code=None, public_training_data=None, framework=["PyTorch", "Transformers"],
                similarity_fn_name="cosine", use_instructions=True, training_datasets=None)
        return self._mteb_meta


# --------------------------------------------------------------------------------------------
# Truncation


def truncation(lengths: list[int], max_length: int, what: str = "texts") -> dict:
    """How many texts are longer than `max_length` tokens (and so cut), logged when any are."""
    cut = sum(n > max_length for n in lengths)
    stats = {"texts": len(lengths), "truncated": cut, "truncated_share": round(cut / max(len(lengths), 1), 4),
             "max_length": max_length}
    if cut:
        log.warning("%d of %d %s (%.1f%%) are longer than %d tokens and are cut", cut, len(lengths), what,
                    100 * stats["truncated_share"], max_length)
    return stats
