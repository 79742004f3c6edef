"""`llama2vec demo`: the paper's claim tested end to end on the embedded defaults.

Stages (each cached in the output folder; `--force` redoes them; an interrupted stage resumes):
data -> adapt SmolLM2 (EBAE + EBAR, Wikipedia + BBC train bodies) -> choose the query prompt and, where
the preset lists several, the fine-tuning recipe on the dev split -> fine-tune the adapted and the
unadapted model with the same recipe -> evaluate every system on the same BBC test protocol ->
label curve (fine-tuning on the first n training queries) -> report.json, report.md, charts.
"""

from __future__ import annotations

import dataclasses
import hashlib
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
    """How the demo fine-tunes: all weights or LoRA adapters (rank 16), and the peak learning rate."""

    name: str
    lora: bool
    learning_rate: float


FULL_2E5 = Recipe("full-lr2e-5", lora=False, learning_rate=2e-5)
RECIPES = [FULL_2E5, Recipe("full-lr5e-5", lora=False, learning_rate=5e-5),
           Recipe("lora-lr2e-4", lora=True, learning_rate=2e-4)]


@dataclass
class DemoSettings:
    """Every knob of a demo run; the presets below fill them."""

    adapt_steps: int
    adapt_batch: int
    adapt_lr: float
    main_queries: int  # training queries of the main fine-tuned systems (one pass over them)
    finetune_batch: int
    group_size: int
    passage_max_length: int  # tokens of a passage (and of an adaptation chunk), prompt excluded
    query_max_length: int
    eval_queries: int | None  # test queries evaluated (None: all 403)
    distractors: int | None  # passages besides the evaluated queries' own (None: the whole corpus)
    label_curve: list[int] = field(default_factory=list)  # n training queries (0 = no fine-tuning)
    seeds: list[int] = field(default_factory=lambda: [0])
    query_prompt: str = "auto"  # prompt for queries: next, self, or auto (the better on the dev split)
    # Fine-tuning recipes; with more than one, the one with the best mean dev nDCG@10 of the adapted and
    # the unadapted model, each fine-tuned on the first `recipe_queries` training queries, is used.
    recipes: list[Recipe] = field(default_factory=lambda: [FULL_2E5])
    recipe_queries: int = 48
    temperature: float = 0.02
    scaled_down: str = ""
    base_model: str = "smollm2"


PRESETS = {
    "quick": DemoSettings(
        adapt_steps=40, adapt_batch=8, adapt_lr=1e-4,
        main_queries=48, finetune_batch=4, group_size=4,
        passage_max_length=64, query_max_length=32, eval_queries=150, distractors=50,
        scaled_down="40 adaptation steps on 64-token chunks; fine-tuning on 48 training queries (12 steps); "
                    "150 test queries against a corpus of their own 150 passages plus 50 others, cut to 64 tokens",
    ),
    "full": DemoSettings(
        adapt_steps=200, adapt_batch=8, adapt_lr=1e-4,
        main_queries=160, finetune_batch=4, group_size=4,
        passage_max_length=64, query_max_length=32, eval_queries=None, distractors=200,
        label_curve=[0, 16, 48, 160], seeds=[0, 1], recipes=RECIPES, recipe_queries=48,
        scaled_down="passages and adaptation chunks cut to 64 tokens; the 403 test queries against their own "
                    "403 passages plus 200 others (not the whole 2,089-passage corpus); fine-tuning on up to 160 "
                    "of the 1,464 training queries (one pass)",
    ),
    "paper": DemoSettings(
        adapt_steps=2000, adapt_batch=8, adapt_lr=5e-5,
        main_queries=1464, finetune_batch=4, group_size=8,
        passage_max_length=128, query_max_length=32, eval_queries=None, distractors=None,
        label_curve=[0, 64, 256, 1464], seeds=[0, 1, 2], recipes=RECIPES, recipe_queries=256,
    ),
}

# Rough CPU costs (2 cores, float32), from BENCHMARKS.md: seconds per token of work.
_TRAIN_S_PER_TOKEN = 1 / 165
_ENCODE_S_PER_TOKEN = 1 / 550
_PROMPT_TOKENS = 25


