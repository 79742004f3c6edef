"""Sentence-transformers modules that encode the way a llama2vec model does.

This file is copied into every `llama2vec export --format sentence-transformers` folder as
`llama2vec_st.py` and loaded from there by `SentenceTransformer(folder, trust_remote_code=True)`, so
it needs sentence-transformers (6.x), transformers and torch, never llama2vec.

A text T becomes the token ids ``[BOS] prefix T suffix``: every piece is tokenised on its own, T is cut
to the task's length limit, and the suffix (query or document) ends with the K placeholder tokens.
Batches are left-padded with explicit position ids, so the K placeholders close every row; the
placeholders' last hidden states are pooled (mean, or the last one) and L2-normalised (the stock
`Normalize` module). `encode_query` uses the query suffix, `encode_document` and plain `encode` the
document suffix.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from sentence_transformers.base.modules import Module, Transformer

QUERY, DOCUMENT = "query", "document"


def left_pad(rows: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """input_ids, attention_mask and position_ids (B, L) of a left-padded batch; positions count
    real tokens only, so padding never shifts them."""
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    for b, row in enumerate(rows):
        ids[b, length - len(row):] = torch.tensor(row, dtype=torch.long)
        mask[b, length - len(row):] = 1
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    return {"input_ids": ids, "attention_mask": mask, "position_ids": positions}


class Llama2VecTransformer(Transformer):
    """The decoder (last hidden states, after the final norm) with llama2vec's prompt built from
    token ids. `query_length` / `document_length` cap the tokens of T alone (the prompt is added
    after the cut)."""

    config_keys: list[str] = [*Transformer.config_keys, "bos_ids", "prefix_ids", "query_suffix_ids",
                              "document_suffix_ids", "pad_token_id"]

    def __init__(self, model_name_or_path: str, *, bos_ids: list[int], prefix_ids: list[int],
                 query_suffix_ids: list[int], document_suffix_ids: list[int], pad_token_id: int,
                 **kwargs: Any) -> None:
        super().__init__(model_name_or_path, **kwargs)
        self.bos_ids, self.prefix_ids = list(bos_ids), list(prefix_ids)
        self.query_suffix_ids, self.document_suffix_ids = list(query_suffix_ids), list(document_suffix_ids)
        self.pad_token_id = pad_token_id

    def preprocess(self, inputs: Sequence[Any], prompt: str | None = None, task: str | None = None,
                   **kwargs: Any) -> dict[str, Any]:
        """Token ids of texts for `task` 'query' (`encode_query`) or 'document' (`encode_document`,
        and `encode` without a task)."""
        if not inputs:
            return {}
        if prompt:
            raise ValueError("this llama2vec model builds its own prompts: call encode_query or encode_document "
                             "without prompt / prompt_name")
        if task not in (QUERY, DOCUMENT, None):
            raise ValueError(f"unknown task {task!r}: this llama2vec model encodes 'query' or 'document'")
        if not all(isinstance(text, str) for text in inputs):
            raise ValueError("this llama2vec model encodes strings only (a passage with a title: title + '\\n' + text)")
        if task == QUERY:
            max_length, suffix = self.query_length, self.query_suffix_ids
        else:
            max_length, suffix = self.document_length, self.document_suffix_ids
        texts = self.tokenizer(list(inputs), add_special_tokens=False, truncation=True,
                               max_length=max_length)["input_ids"]
        return left_pad([self.bos_ids + self.prefix_ids + t + suffix for t in texts], self.pad_token_id)


class PlaceholderPooling(Module):
    """The sentence embedding: the mean ('mean') or the last ('last') of the hidden states at the K
    placeholder positions, which close every left-padded row."""

    config_keys: list[str] = ["num_placeholders", "pooling"]

    def __init__(self, num_placeholders: int, pooling: str = "mean") -> None:
        super().__init__()
        if pooling not in ("mean", "last"):
            raise ValueError(f"pooling must be 'mean' or 'last', got {pooling!r}")
        self.num_placeholders, self.pooling = num_placeholders, pooling

    def forward(self, features: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        states = features["token_embeddings"][:, -self.num_placeholders:]  # (B, K, H)
        embedding = states.mean(dim=1) if self.pooling == "mean" else states[:, -1]
        features["sentence_embedding"] = embedding.float()
        return features

    def save(self, output_path: str, *args: Any, safe_serialization: bool = True, **kwargs: Any) -> None:
        self.save_config(output_path)
