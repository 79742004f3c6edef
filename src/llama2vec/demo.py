"""`llama2vec demo`: the paper's claim tested end to end on the embedded defaults.

Stages (each cached in the output folder; `--force` redoes them; an interrupted stage resumes):
data (BBC headline -> article, and the out-of-domain Lee task: ABC news, opening sentence -> rest of the
story) -> adapt SmolLM2 (EBAE + EBAR, Wikipedia + BBC train bodies) -> choose the query prompt and the
passage length on the dev splits (BBC dev and Lee dev), and measure the fast backend's cost there -> mine
hard negatives with the adapted model where a recipe asks for them -> choose the fine-tuning recipe on
the dev splits where the preset lists several -> fine-tune the adapted and the unadapted model with the
same recipe, for every seed -> evaluate every system on BBC test and Lee test; the hybrid's fusion is
chosen on BBC dev -> label curve (fine-tuning on the first n training queries) -> report.json,
report.md, charts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import logging
import shutil
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

from .errors import Llama2VecError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Recipe:
    """How the demo fine-tunes: all weights or LoRA adapters (rank 16), the peak learning rate, the
    hard negatives: `bm25` (those of train.jsonl) or `adapted` (mined by the adapted model itself), and
    the passage length in tokens, for training and for encoding (None: the settings' passage_max_length)."""

    name: str
    lora: bool
    learning_rate: float
    negatives: str = "bm25"
    passage_length: int | None = None


FULL_2E5 = Recipe("full-lr2e-5", lora=False, learning_rate=2e-5)
FULL_5E5 = Recipe("full-lr5e-5", lora=False, learning_rate=5e-5)
RECIPES = [FULL_2E5, FULL_5E5, Recipe("lora-lr2e-4", lora=True, learning_rate=2e-4)]
MINED = Recipe("full-lr5e-5-adapted-negatives", lora=False, learning_rate=5e-5, negatives="adapted")


@dataclass
class DemoSettings:
    """Every knob of a demo run; the presets below fill them."""

    adapt_steps: int
    adapt_batch: int
    adapt_lr: float
    main_queries: int  # training queries of the main fine-tuned systems (one pass over them)
    finetune_batch: int
    group_size: int
    passage_max_length: int  # tokens of a passage, prompt excluded (a recipe may set its own)
    query_max_length: int
    eval_queries: int | None  # test queries evaluated (None: all 403)
    distractors: int | None  # passages besides the evaluated queries' own (None: the whole corpus)
    label_curve: list[int] = field(default_factory=list)  # n training queries (0 = no fine-tuning)
    seeds: list[int] = field(default_factory=lambda: [0])  # the main systems and every curve point run with each
    query_prompt: str = "auto"  # prompt for queries: next, self, or auto (the better on the dev split)
    adapt_max_length: int | None = None  # tokens of an adaptation chunk (None: passage_max_length)
    # Fine-tuning recipes (with their passage length); with more than one, the one with the best mean dev
    # nDCG@10 of the adapted and the unadapted model (BBC dev and Lee dev), each fine-tuned on the first
    # `recipe_queries` training queries, is used, and its passage length for every SmolLM2 system.
    recipes: list[Recipe] = field(default_factory=lambda: [FULL_2E5])
    recipe_queries: int = 48
    temperature: float = 0.02
    # auto: bfloat16 where its products are fast (a GPU, or a CPU with bfloat16 instructions such as
    # AVX-512 BF16), float32 elsewhere. Training: bf16-mixed or fp32; encoding: torch-bfloat16 or torch.
    precision: str = "auto"
    backend: str = "auto"
    ood_distractors: int | None = 100  # Lee passages besides the evaluated queries' own (None: all)
    scaled_down: str = ""
    base_model: str = "smollm2"
    speed_reason: str = ""  # why `precision` and `backend` came out as they did (filled by resolve_speed)


PRESETS = {
    "quick": DemoSettings(
        adapt_steps=40, adapt_batch=8, adapt_lr=1e-4,
        main_queries=48, finetune_batch=4, group_size=4,
        passage_max_length=64, query_max_length=32, eval_queries=150, distractors=50,
        scaled_down="40 adaptation steps on 64-token chunks; fine-tuning on 48 training queries (12 steps); "
                    "150 test queries against a corpus of their own 150 passages plus 50 others, cut to 64 tokens",
    ),
    "full": DemoSettings(
        adapt_steps=200, adapt_batch=8, adapt_lr=3e-5,
        main_queries=480, finetune_batch=4, group_size=4,
        passage_max_length=128, adapt_max_length=64, query_max_length=32,
        eval_queries=None, distractors=200, label_curve=[0, 16, 48, 480], seeds=[0, 1],
        recipes=[FULL_5E5, dataclasses.replace(FULL_5E5, name="full-lr5e-5-64-tokens", passage_length=64)],
        recipe_queries=48,
        scaled_down="adaptation chunks cut to 64 tokens; the 403 test queries against their own 403 passages "
                    "plus 200 others (not the whole 2,089-passage corpus); fine-tuning on up to 480 of the 1,464 "
                    "training queries (one pass)",
    ),
    "paper": DemoSettings(
        adapt_steps=2000, adapt_batch=8, adapt_lr=5e-5,
        main_queries=1464, finetune_batch=4, group_size=8,
        passage_max_length=128, query_max_length=32, eval_queries=None,
        distractors=None, label_curve=[0, 64, 256, 1464], seeds=[0, 1, 2],
        recipes=[*RECIPES, MINED, dataclasses.replace(FULL_5E5, name="full-lr5e-5-256-tokens", passage_length=256)],
        recipe_queries=256, ood_distractors=None,
    ),
}

# The time estimate: the demo's work in tokens, priced at this machine's measured speed. `measure_rates` times
# a training pass and an encoding pass of the base model here, in the run's precision and backend (CPUs differ by
# more than 2x: AVX2 only, AVX-512 BF16, AMX); the factors below turn the probe's seconds per token into those of
# each stage (they hold the per-step costs, data, saving and loading), fitted on `make demo` runs in fp32 and in
# bf16-mixed (BENCHMARKS.md, "The demo's time estimate").
_ADAPT_PER_PROBE = 1.0
_FINETUNE_PER_PROBE = 1.0
_ENCODE_PER_PROBE = 0.8  # the demo encodes in batches of 32 (the probe: 8)
_FIXED_S = 45.0  # model loading in every stage, BM25 and MiniLM, charts
_PROMPT_TOKENS = 25
_QUERY_TOKENS = 40
_LEE = (300, 190, 110)  # Lee passages, test and dev queries


@dataclass(frozen=True)
class Rates:
    """Seconds per token on this machine: `train`, a forward and backward pass in the run's precision; `encode`,
    a forward pass without gradients in the run's backend; `encode_fp32`, the same in float32."""

    train: float
    encode: float
    encode_fp32: float


def measure_rates(s: DemoSettings, tokens: int = 96) -> Rates:
    """Time the base model on random tokens: a training pass of 4 x `tokens` (under bfloat16 autocast for
    bf16-mixed) and an encoding pass of 8 x `tokens` (in float32, and in bfloat16 for torch-bfloat16), each once
    to warm up and twice timed. About 10 s on a 2-core CPU (the bundled model's one-time conversion comes first)."""
    import torch

    from .config import ModelConfig
    from .models import load_causal_lm

    _, model, device = load_causal_lm(ModelConfig(model=s.base_model))
    body = model.base_model  # the decoder without the LM head: fine-tuning and encoding read hidden states
    gen, vocab = torch.Generator().manual_seed(0), model.config.vocab_size

    def ids(rows: int) -> torch.Tensor:
        return torch.randint(0, vocab, (rows, tokens), generator=gen).to(device)

    def timed(step, rows: int, repeats: int = 2) -> float:
        step(ids(rows))  # warm-up: oneDNN makes its kernels on the first call
        x = ids(rows)
        t0 = time.perf_counter()
        for _ in range(repeats):
            step(x)
        return (time.perf_counter() - t0) / (repeats * x.numel())

    def train(x: torch.Tensor) -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=s.precision == "bf16-mixed"):
            hidden = body(input_ids=x).last_hidden_state
        hidden.float().square().mean().backward()
        model.zero_grad(set_to_none=True)

    def encode(x: torch.Tensor) -> None:
        with torch.inference_mode():
            body(input_ids=x)

    model.train()
    train_s = timed(train, 4)
    model.eval()
    encode_fp32 = timed(encode, 8)
    encode_s = encode_fp32
    if s.backend == "torch-bfloat16":
        model.to(torch.bfloat16)
        encode_s = timed(encode, 8)
    return Rates(train=train_s, encode=encode_s, encode_fp32=encode_fp32)