def finetune_runs(s: DemoSettings) -> list[tuple[int, int]]:
    """(n training queries, seed) of every fine-tuning run per model; the main systems are the run
    (main_queries, first seed), which the label curve reuses."""
    runs = [(s.main_queries, s.seeds[0])]
    runs += [(n, seed) for n in s.label_curve if n for seed in s.seeds if (n, seed) not in runs]
    return runs


def steps_for(n: int, s: DemoSettings) -> int:
    """One pass over n training queries."""
    return max(1, n // s.finetune_batch)


def estimate_seconds(s: DemoSettings, n_passages: int, n_queries: int, n_dev: tuple[int, int] = (0, 0)) -> float:
    """`n_dev`: passages and queries of the dev set (the recipe choice encodes it once per candidate)."""
    adapt = s.adapt_steps * s.adapt_batch * (s.passage_max_length + 2 * _PROMPT_TOKENS) * _TRAIN_S_PER_TOKEN
    step = s.finetune_batch * (s.group_size * (s.passage_max_length + _PROMPT_TOKENS) + s.query_max_length)

    def encode(passages: int, queries: int) -> float:
        return (passages * (s.passage_max_length + _PROMPT_TOKENS) + queries * 40) * _ENCODE_S_PER_TOKEN

    runs = finetune_runs(s)
    extra = len(s.recipes) - 1  # candidate recipes beyond the one whose runs the curve reuses
    steps = sum(steps_for(n, s) for n, _ in runs) + extra * steps_for(s.recipe_queries, s)
    dev = 2 * len(s.recipes) * encode(*n_dev) if extra else 0.0
    finetune = 2 * steps * step * _TRAIN_S_PER_TOKEN
    return 90 + adapt + finetune + dev + (2 + 2 * len(runs)) * encode(n_passages, n_queries)


# --------------------------------------------------------------------------------------------
# Data


def build_eval_set(bbc: Path, out: Path, s: DemoSettings, split: str = "test") -> Path:
    """The BEIR folder every system is evaluated on: the split's queries (all, or the first
    `eval_queries` by id hash) and a corpus of their passages plus `distractors` others. Written
    with the qrels as `test.tsv` whatever the split, so that every evaluation reads one name."""
    from .formats import read_beir, write_jsonl_rows, write_qrels

    if (out / "qrels" / "test.tsv").is_file():
        return out
    data = read_beir(bbc, split)

    def rank(x: str) -> str:
        return hashlib.sha1(f"demo:{x}".encode()).hexdigest()

    qids = sorted(data.queries, key=rank)[: s.eval_queries or None]
    relevant = {d for q in qids for d in data.qrels[q]}
    others = sorted((d for d in data.corpus if d not in relevant), key=rank)
    keep = relevant | set(others if s.distractors is None else others[: s.distractors])
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


def _done(folder: Path) -> bool:
    return (folder / "llama2vec_config.json").is_file()


def run_adapt(corpus: Path, out: Path, s: DemoSettings) -> Path:
    from .adapt import adapt
    from .config import DataConfig, ModelConfig, PretextConfig, PromptConfig, TrainConfig

    if not _done(out):
        adapt(ModelConfig(model=s.base_model), PromptConfig(), PretextConfig(),
              DataConfig(corpus=str(corpus), max_length=s.passage_max_length),
              TrainConfig(output=str(out), max_steps=s.adapt_steps, batch_size=s.adapt_batch,
                          learning_rate=s.adapt_lr, warmup_steps=max(1, s.adapt_steps // 20), logging_steps=1,
                          save_steps=25, resume=out.exists()))
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
                                     save_steps=25, resume=out.exists()))
    return out


def load_llm_encoder(system: str, s: DemoSettings):
    """A llama2vec folder encodes as saved, except that queries take the demo's query prompt;
    a plain causal LM gets the demo's prompt and lengths."""
    from .config import PromptConfig
    from .encoder import Llama2Vec

    if _done(Path(system)):
        enc = Llama2Vec.from_pretrained(system, show_progress=True)
    else:
        enc = Llama2Vec.from_pretrained(system, prompt=PromptConfig(), max_length=s.passage_max_length,
                                        show_progress=True)
        enc.spec.query_max_length = s.query_max_length
    enc.spec.query_task = s.query_prompt
    return enc


def evaluate_system(system: str, data: Path, out: Path, s: DemoSettings, run_file: Path | None = None) -> dict:
    """Metrics of a system on the eval set, cached as JSON (and its run kept for fusion)."""
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


