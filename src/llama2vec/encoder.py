"""`Llama2Vec`: encode queries and passages with an (adapted, fine-tuned or plain) causal LM, and
`llama2vec encode`: embeddings to `.npy` files, shard by shard, resumable.

Queries use the prompt named by the model's `query_task` (NEXT by default, as in the method);
passages use the SELF prompt. Embeddings are pooled over the placeholder positions and
L2-normalised, so the inner product is the cosine similarity.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections import Counter
from dataclasses import asdict
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
from .prompts import CONFIG_NAME, PromptIds, PromptSpec, prompt_ids, resolve_prompt
from .store import (
    atomic_file,
    clean_stale,
    differences,
    fingerprint,
    model_identity,
    read_json,
    read_json_or_none,
    texts_identity,
    write_json,
    write_lines,
)

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
                        max_length: int = 128, attn_implementation: str = "sdpa", backend: str = "torch",
                        **kwargs) -> Llama2Vec:
        """Open a llama2vec model folder (its llama2vec_config.json says how to encode), or any
        causal LM (hub id, folder, 'smollm2') with the prompt of `prompt` (default: llara).

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
        if (Path(path) / CONFIG_NAME).is_file() and prompt is None:
            spec = PromptSpec.load(path)
        else:
            spec = resolve_prompt(prompt or PromptConfig(), max_length)
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

    def tokenize(self, texts: list[str], max_length: int | None = None) -> list[list[int]]:
        """Token ids of texts, cut to `max_length` tokens when given."""
        if max_length is None:
            return self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        return self.tokenizer(texts, add_special_tokens=False, truncation=True, max_length=max_length)["input_ids"]

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
        max_length = self.spec.query_max_length or self.spec.max_length
        return self.encode_ids(self.tokenize(list(queries), max_length), self.spec.query_task, batch_size)

    def encode_corpus(self, corpus: list[str] | list[dict], batch_size: int | None = None, **kwargs) -> np.ndarray:
        texts = [passage_text(c) if isinstance(c, dict) else c for c in corpus]
        return self.encode_ids(self.tokenize(texts, self.spec.max_length), "self", batch_size)


# --------------------------------------------------------------------------------------------
# Embedding files


def save_embeddings(folder: Path, ids: list[str], emb: np.ndarray, meta: dict | None = None) -> None:
    """`embeddings.npy` (N, H) + `ids.txt` (one id per line) + `meta.json`, each written atomically;
    meta.json comes last and marks the folder complete."""
    (folder / "meta.json").unlink(missing_ok=True)
    write_lines(folder / "ids.txt", ids)
    with atomic_file(folder / "embeddings.npy") as tmp, tmp.open("wb") as fh:
        np.save(fh, emb)
    write_json(folder / "meta.json", {"count": len(ids), "dim": int(emb.shape[1]), "dtype": str(emb.dtype),
                                      **(meta or {})})


def load_embeddings(folder: str | Path) -> tuple[list[str], np.ndarray]:
    folder = Path(folder)
    if not (folder / "meta.json").is_file():
        raise Llama2VecError(f"{folder}: not a finished embeddings folder (no meta.json)")
    ids = (folder / "ids.txt").read_text(encoding="utf-8").splitlines()
    emb = np.load(folder / "embeddings.npy")
    if len(ids) != emb.shape[0]:
        raise Llama2VecError(f"{folder}: {len(ids)} ids for {emb.shape[0]} embeddings")
    return ids, emb


def truncation(lengths: list[int], max_length: int, what: str = "texts") -> dict:
    """How many texts are longer than `max_length` tokens (and so cut), logged when any are."""
    cut = sum(n > max_length for n in lengths)
    stats = {"texts": len(lengths), "truncated": cut, "truncated_share": round(cut / max(len(lengths), 1), 4),
             "max_length": max_length}
    if cut:
        log.warning("%d of %d %s (%.1f%%) are longer than %d tokens and are cut", cut, len(lengths), what,
                    100 * stats["truncated_share"], max_length)
    return stats


