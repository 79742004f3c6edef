"""Prompt presets and their tokenisation.

A prompt turns a text T into ``[BOS] prefix T suffix`` where the suffix ends with K embedding
positions: the placeholder tokens (llara preset) or the tokenizer's end-of-sequence token (paper
preset). Every piece is tokenised on its own, so the suffix ids are identical for every text and
the embedding positions sit at fixed offsets from the end of a left-padded batch.

The resolved prompt is saved as ``llama2vec_config.json`` beside every model.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from .config import PromptConfig
from .errors import Llama2VecError
from .store import check_text, parse_json_text, read_text_file, write_json

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
        write_json(Path(folder) / CONFIG_NAME, asdict(self))

    @classmethod
    def load(cls, folder: str | Path) -> PromptSpec:
        path = Path(folder) / CONFIG_NAME
        data = parse_json_text(path, read_text_file(path, "missing: not a llama2vec model folder"))
        if not isinstance(data, dict):
            raise Llama2VecError(f"{path}: unreadable llama2vec config: expected a JSON object, "
                                 f"got {type(data).__name__}")
        try:
            spec = cls(**data)
        except TypeError as e:  # a missing or an unknown field
            raise Llama2VecError(f"{path}: unreadable llama2vec config: {e}") from None
        _check_spec(spec, path)
        return spec


def _check_spec(spec: PromptSpec, path: Path) -> None:
    """The field types and values of a loaded spec; an error names the file and field."""

    def bad(name: str, kind: str) -> Llama2VecError:
        got = getattr(spec, name)
        return Llama2VecError(f"{path}: unreadable llama2vec config: field {name!r} must be {kind}, got {got!r:.60}")

    for name in ("prefix", "self_suffix", "next_suffix", "preset"):
        if not isinstance(getattr(spec, name), str):
            raise bad(name, "a string")
        check_text(getattr(spec, name), f"{path}: field {name!r}")
    for name in ("self_tokens", "next_tokens"):
        tokens = getattr(spec, name)
        if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) and t for t in tokens):
            raise bad(name, "a non-empty list of non-empty strings")
        for token in tokens:
            check_text(token, f"{path}: field {name!r}")
    if len(spec.next_tokens) != len(spec.self_tokens):
        raise bad("next_tokens", f"as long as self_tokens ({len(spec.self_tokens)})")
    if spec.pooling not in ("mean", "last"):
        raise bad("pooling", "'mean' or 'last'")
    if spec.query_task not in ("next", "self"):
        raise bad("query_task", "'next' or 'self'")
    for name, kind in (("max_length", "a positive integer"), ("query_max_length", "a positive integer or null")):
        value = getattr(spec, name)
        if value is None and name == "query_max_length":
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise bad(name, kind)


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


KINDS = ("query", "passage")


def text_rule(spec: PromptSpec, kind: str) -> tuple[int, str]:
    """How a text of `kind` ('query' or 'passage') becomes a model input: the most tokens of it kept (the
    prompt not counted) and the prompt around it ('next' or 'self'). The one place this is decided: the
    encoder, sharded and Ray encoding, the server, fine-tuning and the model card follow it."""
    if kind == "query":
        return spec.query_max_length or spec.max_length, spec.query_task
    if kind == "passage":
        return spec.max_length, "self"
    raise ValueError(f"unknown kind of text {kind!r}: 'query' or 'passage'")


def cut(ids: list[int], limit: int, side: str = "right") -> list[int]:
    """A text's token ids kept within `limit`: the first ones, or the last ones where the tokenizer truncates on
    the left (`truncation_side`). The one rule every path that encodes follows."""
    if len(ids) <= limit:
        return ids
    return ids[-limit:] if side == "left" else ids[:limit]


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