def estimate_work(s: DemoSettings, n_passages: int, n_queries: int, n_dev: tuple[int, int] = (0, 0)) -> dict:
    """The demo's work in tokens: `adapt` and `finetune` (trained), `encode` (encoded). `n_dev`: passages and
    queries of the BBC dev set (the choices on dev encode it). The main runs are counted at the longest candidate
    passage length."""
    lengths = [with_length(s, r).passage_max_length for r in s.recipes]
    length = max(lengths)
    adapt = s.adapt_steps * s.adapt_batch * ((s.adapt_max_length or length) + 2 * _PROMPT_TOKENS)

    def step(length: int) -> int:
        return s.finetune_batch * (s.group_size * (length + _PROMPT_TOKENS) + s.query_max_length)

    def encode(passages: int, queries: int, length: int = length) -> int:
        return passages * (length + _PROMPT_TOKENS) + queries * _QUERY_TOKENS

    lee_test, lee_dev = min(_LEE[0], _LEE[1] + (s.ood_distractors or _LEE[0])), _LEE[2] + (s.ood_distractors or 0)
    runs = finetune_runs(s)
    finetune = 2 * sum(steps_for(n, s) for n, _ in runs) * step(length)  # both models

    def dev(length: int = length) -> int:
        return encode(n_dev[0] + lee_dev, n_dev[1] + _LEE[2], length)

    # The prompt choice (the passages once, the queries with both prompts) and the backend's cost (the dev sets
    # again in float32), then both models per candidate recipe (the first candidate's runs are among the curve's
    # when it is chosen). The test set is encoded once more for the LanceDB store.
    choices = dev(s.passage_max_length) + encode(0, n_dev[1] + _LEE[2])
    fp32 = dev(s.passage_max_length) if s.backend != "torch" else 0
    if len(s.recipes) > 1:
        choices += sum(2 * dev(n) for n in lengths)
        finetune += sum(2 * steps_for(s.recipe_queries, s) * step(n) for n in lengths[1:])
    mined = any(r.negatives == "adapted" for r in s.recipes)
    mine = encode(2089, s.main_queries, s.passage_max_length) if mined else 0
    evaluations = (3 + 2 * len(runs)) * encode(n_passages, n_queries) + (2 + 2 * len(s.seeds)) * encode(lee_test,
                                                                                                        _LEE[1])
    return {"adapt": adapt, "finetune": finetune, "encode": choices + mine + evaluations + dev(), "encode_fp32": fp32}


def estimate_seconds(s: DemoSettings, rates: Rates, n_passages: int, n_queries: int,
                     n_dev: tuple[int, int] = (0, 0)) -> float:
    """The demo's time at `rates` (`measure_rates`): its work (`estimate_work`) priced per stage."""
    work = estimate_work(s, n_passages, n_queries, n_dev)
    return (_FIXED_S + work["adapt"] * rates.train * _ADAPT_PER_PROBE
            + work["finetune"] * rates.train * _FINETUNE_PER_PROBE
            + (work["encode"] * rates.encode + work["encode_fp32"] * rates.encode_fp32) * _ENCODE_PER_PROBE)


