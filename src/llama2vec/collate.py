"""Batches for adaptation: left padding, the joint attention pattern as data, and target sets.

Joint layout of one row (left padded, so both suffixes sit at fixed offsets from the end):

    [pad ... pad] [BOS prefix T] [SELF suffix + K placeholders] [NEXT suffix + K placeholders]
    positions:     0 .. n-1       n .. n+S-1                      n .. n+N-1   (NEXT restarts at n)

Attention is causal, never to padding, and NEXT tokens never see SELF tokens. Then the hidden
states at the SELF placeholders equal those of a pass over [T, SELF] and the ones at the NEXT
placeholders equal those of a pass over [T, NEXT]: both tasks cost one pass over T.
"""

from __future__ import annotations

import string

import torch

from .prompts import PromptIds


def excluded_target_ids(tokenizer, prompt: PromptIds, stopwords: bool = False) -> set[int]:
    """Token ids that never count as bag-of-words targets: special tokens and placeholders, and
    with `stopwords`, tokens that decode to an English stopword or to punctuation only."""
    excluded = set(tokenizer.all_special_ids) | prompt.embedding_ids
    if stopwords:
        from gensim.parsing.preprocessing import STOPWORDS

        texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
        drop = set(string.punctuation) | set(string.whitespace)
        for i, text in enumerate(texts):
            word = text.strip().lower()
            if word in STOPWORDS or all(ch in drop for ch in word):
                excluded.add(i)
    return excluded


def target_sets(rows: list[list[int]], excluded: set[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Unique target ids per row, padded: (ids (B, T) long, mask (B, T) bool)."""
    sets = [sorted(set(r) - excluded) for r in rows]
    width = max(1, max(len(s) for s in sets))
    ids = torch.zeros(len(sets), width, dtype=torch.long)
    mask = torch.zeros(len(sets), width, dtype=torch.bool)
    for b, s in enumerate(sets):
        ids[b, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[b, : len(s)] = True
    return ids, mask


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids (B, L), attention_mask (B, L), position_ids (B, L)) for a left-padded batch.
    Positions count real tokens only, so padding never shifts them."""
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, length - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[b, length - len(r):] = 1
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)  # (B, L)
    return ids, mask, positions


def joint_inputs(texts: list[list[int]], prompt: PromptIds, pad_id: int) -> dict[str, torch.Tensor]:
    """One left-padded batch holding both prompts per text, with the joint mask and positions.

    Returns input_ids (B, L), allowed (B, L, L) bool (query i may attend key j), position_ids
    (B, L), self_positions (K,) and next_positions (K,) (column indices of the placeholders),
    and text_length (the columns before the suffixes)."""
    heads = [prompt.bos + prompt.prefix + t for t in texts]
    s_len, n_len = len(prompt.self_suffix), len(prompt.next_suffix)
    suffix = prompt.self_suffix + prompt.next_suffix
    ids, mask, _ = left_pad([h + suffix for h in heads], pad_id)  # (B, L)
    B, L = ids.shape
    head_len = L - s_len - n_len  # columns of padding + [BOS prefix T]
    real = mask.bool()  # (B, L)
    # Positions: the head counts real tokens; both suffixes continue from the head's length.
    n = real[:, :head_len].sum(dim=1, keepdim=True)  # (B, 1)
    positions = torch.cat([
        (real[:, :head_len].long().cumsum(dim=1) - 1).clamp(min=0),  # (B, head_len)
        n + torch.arange(s_len),  # (B, S)
        n + torch.arange(n_len),  # (B, N)
    ], dim=1)
    # Mask: causal, keys must be real tokens, NEXT rows may not see SELF columns.
    causal = torch.ones(L, L, dtype=torch.bool).tril()  # (L, L)
    is_self = torch.zeros(L, dtype=torch.bool)
    is_self[head_len: head_len + s_len] = True
    is_next = torch.zeros(L, dtype=torch.bool)
    is_next[head_len + s_len:] = True
    blocked = is_next[:, None] & is_self[None, :]  # (L, L)
    allowed = (causal & ~blocked)[None] & real[:, None, :]  # (B, L, L)
    allowed |= torch.eye(L, dtype=torch.bool)[None]  # padding rows see themselves: no empty rows
    k = prompt.k
    return {
        "input_ids": ids,
        "allowed": allowed,
        "position_ids": positions,
        "self_positions": torch.arange(head_len + s_len - k, head_len + s_len),
        "next_positions": torch.arange(L - k, L),
        "text_length": torch.tensor(head_len),
    }


def single_inputs(texts: list[list[int]], prompt: PromptIds, pad_id: int, task: str) -> dict[str, torch.Tensor]:
    """A plain left-padded batch of one prompt (task 'self' or 'next') with its K positions."""
    ids, mask, positions = left_pad([prompt.wrap(t, task) for t in texts], pad_id)
    L = ids.shape[1]
    return {"input_ids": ids, "attention_mask": mask, "position_ids": positions,
            "positions": torch.arange(L - prompt.k, L)}


class PretextCollator:
    """Turns pair examples {'text': ids, 'next': ids} into a training batch.

    joint=True: one batch (see joint_inputs); joint=False: two batches, keys prefixed 'self_'
    and 'next_'. Always: ebae_targets/ebae_mask (unique ids of T) and ebar_targets/ebar_mask
    (unique ids of the next text); with lm=True, lm_labels (B, text_length): T's ids, -100 elsewhere.
    """

    def __init__(self, prompt: PromptIds, pad_id: int, excluded: set[int], max_length: int,
                 joint: bool = True, lm: bool = False):
        self.prompt, self.pad_id, self.excluded = prompt, pad_id, excluded
        self.max_length, self.joint, self.lm = max_length, joint, lm

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        texts = [list(e["text"])[: self.max_length] for e in examples]
        nexts = [list(e["next"])[: self.max_length] for e in examples]
        batch: dict[str, torch.Tensor] = {}
        if self.joint:
            batch.update(joint_inputs(texts, self.prompt, self.pad_id))
        else:
            for task in ("self", "next"):
                single = single_inputs(texts, self.prompt, self.pad_id, task)
                batch.update({f"{task}_{k}": v for k, v in single.items()})
        batch["ebae_targets"], batch["ebae_mask"] = target_sets(texts, self.excluded)
        batch["ebar_targets"], batch["ebar_mask"] = target_sets(nexts, self.excluded)
        batch["n_tokens"] = torch.tensor(sum(len(t) for t in texts))  # passage tokens, for throughput
        if self.lm:
            ids = batch["input_ids"] if self.joint else batch["self_input_ids"]
            width = int(batch["text_length"]) if self.joint else ids.shape[1] - len(self.prompt.self_suffix)
            labels = torch.full((len(texts), width), -100, dtype=torch.long)
            for b, t in enumerate(texts):
                labels[b, width - len(t):] = torch.tensor(t, dtype=torch.long)
            batch["lm_labels"] = labels
        return batch
