"""Prompt presets and their tokenisation.

A prompt turns a text T into ``[BOS] prefix T suffix`` where the suffix ends with K embedding
positions: the placeholder tokens (llara preset) or the tokenizer's end-of-sequence token (paper
preset). Every piece is tokenised on its own, so the suffix ids are identical for every text and
the embedding positions sit at fixed offsets from the end of a left-padded batch.

The resolved prompt is saved as ``llama2vec_config.json`` beside every model.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from .config import PromptConfig
from .errors import Llama2VecError

CONFIG_NAME = "llama2vec_config.json"
EOS = "{eos}"  # stands for the tokenizer's own end-of-sequence token

LLARA_K = 8
PRESETS: dict[str, dict] = {
    # Released-code style: 8 + 8 new placeholder tokens, mean of their hidden states.
    "llara": dict(
        prefix='"',
        self_suffix='", summarize the above passage within eight words: ',
        next_suffix='", predict the following passage within eight words: ',
        pooling="mean",
    ),
    # Paper style: K = 1, the hidden state of the final end-of-sequence token.
    "paper": dict(
        prefix="",
        self_suffix=" The input sentence is: ",
        next_suffix=" The next sentence is: ",
        self_tokens=[EOS],
        next_tokens=[EOS],
        pooling="last",
    ),
}


@dataclass
class PromptSpec:
    """The resolved, saved description of how texts are encoded."""

    prefix: str
    self_suffix: str
    next_suffix: str
    self_tokens: list[str]  # K embedding tokens closing the SELF prompt
    next_tokens: list[str]  # K embedding tokens closing the NEXT prompt
    pooling: str  # mean | last
    preset: str = "custom"
    max_length: int = 128  # tokens of T kept for passages
    query_max_length: int | None = None  # tokens of T kept for queries (default: max_length)
    query_task: str = "next"  # prompt of queries: next (NEXT prompt, the method's) or self

    @property
    def k(self) -> int:
        return len(self.self_tokens)

    def new_tokens(self) -> list[str]:
        """Placeholder tokens that must exist in the tokenizer."""
        return [t for t in dict.fromkeys(self.self_tokens + self.next_tokens) if t != EOS]

    def save(self, folder: str | Path) -> None:
        path = Path(folder) / CONFIG_NAME
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2), encoding="utf-8")
        tmp.replace(path)

    @classmethod
    def load(cls, folder: str | Path) -> PromptSpec:
        path = Path(folder) / CONFIG_NAME
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            return cls(**data)
        except FileNotFoundError:
            raise Llama2VecError(f"{path}: missing: not a llama2vec model folder") from None
        except (json.JSONDecodeError, TypeError) as e:
            raise Llama2VecError(f"{path}: unreadable llama2vec config: {e}") from None


def resolve_prompt(cfg: PromptConfig, max_length: int = 128) -> PromptSpec:
    """Preset values, overridden by whichever of the prompt options were given."""
    preset = dict(PRESETS[cfg.prompt_preset])
    k = cfg.num_placeholders
    if "self_tokens" in preset:
        if k not in (None, 1):
            raise Llama2VecError("the paper preset has exactly one embedding token per task")
    else:
        k = k or LLARA_K
        preset["self_tokens"] = [f"<s{i}>" for i in range(1, k + 1)]
        preset["next_tokens"] = [f"<s{i}>" for i in range(k + 1, 2 * k + 1)]
    for name in ("prefix", "self_suffix", "next_suffix", "pooling"):
        value = getattr(cfg, name)
        if value is not None:
            preset[name] = value
    return PromptSpec(preset=cfg.prompt_preset, max_length=max_length, query_task=cfg.query_prompt, **preset)


@dataclass
class PromptIds:
    """Token ids of the fixed prompt pieces for one tokenizer."""

    bos: list[int]  # [] when the tokenizer has no BOS token
    prefix: list[int]
    self_suffix: list[int]  # suffix text + K embedding tokens
    next_suffix: list[int]
    k: int
    embedding_ids: set[int]  # ids of the placeholders (never loss targets)

    def wrap(self, text_ids: list[int], task: str) -> list[int]:
        """[BOS] prefix T suffix, for task 'self' or 'next'."""
        suffix = self.self_suffix if task == "self" else self.next_suffix
        return self.bos + self.prefix + text_ids + suffix


def prompt_ids(spec: PromptSpec, tokenizer) -> PromptIds:
    """Tokenise the prompt pieces. All ids come from the tokenizer, never from constants."""

    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    def tokens(names: list[str]) -> list[int]:
        out = []
        for name in names:
            if name == EOS:
                if tokenizer.eos_token_id is None:
                    raise Llama2VecError("the paper preset needs a tokenizer with an EOS token")
                out.append(tokenizer.eos_token_id)
            else:
                tid = tokenizer.convert_tokens_to_ids(name)
                if tid is None or tid == tokenizer.unk_token_id:
                    raise Llama2VecError(f"placeholder {name!r} is not in the tokenizer: add it first")
                out.append(tid)
        return out

    self_emb, next_emb = tokens(spec.self_tokens), tokens(spec.next_tokens)
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    return PromptIds(
        bos=bos,
        prefix=ids(spec.prefix),
        self_suffix=ids(spec.self_suffix) + self_emb,
        next_suffix=ids(spec.next_suffix) + next_emb,
        k=spec.k,
        embedding_ids={i for i in self_emb + next_emb if i != tokenizer.eos_token_id},
    )