def resolve_speed(s: DemoSettings) -> DemoSettings:
    """The settings with `precision` and `backend` resolved from auto, and why (`speed_reason`)."""
    from .models import fast_bfloat16

    fast, why = fast_bfloat16()
    precision = s.precision if s.precision != "auto" else ("bf16-mixed" if fast else "fp32")
    backend = s.backend if s.backend != "auto" else ("torch-bfloat16" if fast else "torch")
    if s.precision != "auto" and s.backend != "auto":
        why = "set explicitly"
    elif s.precision != "auto" or s.backend != "auto":
        why = f"{'precision' if s.precision != 'auto' else 'backend'} set explicitly, the other auto: {why}"
    return dataclasses.replace(s, precision=precision, backend=backend, speed_reason=why)


def finetune_runs(s: DemoSettings) -> list[tuple[int, int]]:
    """(n training queries, seed) of every fine-tuning run per model; the main systems are the runs
    (main_queries, seed) for every seed, which the label curve reuses."""
    runs = [(s.main_queries, seed) for seed in s.seeds]
    runs += [(n, seed) for n in s.label_curve if n for seed in s.seeds if (n, seed) not in runs]
    return runs


def steps_for(n: int, s: DemoSettings) -> int:
    """One pass over n training queries."""
    return max(1, n // s.finetune_batch)


def with_length(s: DemoSettings, recipe: Recipe) -> DemoSettings:
    """The settings a recipe trains and encodes with: its own passage length, if it has one."""
    return dataclasses.replace(s, passage_max_length=recipe.passage_length or s.passage_max_length)


# --------------------------------------------------------------------------------------------
# Data


def build_eval_set(source: Path, out: Path, queries: int | None, distractors: int | None, split: str = "test") -> Path:
    """The BEIR folder a split is evaluated on: the split's queries (all, or the first `queries` by
    id hash) and a corpus of their passages plus `distractors` others. Written with the qrels as
    `test.tsv` whatever the split, so that every evaluation reads one name."""
    from .formats import read_beir, write_jsonl_rows, write_qrels

    if (out / "qrels" / "test.tsv").is_file():
        return out
    data = read_beir(source, split)

    def rank(x: str) -> str:
        return hashlib.sha1(f"demo:{x}".encode()).hexdigest()

    qids = sorted(data.queries, key=rank)[: queries or None]
    relevant = {d for q in qids for d in data.qrels[q]}
    others = sorted((d for d in data.corpus if d not in relevant), key=rank)
    keep = relevant | set(others if distractors is None else others[: distractors])
    write_jsonl_rows(out / "corpus.jsonl", ({"_id": d, **data.corpus[d]} for d in data.corpus if d in keep))
    write_jsonl_rows(out / "queries.jsonl", ({"_id": q, "text": data.queries[q]} for q in qids))
    write_qrels(out / "qrels" / "test.tsv", {q: data.qrels[q] for q in qids})
    return out


def build_adapt_corpus(wiki: Path, bbc: Path, out: Path) -> Path:
    """Wikipedia articles plus the BBC train bodies (in-domain unlabelled text; never a
    headline, never a dev or test article)."""
    from .data import read_jsonl
    from .formats import read_train, write_jsonl_rows

    if out.is_file():
        return out
    rows = [{"id": d.id, "title": d.title, "text": d.text} for d in read_jsonl(wiki)]
    bodies = dict.fromkeys(e.pos[0] for e in read_train(bbc / "train.jsonl"))
    rows += [{"id": f"bbc-train-{i}", "title": "", "text": body} for i, body in enumerate(bodies)]
    write_jsonl_rows(out, rows)
    return out


def mine_adapted(encoder, bbc: Path, n: int, out: Path) -> Path:
    """train.jsonl's first n examples (same order) with their negatives mined by `encoder`, the adapted
    model, instead of BM25: from the same pool and ranks as those of `data bbc` (every BBC passage,
    15 from ranks 3-100, a passage whose text equals the positive's never)."""
    from .formats import beir_corpus, read_train, write_jsonl_rows
    from .mine import mine_dense, train_qrels

    if out.is_file():
        return out
    examples = read_train(bbc / "train.jsonl")[:n]
    corpus = {d: doc["text"] for d, doc in beir_corpus(bbc).items()}
    queries, qrels = train_qrels(examples, corpus)
    negs = mine_dense(encoder, corpus, queries, qrels, 15, (3, 100), seed=0)
    write_jsonl_rows(out, ({"query": e.query, "pos": e.pos, "neg": [corpus[d] for d in negs[f"q{i}"]]}
                           for i, e in enumerate(examples)))
    return out


# --------------------------------------------------------------------------------------------
# Stages


class StageCache:
    """What made each stage's output, in `stages.json` of the output folder: an output path and the
    fingerprint of its inputs and settings (and of the code). Before a stage runs, `claim` removes
    an output that other inputs made (and says so), so that only a matching output, finished or
    interrupted, is reused or resumed."""

    def __init__(self, out: Path):
        from .store import code_identity, read_json_or_none

        self.out, self.file = out, out / "stages.json"
        self.records: dict[str, dict] = read_json_or_none(self.file) or {}
        self.code = code_identity()

    def claim(self, path: Path, **parts) -> str:
        """Record the fingerprint of `path` (parts, plus the code); returns a short key that later
        stages built on this output take as a part."""
        from .store import differences, fingerprint, fingerprint_key, remove, write_json

        fp = fingerprint(code=self.code, **parts)
        name = str(path.relative_to(self.out))
        old = self.records.get(name)
        if old != fp:
            if path.exists():
                print(f"{name}: made with another {', '.join(differences(old, fp))}: recomputed")
                remove(path)
            self.records[name] = fp
            write_json(self.file, self.records)
        return fingerprint_key(fp)


def _mean_spread(scores: list[float]) -> tuple[float, float]:
    """The mean over seeds and the spread, half the range."""
    return statistics.mean(scores), (max(scores) - min(scores)) / 2


def _done(folder: Path) -> bool:
    return (folder / "llama2vec_config.json").is_file()


def _drop_checkpoints(folder: Path) -> None:
    """A finished run's resumable checkpoints (weights and AdamW states, 1.5 GB each for SmolLM2) are
    not needed once its model is saved: the full preset would otherwise keep about 60 GB of them."""
    if _done(folder):
        shutil.rmtree(folder / "checkpoints", ignore_errors=True)


def run_adapt(corpus: Path, out: Path, s: DemoSettings) -> Path:
    from .adapt import adapt
    from .config import DataConfig, ModelConfig, PretextConfig, PromptConfig, TrainConfig

    if not _done(out):
        adapt(ModelConfig(model=s.base_model), PromptConfig(), PretextConfig(),
              DataConfig(corpus=str(corpus), max_length=s.adapt_max_length or s.passage_max_length),
              TrainConfig(output=str(out), max_steps=s.adapt_steps, batch_size=s.adapt_batch,
                          learning_rate=s.adapt_lr, warmup_steps=max(1, s.adapt_steps // 20), logging_steps=1,
                          save_steps=25, resume=out.exists(), precision=s.precision))
    _drop_checkpoints(out)
    return out


def run_finetune(model: str, train: Path, n: int | None, steps: int, seed: int, out: Path, s: DemoSettings,
                 recipe: Recipe) -> Path:
    from .config import ContrastiveConfig, FinetuneTrainConfig, ModelConfig, PromptConfig
    from .finetune import finetune

    if not _done(out):
        finetune(ModelConfig(model=model), PromptConfig(query_prompt=s.query_prompt),
                 ContrastiveConfig(train=str(train), group_size=s.group_size, temperature=s.temperature,
                                   query_max_length=s.query_max_length, passage_max_length=s.passage_max_length,
                                   max_examples=n),
                 FinetuneTrainConfig(output=str(out), max_steps=steps, batch_size=s.finetune_batch,
                                     lora=recipe.lora, learning_rate=recipe.learning_rate,
                                     warmup_steps=max(1, steps // 10), seed=seed, logging_steps=1,
                                     save_steps=25, resume=out.exists(), precision=s.precision))
    _drop_checkpoints(out)
    return out


def load_llm_encoder(system: str, s: DemoSettings, backend: str | None = None):
    """A SmolLM2 system as the demo encodes it: its prompt and placeholders as saved (a plain causal LM
    gets the demo's prompt), with the demo's query prompt, lengths and backend."""
    from .config import PromptConfig
    from .encoder import Llama2Vec

    backend = backend or s.backend
    if _done(Path(system)):
        enc = Llama2Vec.from_pretrained(system, show_progress=True, backend=backend)
    else:
        enc = Llama2Vec.from_pretrained(system, prompt=PromptConfig(), max_length=s.passage_max_length,
                                        show_progress=True, backend=backend)
    enc.spec.max_length, enc.spec.query_max_length = s.passage_max_length, s.query_max_length
    enc.spec.query_task = s.query_prompt
    return enc


def evaluate_system(system: str, data: Path, out: Path, s: DemoSettings, run_file: Path | None = None) -> dict:
    """Metrics of a system on an eval set, cached as JSON (and its run kept for fusion)."""
    from .formats import read_beir, write_run
    from .metrics import evaluate_run
    from .store import read_json_or_none, write_json

    cached = read_json_or_none(out)
    if cached is not None:
        return cached
    data_set = read_beir(data, "test")
    if system in ("bm25", "minilm"):
        from .evaluate import retrieve

        run = retrieve(system, data_set)
    else:
        from .evaluate import dense_retrieve

        run = dense_retrieve(load_llm_encoder(system, s), data_set)
    if run_file:
        write_run(run_file, run)
    metrics = evaluate_run(data_set.qrels, run)
    write_json(out, metrics)
    return metrics


def search_through_store(encoder, data: Path, out: Path, spec, bm25_run) -> dict | None:
    """The test protocol of `data` searched through a LanceDB store (`lance_store`, flat) of the encoder's passage
    embeddings, as `encode`, `index --store lancedb` and `search` do it: the metrics of its dense run (those of
    the exact search), of its full-text run, of their hybrid by `spec` (the fusion chosen on dev; full-text
    run first, as bm25's is in the hybrid), and of the store's dense run fused with `bm25_run` (bm25s's) by the
    same spec: the demo's own hybrid. Cached in `out`/store.json; None where lancedb is not installed."""
    from .embeddings import FileSource, encode_to_folder
    from .formats import read_beir
    from .fusion import fuse
    from .index import search_shards
    from .metrics import evaluate_run
    from .store import read_json_or_none, write_json

    cached = read_json_or_none(out / "store.json")
    if cached is not None:
        return cached
    if importlib.util.find_spec("lancedb") is None:
        print("the LanceDB store is not searched: lancedb is not installed (pip install 'llama2vec[lancedb]')")
        return None
    from .lance_store import build_store, text_search

    test = read_beir(data, "test")
    emb = encode_to_folder(encoder, FileSource(data / "corpus.jsonl", require_id=True), out / "embeddings",
                           "passage")
    store = build_store(emb, data, out / "lancedb")
    qids = list(test.queries)
    texts = [test.queries[q] for q in qids]
    dense = search_shards([store], qids, encoder.encode_queries(texts), 1000)
    lexical = text_search(store, qids, texts, 1000)
    result = {"passages": len(test.corpus), "queries": len(qids), "dense": evaluate_run(test.qrels, dense),
              "full-text": evaluate_run(test.qrels, lexical),
              "hybrid": evaluate_run(test.qrels, fuse([lexical, dense], spec)),
              "hybrid with bm25s": evaluate_run(test.qrels, fuse([bm25_run, dense], spec))}
    write_json(out / "store.json", result)
    return result


def choose_encoding(adapted: Path, devs: dict[str, Path], out: Path, s: DemoSettings) -> dict:
    """On the dev splits (never test): the adapted model's zero-shot nDCG@10 with the NEXT and the SELF
    prompt for queries (unless the settings fix one) on every dev set; the best mean over the dev sets
    is used for every SmolLM2 system. Then the cost of the fast backend: the chosen prompt's dev
    nDCG@10 with the backend against float32. Cached in `out`."""
    from .formats import read_beir
    from .index import exact_search
    from .metrics import evaluate_run
    from .store import read_json_or_none, write_json

    cached = read_json_or_none(out)
    if cached is not None:
        return cached
    sets = {name: read_beir(path, "test") for name, path in devs.items()}

    def scores(enc, tasks: tuple[str, ...]) -> dict[str, dict[str, float]]:
        table: dict[str, dict[str, float]] = {}
        for name, data in sets.items():
            doc_ids, qids = list(data.corpus), list(data.queries)
            passages = enc.encode_corpus([data.corpus[d] for d in doc_ids])
            for task in tasks:
                enc.spec.query_task = task
                run = exact_search(enc.encode_queries([data.queries[q] for q in qids]), passages, qids, doc_ids, 100)
                table.setdefault(task, {})[name] = evaluate_run(data.qrels, run)["ndcg@10"]
        for row in table.values():
            row["mean"] = statistics.mean(row.values())
        return table

    tasks = ("next", "self") if s.query_prompt == "auto" else (s.query_prompt,)
    table = scores(load_llm_encoder(str(adapted), s), tasks)
    best = max(table, key=lambda k: (table[k]["mean"], k == "next"))  # a tie goes to the method's NEXT prompt
    choice = {"dev_ndcg@10": table, "chosen": best, "query_prompt": best, "passage_max_length": s.passage_max_length,
              "backend": s.backend}
    if s.backend != "torch":  # the backend's measured cost: the chosen prompt again in float32
        exact = scores(load_llm_encoder(str(adapted), dataclasses.replace(s, query_prompt=best), backend="torch"),
                       (best,))[best]
        choice["backend_cost"] = {"float32": exact, s.backend: table[best],
                                  "difference": table[best]["mean"] - exact["mean"]}
    write_json(out, choice)
    return choice


def demo(preset: str = "quick", output: str = "runs/demo", force: bool = False,
         settings: DemoSettings | None = None) -> dict:
    """Run the demo; returns the report (also written to report.json). `settings` replaces the
    preset's (tests use it to run every stage on a tiny model)."""
    from .bbc import build_bbc
    from .data import build_wiki
    from .formats import read_beir, read_run, read_train
    from .fusion import choose_fusion, format_choice, fuse
    from .lee import build_lee
    from .logs import add_log_file
    from .metrics import evaluate_run

    if settings is None and preset not in PRESETS:
        raise Llama2VecError(f"unknown preset {preset!r}: choose from {', '.join(PRESETS)}")
    s = resolve_speed(settings or PRESETS[preset])
    out = Path(output)
    if force and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    log_file = add_log_file(out / "llama2vec.log")  # other libraries' records: there, not on the console
    cache = StageCache(out)
    timings: dict[str, float] = {}
    t0 = time.time()

    def stage(name: str):
        timings[name] = round(max(0.0, time.time() - t0 - sum(timings.values())), 1)

    wiki, bbc, lee = out / "data" / "wiki.jsonl", out / "data" / "bbc", out / "data" / "lee"
    data_key = cache.claim(wiki)
    if not wiki.is_file():
        build_wiki(wiki)
    cache.claim(bbc)
    if not (bbc / "train.jsonl").is_file():
        build_bbc(bbc)
    cache.claim(lee)
    if not (lee / "qrels" / "test.tsv").is_file():
        build_lee(lee)
    # Every eval set (a BEIR folder whose qrels are test.tsv): BBC test and dev, Lee test and dev.
    specs = {"eval": (bbc, "test", s.eval_queries, s.distractors), "dev": (bbc, "dev", s.eval_queries, s.distractors),
             "lee-test": (lee, "test", None, s.ood_distractors), "lee-dev": (lee, "dev", None, s.ood_distractors)}
    sets: dict[Path, str] = {}
    for name, (source, split, queries, distractors) in specs.items():
        folder = out / "data" / name
        sets[folder] = cache.claim(folder, data=data_key, split=split, queries=queries, distractors=distractors)
        build_eval_set(source, folder, queries, distractors, split)
    eval_set, dev, lee_test, lee_dev = (out / "data" / name for name in specs)
    n_train = len(read_train(bbc / "train.jsonl"))
    test = read_beir(eval_set, "test")
    dev_set = read_beir(dev, "test")
    t_probe = time.time()
    rates = measure_rates(s)
    est = time.time() - t0 + estimate_seconds(s, rates, len(test.corpus), len(test.queries),
                                              (len(dev_set.corpus), len(dev_set.queries)))
    print(f"llama2vec demo, preset {preset}: {len(test.queries)} test queries, {len(test.corpus)} passages; "
          f"training in {s.precision}, encoding with {s.backend} ({s.speed_reason}); estimated time here: about "
          f"{est / 60:.0f} minutes, from this machine's measured speed ({time.time() - t_probe:.0f} s to measure: "
          f"{1 / rates.train:.0f} tokens/s training, {1 / rates.encode:.0f} encoding); stages already done are "
          "skipped")
    stage("data")

    from .models import resolve_model_path
    from .store import model_identity

    base_key = model_identity(resolve_model_path(s.base_model))
    cache.claim(out / "data" / "adapt_corpus.jsonl", data=data_key)
    corpus = build_adapt_corpus(wiki, bbc, out / "data" / "adapt_corpus.jsonl")
    adapted_key = cache.claim(out / "adapted", data=data_key, model=base_key, steps=s.adapt_steps,
                              batch=s.adapt_batch, lr=s.adapt_lr, max_length=s.adapt_max_length or s.passage_max_length,
                              precision=s.precision)
    adapted = run_adapt(corpus, out / "adapted", s)
    stage("adapt")

    # Chosen on dev (BBC dev and Lee dev, never test): the query prompt.
    choice_file = out / "eval" / "encoding_dev.json"
    cache.claim(choice_file, model=adapted_key, dev=[sets[dev], sets[lee_dev]], query_prompt=s.query_prompt,
                passage_max_length=s.passage_max_length, query_max_length=s.query_max_length, backend=s.backend)
    encoding_choice = choose_encoding(adapted, {"bbc": dev, "lee": lee_dev}, choice_file, s)
    s = dataclasses.replace(s, query_prompt=encoding_choice["query_prompt"])
    scores = ", ".join(f"{k} {v['mean']:.3f}" for k, v in encoding_choice["dev_ndcg@10"].items())
    print(f"chosen on dev: query prompt {s.query_prompt} (mean dev nDCG@10 of the adapted model: {scores})")
    stage("choose_encoding")

    models = {"unadapted": s.base_model, "adapted": str(adapted)}
    model_keys = {s.base_model: base_key, str(adapted): adapted_key, "bm25": "bm25", "minilm": "minilm"}
    evals = out / "eval"

    def common(st: DemoSettings) -> dict:
        """What a fine-tuning run or an evaluation of a SmolLM2 system depends on besides its model."""
        return dict(query_prompt=st.query_prompt, query_max_length=st.query_max_length,
                    passage_max_length=st.passage_max_length, backend=st.backend)

    train_files = {"bm25": bbc / "train.jsonl"}
    train_keys = {"bm25": data_key}
    if any(r.negatives == "adapted" for r in s.recipes):
        need = max([s.main_queries, s.recipe_queries, *s.label_curve])
        mined = out / "data" / "train_adapted_negatives.jsonl"
        train_keys["adapted"] = cache.claim(mined, model=adapted_key, data=data_key, n=need, **common(s))
        if not mined.is_file():
            mine_adapted(load_llm_encoder(str(adapted), s), bbc, need, mined)
        train_files["adapted"] = mined
    stage("mine")

    def finetuned(name: str, n: int, seed: int, recipe: Recipe) -> Path:
        folder = out / "finetuned" / recipe.name / f"{name}-n{n}-s{seed}"
        st = with_length(s, recipe)
        model_keys[str(folder)] = cache.claim(
            folder, model=model_keys[models[name]], data=train_keys[recipe.negatives], n=n, steps=steps_for(n, s),
            seed=seed, recipe=dataclasses.asdict(recipe), batch=s.finetune_batch, group_size=s.group_size,
            temperature=s.temperature, precision=s.precision, **common(st))
        return run_finetune(models[name], train_files[recipe.negatives], n, steps_for(n, s), seed, folder, st, recipe)

    def run_eval(system: str, data: Path, metrics: Path, run_file: Path | None = None,
                 st: DemoSettings | None = None) -> dict:
        """`evaluate_system` of a stage whose inputs are fingerprinted (its run file with it); `st`: the
        settings it encodes with (default: the demo's, once the recipe and its length are chosen)."""
        st = st or s
        key = cache.claim(metrics, system=model_keys[system], data=sets[data], **common(st))
        if run_file is not None:
            cache.claim(run_file, metrics=key)
            if not run_file.is_file():
                metrics.unlink(missing_ok=True)
        return evaluate_system(system, data, metrics, st, run_file)

    recipe_choice = None
    recipe = s.recipes[0]
    if len(s.recipes) > 1:
        dev_scores = {}
        for candidate in s.recipes:
            row: dict = {}
            for name in models:
                folder = str(finetuned(name, s.recipe_queries, s.seeds[0], candidate))
                row[name] = {d: run_eval(folder, data, evals / d / candidate.name / f"{name}.json",
                                         st=with_length(s, candidate))["ndcg@10"]
                             for d, data in (("dev", dev), ("lee-dev", lee_dev))}
            dev_scores[candidate.name] = {**row, "mean": statistics.mean(v for r in row.values() for v in r.values())}
        recipe = max(s.recipes, key=lambda r: dev_scores[r.name]["mean"])
        recipe_choice = {"queries": s.recipe_queries, "dev_ndcg@10": dev_scores, "chosen": recipe.name}
        scores = ", ".join(f"{k} {v['mean']:.3f}" for k, v in dev_scores.items())
        print(f"fine-tuning recipe chosen on the dev splits: {recipe.name} (mean dev nDCG@10 of both models: {scores})")
    s = with_length(s, recipe)  # every SmolLM2 system from here on reads passages of the recipe's length
    stage("choose_recipe")

    def finetuned_eval(name: str, n: int, seed: int, data: Path = eval_set, run_file: Path | None = None) -> dict:
        folder = finetuned(name, n, seed, recipe)
        where = evals if data == eval_set else evals / data.name
        return run_eval(str(folder), data, where / "finetuned" / recipe.name / f"{name}-n{n}-s{seed}.json", run_file)

    main = {name: {seed: finetuned(name, s.main_queries, seed, recipe) for seed in s.seeds} for name in models}
    stage("finetune")

    def aft_run(where: Path, seed: int) -> Path:
        return where / ("smollm2-adapted-finetuned.trec" if seed == s.seeds[0] else
                        f"smollm2-adapted-finetuned-s{seed}.trec")

    # Every system on BBC test and on Lee test; the fine-tuned ones for every seed.
    results: dict[str, dict] = {}
    for data, where in ((eval_set, evals), (lee_test, evals / "lee-test")):
        per_seed = {"smollm2-finetuned": [finetuned_eval("unadapted", s.main_queries, seed, data) for seed in s.seeds],
                    "smollm2-adapted-finetuned": [finetuned_eval("adapted", s.main_queries, seed, data,
                                                                 aft_run(where, seed)) for seed in s.seeds]}
        results[data.name] = {
            "bm25": [run_eval("bm25", data, where / "bm25.json", where / "bm25.trec")],
            "minilm": [run_eval("minilm", data, where / "minilm.json")],
            "smollm2": [run_eval(s.base_model, data, where / "smollm2.json")],
            "smollm2-adapted": [run_eval(str(adapted), data, where / "smollm2-adapted.json")],
            **per_seed,
        }
    # The hybrid's fusion is chosen on BBC dev (the runs of both inputs there), then applied unchanged
    # to BBC test and to Lee test, for every seed.
    dev_runs = [evals / "dev" / "bm25.trec", evals / "dev" / "smollm2-adapted-finetuned.trec"]
    run_eval("bm25", dev, evals / "dev" / "bm25.json", dev_runs[0])
    finetuned_eval("adapted", s.main_queries, s.seeds[0], dev, dev_runs[1])
    spec, table = choose_fusion([read_run(r) for r in dev_runs], read_beir(dev, "test").qrels)
    print(format_choice(table, ["bm25", "smollm2-adapted-finetuned"]))
    lee_data = read_beir(lee_test, "test")
    for data, where, qrels in ((eval_set, evals, test.qrels), (lee_test, evals / "lee-test", lee_data.qrels)):
        results[data.name]["hybrid"] = [evaluate_run(qrels, fuse([read_run(where / "bm25.trec"),
                                                                  read_run(aft_run(where, seed))], spec))
                                        for seed in s.seeds]
    systems = {k: v[0] for k, v in results["eval"].items()}
    fusion_choice = {"chosen": spec.to_json(), "label": str(spec),
                     "dev_ndcg@10": {str(c): round(v, 4) for c, v in table[:8]}}
    stage("evaluate")

    # The same test protocol searched through a LanceDB store: its dense run must score as the exact search.
    store_dir = out / "store"
    cache.claim(store_dir, system=model_keys[str(main["adapted"][s.seeds[0]])], data=sets[eval_set],
                fusion=spec.to_json(), **common(s))
    through_store = search_through_store(load_llm_encoder(str(main["adapted"][s.seeds[0]]), s), eval_set, store_dir,
                                         spec, read_run(evals / "bm25.trec"))
    stage("store")

    curve = []
    for n in s.label_curve:
        point: dict = {"n": n, "seeds": len(s.seeds) if n else 1}
        for name in models:
            if n == 0:  # no fine-tuning: the zero-shot systems
                scores = [systems["smollm2" if name == "unadapted" else "smollm2-adapted"]["ndcg@10"]]
            else:
                scores = [finetuned_eval(name, n, seed)["ndcg@10"] for seed in s.seeds]
            point[name], point[f"{name}_spread"] = _mean_spread(scores)
            point[f"{name}_scores"] = scores
        curve.append(point)
    stage("label_curve")

    def summary(figures: list[dict]) -> dict:
        scores = [f["ndcg@10"] for f in figures]
        return {"ndcg@10": figures[0]["ndcg@10"], "mrr@10": figures[0]["mrr@10"],
                "recall@100": figures[0]["recall@100"], "seed_scores": scores,
                **dict(zip(("mean", "spread"), _mean_spread(scores)))}

    first = {name: str(main[name][s.seeds[0]]) for name in models}
    model_paths = {"bm25": None, "minilm": "minilm", "smollm2": s.base_model, "smollm2-adapted": str(adapted),
                   "smollm2-finetuned": first["unadapted"], "smollm2-adapted-finetuned": first["adapted"],
                   "hybrid": None}
    report = {
        "preset": preset,
        "settings": {**dataclasses.asdict(s), "eval_queries": len(test.queries), "eval_passages": len(test.corpus),
                     "train_queries_available": n_train, "encoding_choice": encoding_choice,
                     "recipe": dataclasses.asdict(recipe), "recipe_choice": recipe_choice,
                     "fusion_choice": fusion_choice},
        "timings": timings,
        "time_estimate": {"seconds": round(est, 1), "measured_seconds": round(time.time() - t0, 1),
                          "tokens_per_s": {k: round(1 / v, 1) for k, v in dataclasses.asdict(rates).items()}},
        "systems": {k: {**summary(results["eval"][k]), "model": model_paths[k]} for k in systems},
        "out_of_domain": {"task": "lee: ABC news, opening sentence -> rest of the story",
                          "queries": len(lee_data.queries), "passages": len(lee_data.corpus),
                          "systems": {k: summary(v) for k, v in results["lee-test"].items()}},
        "label_curve": curve,
        "store": through_store,
    }
    write_report(out, report, systems, {name: main[name][s.seeds[0]] for name in models})
    if log_file is not None:
        print(f"log (other libraries' messages included): {log_file}")
    return report


# --------------------------------------------------------------------------------------------
# Report


def _choices(s: dict) -> list[str]:
    """Report lines for the settings chosen on the dev splits (BBC dev and Lee dev)."""
    why = f" ({s['speed_reason']}; `LLAMA2VEC_CPU_BF16=0` or `1` forces the path)" if s.get("speed_reason") else ""
    lines = [f"Training in {s['precision']}, encoding with the `{s['backend']}` backend{why}."]
    enc = s["encoding_choice"]
    scores = "; ".join(f"{k} {v['mean']:.3f} ({', '.join(f'{d} {x:.3f}' for d, x in v.items() if d != 'mean')})"
                       for k, v in enc["dev_ndcg@10"].items())
    lines.append(f"Query prompt chosen on dev by the adapted model's zero-shot nDCG@10 at {enc['passage_max_length']} "
                 f"tokens (mean of the dev sets; {scores}): {enc['chosen']}.")
    if enc.get("backend_cost"):
        cost = enc["backend_cost"]
        lines.append(f"Measured cost of `{s['backend']}` against float32 on dev (adapted model, {enc['chosen']}): "
                     f"mean nDCG@10 {cost[s['backend']]['mean']:.4f} against {cost['float32']['mean']:.4f} "
                     f"({cost['difference']:+.4f}).")
    recipe = s["recipe"]
    how = "LoRA adapters" if recipe["lora"] else "all weights"
    line = (f"Fine-tuning recipe: {recipe['name']} ({how}, peak learning rate {recipe['learning_rate']:g}, "
            f"{recipe['negatives']} hard negatives, passages of {s['passage_max_length']} tokens)")
    if s["recipe_choice"]:
        def row(v: dict) -> str:
            return ", ".join(f"{m} {' / '.join(f'{x:.3f}' for x in v[m].values())}" for m in ("adapted", "unadapted"))

        scores = "; ".join(f"{k} {v['mean']:.3f} ({row(v)})" for k, v in s["recipe_choice"]["dev_ndcg@10"].items())
        line += (f", chosen on dev by the mean nDCG@10 of both models fine-tuned on "
                 f"{s['recipe_choice']['queries']} training queries (BBC dev / Lee dev): {scores}")
    lines.append(line + ".")
    if s.get("fusion_choice"):
        scores = ", ".join(f"{k} {v:.3f}" for k, v in list(s["fusion_choice"]["dev_ndcg@10"].items())[:4])
        lines.append(f"Hybrid (bm25 with smollm2-adapted-finetuned): {s['fusion_choice']['label']}, chosen on BBC "
                     f"dev (nDCG@10 of the best candidates: {scores}).")
    return [f"- {x}" for x in lines] + [""]


def _seed_table(systems: dict, seeds: list[int]) -> list[str]:
    """nDCG@10 of every system for every seed, with the mean and half the range."""
    lines = [f"| system | {' | '.join(f'seed {x}' for x in seeds)} | mean ± spread |",
             "|---|" + "---|" * (len(seeds) + 1)]
    for name, v in systems.items():
        cells = [f"{x:.3f}" for x in v["seed_scores"]] + [""] * (len(seeds) - len(v["seed_scores"]))
        lines.append(f"| {name} | {' | '.join(cells)} | {v['mean']:.3f} ± {v['spread']:.3f} |")
    return [*lines, ""]


def write_report(out: Path, report: dict, systems: dict, main: dict[str, Path]) -> None:
    from .metrics import format_table
    from .plots import plot_label_curve, plot_systems, plot_training_log
    from .store import atomic_write, write_json

    write_json(out / "report.json", report)
    charts = {"systems": plot_systems(report["systems"], out / "systems.png")}
    if report["label_curve"]:
        charts["label_curve"] = plot_label_curve(report["label_curve"], out / "label_curve.png")
    charts["adapt_losses"] = plot_training_log(out / "adapted", out / "adapt_losses.png", title="Adaptation losses")
    for name, folder in main.items():
        charts[f"finetune_{name}"] = plot_training_log(folder, out / f"finetune_{name}_loss.png",
                                                       parts=("loss",), title=f"Fine-tuning loss ({name})", smooth=3)
    s = report["settings"]
    lines = [f"# llama2vec demo: preset `{report['preset']}`", "",
             f"BBC test protocol: {s['eval_queries']} headline queries, {s['eval_passages']} passages "
             f"(cut to {s['passage_max_length']} tokens). Scaled down: {s['scaled_down'] or 'nothing'}.", "",
             "Chosen on dev, never on test:", "", *_choices(s),
             f"## BBC test (seed {s['seeds'][0]})", "", format_table(systems, ("ndcg@10", "mrr@10", "recall@100")), "",
             "## BBC test nDCG@10 by seed (the fine-tuned systems and the hybrid depend on it)", "",
             *_seed_table(report["systems"], s["seeds"])]
    if report.get("store"):
        st, exact = report["store"], report["systems"]
        lines += [f"## The same protocol searched through a LanceDB store (seed {s['seeds'][0]})", "",
                  "| system | nDCG@10 | as searched above |", "|---|---|---|",
                  f"| smollm2-adapted-finetuned, dense in the store | {st['dense']['ndcg@10']:.4f} | "
                  f"{exact['smollm2-adapted-finetuned']['ndcg@10']:.4f} (exact search) |",
                  f"| the store's full-text index (LanceDB BM25) | {st['full-text']['ndcg@10']:.4f} | "
                  f"{exact['bm25']['ndcg@10']:.4f} (bm25s) |",
                  f"| hybrid in the store (same fusion) | {st['hybrid']['ndcg@10']:.4f} | "
                  f"{exact['hybrid']['ndcg@10']:.4f} (bm25s and exact search) |",
                  f"| the store's dense run fused with bm25s's (same fusion) | "
                  f"{st['hybrid with bm25s']['ndcg@10']:.4f} | {exact['hybrid']['ndcg@10']:.4f} (the same hybrid) |",
                  "",
                  "The two BM25 implementations differ (LanceDB stems and scores with its own BM25 parameters; bm25s "
                  "is Lucene's BM25 without stemming), so the hybrid in the store differs from the demo's by what the "
                  "full-text runs do; with bm25s's run beside the store's dense one it is the demo's hybrid.", ""]
    ood = report["out_of_domain"]
    lines += [f"## Out of domain: {ood['task']} ({ood['queries']} queries, {ood['passages']} passages), nDCG@10",
              "", *_seed_table(ood["systems"], s["seeds"])]
    if report["label_curve"]:
        lines += ["## Label curve (nDCG@10 on BBC test)", "", "| n | unadapted | adapted | seeds |",
                  "|---|---|---|---|"]
        lines += [f"| {p['n']} | {p['unadapted']:.3f} ± {p['unadapted_spread']:.3f} | "
                  f"{p['adapted']:.3f} ± {p['adapted_spread']:.3f} | {p['seeds']} |" for p in report["label_curve"]]
        lines.append("")
    est = report.get("time_estimate") or {}
    total = (f"; in all {est['measured_seconds']:.0f} s, estimated at the start: {est['seconds']:.0f} s"
             if est else "")
    lines += ["## Timings (s)", "", " ".join(f"{k}: {v}" for k, v in report["timings"].items()) + total, "",
              *(f"![{k}]({Path(v).name})" for k, v in charts.items())]
    atomic_write(out / "report.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"\nreport: {out / 'report.md'}")