def choose_query_prompt(adapted: Path, dev: Path, out: Path, s: DemoSettings) -> dict:
    """On the dev split (never test): the adapted model's zero-shot nDCG@10 with the NEXT and the
    SELF prompt for queries; the better one is used for every SmolLM2 system. Cached in `out`."""
    from .encoder import Llama2Vec
    from .formats import read_beir
    from .index import exact_search
    from .metrics import evaluate_run
    from .store import read_json_or_none, write_json

    cached = read_json_or_none(out)
    if cached is not None:
        return cached
    data = read_beir(dev, "test")
    enc = Llama2Vec.from_pretrained(str(adapted), show_progress=True)
    doc_ids, qids = list(data.corpus), list(data.queries)
    passages = enc.encode_corpus([data.corpus[d] for d in doc_ids])
    scores = {}
    for task in ("next", "self"):
        enc.spec.query_task = task
        run = exact_search(enc.encode_queries([data.queries[q] for q in qids]), passages, qids, doc_ids, 100)
        scores[task] = evaluate_run(data.qrels, run)["ndcg@10"]
    choice = {"dev_ndcg@10": scores, "chosen": max(scores, key=lambda t: (scores[t], t == "next"))}
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
    from .metrics import evaluate_run

    if settings is None and preset not in PRESETS:
        raise Llama2VecError(f"unknown preset {preset!r}: choose from {', '.join(PRESETS)}")
    s = settings or PRESETS[preset]
    out = Path(output)
    if force and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    cache = StageCache(out)
    timings: dict[str, float] = {}
    t0 = time.time()

    def stage(name: str):
        timings[name] = round(max(0.0, time.time() - t0 - sum(timings.values())), 1)

    wiki, bbc = out / "data" / "wiki.jsonl", out / "data" / "bbc"
    data_key = cache.claim(wiki)
    if not wiki.is_file():
        build_wiki(wiki)
    cache.claim(bbc)
    if not (bbc / "train.jsonl").is_file():
        build_bbc(bbc)
    sets = {split: cache.claim(out / "data" / name, data=data_key, queries=s.eval_queries, distractors=s.distractors)
            for split, name in (("test", "eval"), ("dev", "dev"))}
    eval_set = build_eval_set(bbc, out / "data" / "eval", s)
    n_train = len(read_train(bbc / "train.jsonl"))
    test = read_beir(eval_set, "test")
    dev = build_eval_set(bbc, out / "data" / "dev", s, split="dev")  # where the prompt and recipe are chosen
    n_dev = (0, 0)
    if len(s.recipes) > 1:
        dev_set = read_beir(dev, "test")
        n_dev = (len(dev_set.corpus), len(dev_set.queries))
    est = estimate_seconds(s, len(test.corpus), len(test.queries), n_dev)
    print(f"llama2vec demo, preset {preset}: {len(test.queries)} test queries, {len(test.corpus)} passages; "
          f"estimated time on a 2-core CPU: about {est / 60:.0f} minutes (stages already done are skipped)")
    stage("data")

    from .models import resolve_model_path
    from .store import model_identity

    base_key = model_identity(resolve_model_path(s.base_model))
    cache.claim(out / "data" / "adapt_corpus.jsonl", data=data_key)
    corpus = build_adapt_corpus(wiki, bbc, out / "data" / "adapt_corpus.jsonl")
    adapted_key = cache.claim(out / "adapted", data=data_key, model=base_key, steps=s.adapt_steps,
                              batch=s.adapt_batch, lr=s.adapt_lr, max_length=s.passage_max_length)
    adapted = run_adapt(corpus, out / "adapted", s)
    stage("adapt")
    prompt_choice = None
    if s.query_prompt == "auto":
        choice_file = out / "eval" / "query_prompt_dev.json"
        cache.claim(choice_file, model=adapted_key, dev=sets["dev"], query_max_length=s.query_max_length)
        prompt_choice = choose_query_prompt(adapted, dev, choice_file, s)
        s = dataclasses.replace(s, query_prompt=prompt_choice["chosen"])
        print(f"query prompt chosen on the dev split: {s.query_prompt} {prompt_choice['dev_ndcg@10']}")
    stage("choose_query_prompt")

    models = {"unadapted": s.base_model, "adapted": str(adapted)}
    model_keys = {s.base_model: base_key, str(adapted): adapted_key, "bm25": "bm25", "minilm": "minilm"}
    evals = out / "eval"
    # What every fine-tuning run and every evaluation of a SmolLM2 system share.
    common = dict(query_prompt=s.query_prompt, query_max_length=s.query_max_length,
                  passage_max_length=s.passage_max_length)

    def finetuned(name: str, n: int, seed: int, recipe: Recipe) -> Path:
        folder = out / "finetuned" / recipe.name / f"{name}-n{n}-s{seed}"
        model_keys[str(folder)] = cache.claim(
            folder, model=model_keys[models[name]], data=data_key, n=n, steps=steps_for(n, s), seed=seed,
            recipe=dataclasses.asdict(recipe), batch=s.finetune_batch, group_size=s.group_size,
            temperature=s.temperature, **common)
        return run_finetune(models[name], bbc / "train.jsonl", n, steps_for(n, s), seed, folder, s, recipe)

    def run_eval(system: str, data: Path, metrics: Path, s: DemoSettings, run_file: Path | None = None) -> dict:
        """`evaluate_system` of a stage whose inputs are fingerprinted (its run file with it)."""
        key = cache.claim(metrics, system=model_keys[system], data=sets["dev" if data == dev else "test"], **common)
        if run_file is not None:
            cache.claim(run_file, metrics=key)
            if not run_file.is_file():
                metrics.unlink(missing_ok=True)
        return evaluate_system(system, data, metrics, s, run_file)

    recipe_choice = None
    recipe = s.recipes[0]
    if len(s.recipes) > 1:
        dev_scores = {}
        for candidate in s.recipes:
            scores = {name: run_eval(str(finetuned(name, s.recipe_queries, s.seeds[0], candidate)), dev,
                                     evals / "dev" / candidate.name / f"{name}.json", s)["ndcg@10"] for name in models}
            dev_scores[candidate.name] = {**scores, "mean": statistics.mean(scores.values())}
        recipe = max(s.recipes, key=lambda r: dev_scores[r.name]["mean"])
        recipe_choice = {"queries": s.recipe_queries, "dev_ndcg@10": dev_scores, "chosen": recipe.name}
        print(f"fine-tuning recipe chosen on the dev split: {recipe.name} {dev_scores}")
    stage("choose_recipe")

    def finetuned_eval(name: str, n: int, seed: int, run_file: Path | None = None) -> dict:
        folder = finetuned(name, n, seed, recipe)
        return run_eval(str(folder), eval_set, evals / "finetuned" / recipe.name / f"{name}-n{n}-s{seed}.json", s,
                        run_file)

    main = {name: finetuned(name, s.main_queries, s.seeds[0], recipe) for name in models}
    stage("finetune")

    systems = {
        "bm25": run_eval("bm25", eval_set, evals / "bm25.json", s, evals / "bm25.trec"),
        "minilm": run_eval("minilm", eval_set, evals / "minilm.json", s),
        "smollm2": run_eval(s.base_model, eval_set, evals / "smollm2.json", s),
        "smollm2-adapted": run_eval(str(adapted), eval_set, evals / "smollm2-adapted.json", s),
        "smollm2-finetuned": finetuned_eval("unadapted", s.main_queries, s.seeds[0]),
        "smollm2-adapted-finetuned": finetuned_eval("adapted", s.main_queries, s.seeds[0],
                                                    evals / "smollm2-adapted-finetuned.trec"),
    }
    # The hybrid's fusion is chosen on dev (the runs of both inputs there), then applied unchanged to test.
    dev_runs = [evals / "dev" / "bm25.trec", evals / "dev" / "smollm2-adapted-finetuned.trec"]
    run_eval("bm25", dev, evals / "dev" / "bm25.json", s, dev_runs[0])
    run_eval(str(main["adapted"]), dev, evals / "dev" / "smollm2-adapted-finetuned.json", s, dev_runs[1])
    spec, table = choose_fusion([read_run(r) for r in dev_runs], read_beir(dev, "test").qrels)
    print(format_choice(table, ["bm25", "smollm2-adapted-finetuned"]))
    fused = fuse([read_run(evals / "bm25.trec"), read_run(evals / "smollm2-adapted-finetuned.trec")], spec)
    systems["hybrid"] = evaluate_run(test.qrels, fused)
    fusion_choice = {"chosen": spec.to_json(), "label": str(spec),
                     "dev_ndcg@10": {str(c): round(v, 4) for c, v in table[:8]}}
    stage("evaluate")

    curve = []
    for n in s.label_curve:
        point: dict = {"n": n, "seeds": len(s.seeds) if n else 1}
        for name in models:
            if n == 0:  # no fine-tuning: the zero-shot systems
                scores = [systems["smollm2" if name == "unadapted" else "smollm2-adapted"]["ndcg@10"]]
            else:
                scores = [finetuned_eval(name, n, seed)["ndcg@10"] for seed in s.seeds]
            point[name] = statistics.mean(scores)
            point[f"{name}_scores"] = scores
            point[f"{name}_spread"] = (max(scores) - min(scores)) / 2
        curve.append(point)
    stage("label_curve")

    model_paths = {"bm25": None, "minilm": "minilm", "smollm2": s.base_model, "smollm2-adapted": str(adapted),
                   "smollm2-finetuned": str(main["unadapted"]), "smollm2-adapted-finetuned": str(main["adapted"]),
                   "hybrid": None}
    report = {
        "preset": preset,
        "settings": {**dataclasses.asdict(s), "eval_queries": len(test.queries), "eval_passages": len(test.corpus),
                     "train_queries_available": n_train, "query_prompt_choice": prompt_choice,
                     "recipe": dataclasses.asdict(recipe), "recipe_choice": recipe_choice,
                     "fusion_choice": fusion_choice},
        "timings": timings,
        "systems": {k: {"ndcg@10": v["ndcg@10"], "mrr@10": v["mrr@10"], "recall@100": v["recall@100"],
                        "model": model_paths[k]} for k, v in systems.items()},
        "label_curve": curve,
    }
    write_report(out, report, systems, main)
    return report


