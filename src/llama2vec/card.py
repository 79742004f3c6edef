"""Model cards: the `README.md` of every model folder that `adapt`, `finetune` and `export` write.

A card is made from the folder's own records, so it can be written again when they change:
`llama2vec_config.json` (how texts are encoded), `run_config.yaml` (the training command's settings),
`training.json` (steps, time and last losses, written at the end of training) and `evaluations.json`
(every `llama2vec evaluate` run on the folder, appended by it).
"""

from __future__ import annotations

import datetime
import re
from pathlib import Path

import yaml

from .prompts import CONFIG_NAME, PromptSpec, text_rule
from .store import atomic_write, read_json_or_none, write_json

CARD = "README.md"
TRAINING = "training.json"
EVALUATIONS = "evaluations.json"
KNOWN_LICENCES = {"smollm2": "apache-2.0"}  # the bundled SmolLM2-135M-Instruct


def base_model(folder: Path) -> str | None:
    """The model a folder was trained from, as given to the command."""
    run = _run_config(folder)
    return (run.get("model") or {}).get("model") if run else None


def licence(model: str | None) -> str | None:
    """The licence of a model: a llama2vec folder's card, a local folder's README front matter, or
    a known bundled model; None when unknown (a hub id: see its own card)."""
    if model is None:
        return None
    if model in KNOWN_LICENCES:
        return KNOWN_LICENCES[model]
    card = Path(model) / CARD
    if card.is_file():
        front = re.match(r"---\n(.*?)\n---", card.read_text(encoding="utf-8", errors="replace"), re.S)
        if front:
            try:
                meta = yaml.safe_load(front.group(1)) or {}
            except yaml.YAMLError:
                return None
            value = meta.get("license") if isinstance(meta, dict) else None
            return str(value) if value else None
    return None


def root_model(model: str | None) -> str | None:
    """Follow llama2vec folders back to the model the first of them was trained from."""
    seen = set()
    while model and (Path(model) / CONFIG_NAME).is_file() and model not in seen:
        seen.add(model)
        parent = base_model(Path(model))
        if parent is None:
            break
        model = parent
    return model


def _run_config(folder: Path) -> dict | None:
    path = folder / "run_config.yaml"
    if not path.is_file():
        return None
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError:
        return None
    return data if isinstance(data, dict) else None


def record_training(folder: Path, result: dict) -> None:
    """Keep what a training run did, for the card."""
    write_json(folder / TRAINING, {
        "steps": result.get("steps"), "seconds": round(float(result.get("seconds", 0.0)), 1),
        "last": result.get("last", {}), "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds")})


def record_evaluation(folder: Path, dataset: str, split: str, metrics: dict) -> None:
    """Append an evaluation of the model in `folder` and write its card again."""
    runs = read_json_or_none(folder / EVALUATIONS) or []
    runs.append({"dataset": dataset, "split": split, "metrics": metrics,
                 "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")})
    write_json(folder / EVALUATIONS, runs)
    write_card(folder)


def _section_training(folder: Path) -> list[str]:
    run, done = _run_config(folder), read_json_or_none(folder / TRAINING)
    if not run:
        return ["Not trained by llama2vec: a causal LM given its placeholders and prompt."]
    command = run.get("command", "?")
    lines = [f"- Command: `llama2vec {command}` from `{base_model(folder)}`."]
    if command == "adapt":
        data = run.get("data") or {}
        lines.append(f"- Data: `{data.get('corpus') or data.get('pairs')}` (unlabelled text, passages of "
                     f"{data.get('max_length')} tokens paired with the passage that follows); EBAE + EBAR.")
    else:
        con = run.get("contrastive") or {}
        lines.append(f"- Data: `{con.get('train')}` (query, positive, hard negatives); InfoNCE, groups of "
                     f"{con.get('group_size')}, temperature {con.get('temperature')}.")
    train = next((v for v in run.values() if isinstance(v, dict) and "learning_rate" in v), {})
    how = f"LoRA r{train.get('lora_r')}, merged" if train.get("lora") else "all weights"
    lines.append(f"- Optimisation: {how}; learning rate {train.get('learning_rate')}, batch {train.get('batch_size')}"
                 f" x {train.get('grad_accum')} accumulation, seed {train.get('seed')}.")
    if done:
        losses = ", ".join(f"{k} {v:.4f}" for k, v in (done.get("last") or {}).items())
        lines.append(f"- Run: {done.get('steps')} steps in {done.get('seconds')} s, finished {done.get('finished')}"
                     + (f"; last losses: {losses}." if losses else "."))
    return lines


def _section_evaluation(folder: Path) -> list[str]:
    runs = read_json_or_none(folder / EVALUATIONS) or []
    if not runs:
        return ["Not evaluated yet: `llama2vec evaluate --model THIS_FOLDER --dataset BEIR_FOLDER` adds its "
                "figures here."]
    names = list(dict.fromkeys(k for r in runs for k in r["metrics"]))
    lines = ["| dataset | split | " + " | ".join(names) + " | date |",
             "|---|---|" + "---|" * len(names) + "---|"]
    for r in runs:
        cells = [f"{r['metrics'][n]:.4f}" if isinstance(r["metrics"].get(n), (int, float)) else "" for n in names]
        lines.append(f"| {r['dataset']} | {r['split']} | " + " | ".join(cells) + f" | {r['date'][:10]} |")
    return lines


def _prompt(spec: PromptSpec, kind: str) -> tuple[str, list[str], int]:
    """The suffix, placeholder tokens and length limit of a query or a passage (`prompts.text_rule`)."""
    limit, task = text_rule(spec, kind)
    if task == "next":
        return spec.next_suffix, spec.next_tokens, limit
    return spec.self_suffix, spec.self_tokens, limit