def encode_fingerprint(encoder: Llama2Vec, ids: list[str], texts: list[str], task: str, shard_size: int,
                       dtype: str, max_length: int) -> dict:
    """What an embeddings folder is made from: the model, the texts, the prompt and the options."""
    return fingerprint(model=model_identity(encoder.source) if encoder.source else "unknown",
                       texts=texts_identity(ids, texts), task=task, prompt=asdict(encoder.spec),
                       max_length=max_length, backend=encoder.backend, shard_size=shard_size, dtype=dtype)


def _check_same(folder: Path, old: dict | None, new: dict) -> None:
    diff = differences(old, new)
    if diff:
        raise Llama2VecError(f"{folder}: holds embeddings made with another {', '.join(diff)}: pass --overwrite to "
                             f"encode again, or choose another --output")


def encode_to_folder(encoder: Llama2Vec, ids: list[str], texts: list[str], output: str | Path, task: str,
                     shard_size: int = 1024, dtype: str = "float32", batch_size: int | None = None,
                     overwrite: bool = False) -> Path:
    """Encode texts into an embeddings folder. Texts are sorted by length and encoded in shards
    written atomically under `output/shards/`; a killed run resumes at the first missing shard.
    A finished folder (or finished shards) made from other inputs or options is an error, unless
    `overwrite`."""
    from tqdm.auto import tqdm

    output = Path(output)
    if not ids:
        raise Llama2VecError(f"{output}: nothing to encode (no texts)")
    dupes = [i for i, n in Counter(ids).items() if n > 1]
    if dupes:
        raise Llama2VecError(f"duplicate ids in the texts to encode: {', '.join(dupes[:5])}")
    spec = encoder.spec
    max_length = spec.max_length if task == "self" else (spec.query_max_length or spec.max_length)
    fp = encode_fingerprint(encoder, ids, texts, task, shard_size, dtype, max_length)
    shards = output / "shards"
    if overwrite and output.exists():
        for name in ("meta.json", "embeddings.npy", "ids.txt"):
            (output / name).unlink(missing_ok=True)
        shutil.rmtree(shards, ignore_errors=True)
    if (output / "meta.json").is_file():
        _check_same(output, read_json(output / "meta.json").get("fingerprint"), fp)
        log.info("%s: already encoded", output)
        shutil.rmtree(shards, ignore_errors=True)  # left by a run killed after its meta.json, before this removal
        return output
    if (shards / "fingerprint.json").is_file():
        _check_same(shards, read_json_or_none(shards / "fingerprint.json"), fp)
    else:
        shutil.rmtree(shards, ignore_errors=True)
        write_json(shards / "fingerprint.json", fp)
    clean_stale(shards)
    rows = encoder.tokenize(texts)
    cut = truncation([len(r) for r in rows], max_length)
    rows = [r[:max_length] for r in rows]
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
    n_shards = (len(order) + shard_size - 1) // shard_size
    for s in tqdm(range(n_shards), desc=f"encoding {output.name}", unit="shard"):
        path = shards / f"shard-{s:05d}.npy"
        if path.is_file():
            continue
        idx = order[s * shard_size: (s + 1) * shard_size]
        emb = encoder.encode_ids([rows[i] for i in idx], task, batch_size)
        with atomic_file(path) as tmp, tmp.open("wb") as fh:
            np.save(fh, emb.astype(dtype))
    emb = np.zeros((len(rows), encoder.dim), dtype=dtype)
    for s in range(n_shards):
        idx = order[s * shard_size: (s + 1) * shard_size]
        emb[idx] = np.load(shards / f"shard-{s:05d}.npy")
    save_embeddings(output, ids, emb, {"task": task, "model_prompt": encoder.spec.preset, **cut, "fingerprint": fp})
    shutil.rmtree(shards, ignore_errors=True)
    return output