# --------------------------------------------------------------------------------------------
# Report


def _choices(s: dict) -> list[str]:
    """Report lines for the settings chosen on the dev split."""
    lines = []
    if s["query_prompt_choice"]:
        scores = ", ".join(f"{k} {v:.3f}" for k, v in s["query_prompt_choice"]["dev_ndcg@10"].items())
        lines.append(f"Query prompt chosen on dev (adapted model, zero-shot nDCG@10: {scores}): {s['query_prompt']}.")
    recipe = s["recipe"]
    how = "LoRA adapters" if recipe["lora"] else "all weights"
    line = f"Fine-tuning recipe: {recipe['name']} ({how}, peak learning rate {recipe['learning_rate']:g})"
    if s["recipe_choice"]:
        scores = "; ".join(f"{k} {v['mean']:.3f} (adapted {v['adapted']:.3f}, unadapted {v['unadapted']:.3f})"
                           for k, v in s["recipe_choice"]["dev_ndcg@10"].items())
        line += (f", chosen on dev by the mean nDCG@10 of both models fine-tuned on "
                 f"{s['recipe_choice']['queries']} training queries: {scores}")
    lines.append(line + ".")
    if s.get("fusion_choice"):
        scores = ", ".join(f"{k} {v:.3f}" for k, v in list(s["fusion_choice"]["dev_ndcg@10"].items())[:4])
        lines.append(f"Hybrid (bm25 with smollm2-adapted-finetuned): {s['fusion_choice']['label']}, chosen on dev "
                     f"(nDCG@10 of the best candidates: {scores}).")
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
             *_choices(s), format_table(systems, ("ndcg@10", "mrr@10", "recall@100")), ""]
    if report["label_curve"]:
        lines += ["## Label curve (nDCG@10 on BBC test)", "", "| n | unadapted | adapted | seeds |",
                  "|---|---|---|---|"]
        lines += [f"| {p['n']} | {p['unadapted']:.3f} ± {p['unadapted_spread']:.3f} | "
                  f"{p['adapted']:.3f} ± {p['adapted_spread']:.3f} | {p['seeds']} |" for p in report["label_curve"]]
        lines.append("")
    lines += ["## Timings (s)", "", " ".join(f"{k}: {v}" for k, v in report["timings"].items()), "",
              *(f"![{k}]({Path(v).name})" for k, v in charts.items())]
    atomic_write(out / "report.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"\nreport: {out / 'report.md'}")