def _usage(name: str, spec: PromptSpec) -> list[str]:
    query_suffix, query_tokens, query_limit = _prompt(spec, "query")
    passage_suffix, passage_tokens, passage_limit = _prompt(spec, "passage")
    states = ("mean of the last hidden states (after the final norm) at the" if spec.pooling == "mean" else
              "last hidden state (after the final norm) of the last of the")
    return [
        "With llama2vec (`pip install llama2vec`):", "", "```python", "from llama2vec import Llama2Vec", "",
        f'model = Llama2Vec.from_pretrained("{name}")',
        'queries = model.encode_queries(["who won the final?"])  # L2-normalised float32',
        'passages = model.encode_corpus([{"title": "", "text": "The team won the final after a late goal."}])',
        "print(queries @ passages.T)", "```", "",
        "With sentence-transformers: `llama2vec export --model THIS_FOLDER --format sentence-transformers "
        "--output ST_FOLDER` writes a folder that needs no llama2vec:", "", "```python",
        "from sentence_transformers import SentenceTransformer", "",
        'model = SentenceTransformer("ST_FOLDER", trust_remote_code=True)',
        'scores = model.encode_query(["who won the final?"]) @ model.encode_document(["The team won."]).T',
        "```", "",
        "With plain transformers: each piece is tokenised on its own (no special tokens), the text cut to "
        f"{passage_limit} tokens for passages and {query_limit} for queries (its first tokens, or its last where "
        "the tokenizer truncates on the left), then `[BOS] prefix text suffix placeholders`, left-padded; the "
        "embedding is the "
        f"{states} "
        f"{spec.k} placeholder position(s), L2-normalised.", "", "```python", "import torch",
        "from transformers import AutoModel, AutoTokenizer", "",
        f'tok = AutoTokenizer.from_pretrained("{name}")',
        f'model = AutoModel.from_pretrained("{name}").eval()', "",
        "def embed(text, suffix, tokens, limit):",
        "    ids = lambda s: tok(s, add_special_tokens=False)['input_ids']",
        f"    row = ([tok.bos_token_id] if tok.bos_token_id is not None else []) + ids({spec.prefix!r})",
        "    text = ids(text)[-limit:] if tok.truncation_side == 'left' else ids(text)[:limit]",
        "    row += text + ids(suffix) + tok.convert_tokens_to_ids(tokens)",
        "    with torch.no_grad():",
        "        states = model(torch.tensor([row])).last_hidden_state[0, -len(tokens):]",
        f"    emb = states.mean(0) if {spec.pooling == 'mean'} else states[-1]",
        "    return torch.nn.functional.normalize(emb, dim=-1)", "",
        f"query = embed('who won the final?', {query_suffix!r}, {query_tokens!r}, {query_limit})",
        f"passage = embed('The team won the final.', {passage_suffix!r}, {passage_tokens!r}, {passage_limit})",
        "print(query @ passage)", "```"]


def write_card(folder: str | Path, name: str | None = None, exported_from: str | None = None) -> Path:
    """Write (again) the model card of a llama2vec model folder (`exported_from`: the model a
    sentence-transformers export was made from)."""
    folder = Path(folder)
    spec = PromptSpec.load(folder)
    base = base_model(folder) if exported_from is None or _run_config(folder) else exported_from
    root = root_model(base)
    lic = licence(base) or licence(root)
    query_suffix, query_tokens, query_limit = _prompt(spec, "query")
    front = {"library_name": "transformers", "pipeline_tag": "feature-extraction",
             "tags": ["llama2vec", "dense-retrieval", "sentence-similarity", "feature-extraction"]}
    if base:
        front["base_model"] = root if root and not Path(root).exists() else base
    if lic:
        front["license"] = lic
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "", f"# {name or folder.name}", "",
             f"A dense retriever made with llama2vec (Llama2Vec: EBAE/EBAR adaptation, InfoNCE fine-tuning) from "
             f"`{base or 'a causal LM'}`" + (f", itself from `{root}`" if root and root != base else "") + "."
             + (f" A sentence-transformers export of `{exported_from}`: "
                f"`SentenceTransformer(FOLDER, trust_remote_code=True)`." if exported_from else ""), "",
             "## Encoding", "",
             f"- Prompt preset `{spec.preset}`: `{spec.prefix}` + text + `{spec.self_suffix}` + {spec.k} "
             f"placeholder(s) {' '.join(spec.self_tokens)} for passages; queries take the "
             f"{spec.query_task.upper()} prompt (`{query_suffix}` + {' '.join(query_tokens)}).",
             f"- Pooling: {spec.pooling} over the placeholder positions' last hidden states, L2-normalised "
             f"(inner product = cosine).",
             f"- Lengths: passages cut to {text_rule(spec, 'passage')[0]} tokens, queries to {query_limit} (the "
             "prompt not counted).", "",
             "## Training", "", *_section_training(folder), "",
             "## Evaluation", "", *_section_evaluation(folder), "",
             "## Usage", "", *_usage(name or str(folder), spec), "",
             "## Licence", "",
             (f"`{lic}`, the licence of the base model." if lic else
              "The base model's licence applies: see its own card.") + " llama2vec itself is Apache-2.0.", ""]
    return atomic_write(folder / CARD, "\n".join(lines))


def evaluation_folder(model: str) -> Path | None:
    """The llama2vec model folder behind `--model`, when there is one (its card records evaluations)."""
    path = Path(model)
    return path if (path / CONFIG_NAME).is_file() else None

