"""The demo's stages, caching and report, on a tiny model with the real bundled data."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest

import llama2vec.demo as demo_mod
from llama2vec.demo import FULL_2E5, PRESETS, DemoSettings, Rates, Recipe, demo, estimate_seconds
from llama2vec.encoder import Llama2Vec
from llama2vec.evaluate import dense_retrieve
from llama2vec.formats import read_beir, read_run
from llama2vec.fusion import FusionSpec, choose_fusion, fuse
from llama2vec.metrics import evaluate_run

SYSTEMS = ["bm25", "minilm", "smollm2", "smollm2-adapted", "smollm2-finetuned", "smollm2-adapted-finetuned", "hybrid"]


def tiny_settings(model_dir) -> DemoSettings:
    return DemoSettings(adapt_steps=2, adapt_batch=2, adapt_lr=1e-3, main_queries=4, finetune_batch=2, group_size=2,
                        recipes=[Recipe("full-a", lora=False, learning_rate=1e-3),
                                 Recipe("lora-b", lora=True, learning_rate=1e-2),
                                 Recipe("full-mined", lora=False, learning_rate=1e-3, negatives="adapted"),
                                 Recipe("full-16", lora=False, learning_rate=1e-3, passage_length=16)],
                        recipe_queries=4, passage_max_length=24, query_max_length=12,
                        eval_queries=12, distractors=6, ood_distractors=4,
                        label_curve=[0, 4], seeds=[0, 1], base_model=str(model_dir), scaled_down="tiny test")


@pytest.mark.slow
@pytest.mark.cpu_path  # the CPU decides bf16-mixed or fp32: .ci/run also runs it with the other path forced
def test_demo_end_to_end_then_cached(tiny_model_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "demo"
    report = demo(output=str(out), settings=tiny_settings(tiny_model_dir))
    saved = json.loads((out / "report.json").read_text())
    assert saved == json.loads(json.dumps(report))
    assert list(saved["systems"]) == SYSTEMS
    for entry in saved["systems"].values():
        assert set(entry) == {"ndcg@10", "mrr@10", "recall@100", "model", "seed_scores", "mean", "spread"}
        assert entry["ndcg@10"] == entry["seed_scores"][0]
    seeded = {k for k, v in saved["systems"].items() if len(v["seed_scores"]) == 2}
    assert seeded == {"smollm2-finetuned", "smollm2-adapted-finetuned", "hybrid"}
    assert saved["systems"]["bm25"]["model"] is None and saved["systems"]["hybrid"]["model"] is None
    # Every figure is what the saved model and runs give when scored again from scratch.
    test = read_beir(out / "data" / "eval", "test")
    system = saved["systems"]["smollm2-adapted-finetuned"]
    settings = saved["settings"]
    enc = Llama2Vec.from_pretrained(system["model"], device="cpu", backend=settings["backend"])
    enc.spec.query_task = settings["query_prompt"]
    assert enc.spec.max_length == settings["passage_max_length"]
    again = evaluate_run(test.qrels, dense_retrieve(enc, test))
    assert again["ndcg@10"] == pytest.approx(system["ndcg@10"], abs=1e-9)
    bm25 = read_run(out / "eval" / "bm25.trec")
    assert evaluate_run(test.qrels, bm25)["ndcg@10"] == saved["systems"]["bm25"]["ndcg@10"] > 0.5  # headline words
    # The hybrid: the fusion chosen on dev, applied unchanged to the test runs.
    spec = FusionSpec.from_json(saved["settings"]["fusion_choice"]["chosen"])
    fused = evaluate_run(test.qrels, fuse([bm25, read_run(out / "eval" / "smollm2-adapted-finetuned.trec")], spec))
    assert fused["ndcg@10"] == saved["systems"]["hybrid"]["ndcg@10"]
    # The same protocol through a LanceDB store: its dense search scores as the exact search, to the last digit.
    store = saved["store"]
    assert store["passages"] == 18
    assert all(store["dense"][m] == system[m] for m in ("ndcg@10", "mrr@10", "recall@100"))
    assert store["full-text"]["ndcg@10"] > 0.5 and 0 < store["hybrid"]["ndcg@10"] <= 1
    hybrid = saved["systems"]["hybrid"]  # the store's dense run beside bm25s's: the demo's own hybrid
    assert all(store["hybrid with bm25s"][m] == hybrid[m] for m in ("ndcg@10", "mrr@10", "recall@100"))
    assert "searched through a LanceDB store" in (out / "report.md").read_text()
    dev = read_beir(out / "data" / "dev", "test")
    dev_runs = [read_run(out / "eval" / "dev" / f"{n}.trec") for n in ("bm25", "smollm2-adapted-finetuned")]
    assert choose_fusion(dev_runs, dev.qrels)[0] == spec
    best_input = max(evaluate_run(dev.qrels, r)["ndcg@10"] for r in dev_runs)
    assert evaluate_run(dev.qrels, fuse(dev_runs, spec))["ndcg@10"] >= best_input  # never below on dev
    assert saved["settings"]["eval_queries"] == 12 and saved["settings"]["eval_passages"] == 18
    choice = settings["encoding_choice"]  # chosen on dev (BBC and Lee), never on test
    assert set(choice["dev_ndcg@10"]) == {"next", "self"} and choice["passage_max_length"] == 24
    assert all(set(v) == {"bbc", "lee", "mean"} for v in choice["dev_ndcg@10"].values())
    best = max(choice["dev_ndcg@10"].values(), key=lambda v: v["mean"])
    assert choice["dev_ndcg@10"][choice["chosen"]] == best and choice["chosen"] == settings["query_prompt"]
    if settings["backend"] != "torch":  # the fast backend's cost, measured against float32 on dev
        cost = choice["backend_cost"]
        assert cost["difference"] == pytest.approx(best["mean"] - cost["float32"]["mean"])
    recipes = settings["recipe_choice"]  # also chosen on dev, by both models' mean on BBC dev and Lee dev
    assert set(recipes["dev_ndcg@10"]) == {"full-a", "lora-b", "full-mined", "full-16"} and recipes["queries"] == 4
    assert set(recipes["dev_ndcg@10"]["full-a"]["adapted"]) == {"dev", "lee-dev"}
    best = max(recipes["dev_ndcg@10"], key=lambda k: recipes["dev_ndcg@10"][k]["mean"])
    assert recipes["chosen"] == best == saved["settings"]["recipe"]["name"]
    # The chosen recipe's passage length is every SmolLM2 system's (the saved model's, checked above).
    assert settings["passage_max_length"] == (saved["settings"]["recipe"]["passage_length"] or 24)
    for recipe, length in (("full-a", 24), ("full-16", 16)):  # each candidate trained at its own length
        saved_spec = json.loads((out / "finetuned" / recipe / "adapted-n4-s0" / "llama2vec_config.json").read_text())
        assert saved_spec["max_length"] == length
    assert f"/{best}/adapted-n4-s0" in saved["systems"]["smollm2-adapted-finetuned"]["model"]
    for name in ("adapted", "unadapted"):  # every candidate was trained for both models
        for r in recipes["dev_ndcg@10"]:
            assert (out / "finetuned" / r / f"{name}-n4-s0" / "llama2vec_config.json").is_file()
    assert not list(out.glob("**/checkpoints"))  # a finished run's checkpoints are dropped
    assert "Fine-tuning recipe:" in (out / "report.md").read_text()
    # The mined training file: the same queries and positives as train.jsonl, other negatives, never the positive.
    bm25_train = [json.loads(x) for x in (out / "data" / "bbc" / "train.jsonl").read_text().splitlines()]
    mined = [json.loads(x) for x in (out / "data" / "train_adapted_negatives.jsonl").read_text().splitlines()]
    assert [(m["query"], m["pos"]) for m in mined] == [(b["query"], b["pos"]) for b in bm25_train[:4]]
    assert all(m["pos"][0] not in m["neg"] and len(m["neg"]) == 15 for m in mined)
    assert [m["neg"] for m in mined] != [b["neg"] for b in bm25_train[:4]]
    # Out of domain: every system on Lee test, the hybrid with the fusion chosen on BBC dev.
    ood = saved["out_of_domain"]
    lee = read_beir(out / "data" / "lee-test", "test")
    assert list(ood["systems"]) == SYSTEMS and ood["queries"] == len(lee.queries)
    lee_bm25 = read_run(out / "eval" / "lee-test" / "bm25.trec")
    lee_aft = read_run(out / "eval" / "lee-test" / "smollm2-adapted-finetuned-s1.trec")
    hybrid_s1 = ood["systems"]["hybrid"]["seed_scores"][1]
    assert evaluate_run(lee.qrels, fuse([lee_bm25, lee_aft], spec))["ndcg@10"] == hybrid_s1
    assert not set(lee.queries) & set(read_beir(out / "data" / "lee-dev", "test").queries)
    assert "## Out of domain" in (out / "report.md").read_text()
    dev_queries = (out / "data" / "dev" / "queries.jsonl").read_text()
    test_ids = {json.loads(line)["_id"] for line in (out / "data" / "eval" / "queries.jsonl").read_text().splitlines()}
    assert not test_ids & {json.loads(line)["_id"] for line in dev_queries.splitlines()}
    curve = saved["label_curve"]
    assert [p["n"] for p in curve] == [0, 4] and curve[1]["seeds"] == 2 and len(curve[1]["adapted_scores"]) == 2
    assert curve[1]["adapted_scores"][0] == saved["systems"]["smollm2-adapted-finetuned"]["ndcg@10"]  # reused run
    assert curve[0]["unadapted"] == saved["systems"]["smollm2"]["ndcg@10"]
    assert curve[0]["adapted"] == saved["systems"]["smollm2-adapted"]["ndcg@10"]
    for name in ("report.md", "systems.png", "label_curve.png", "adapt_losses.png", "finetune_adapted_loss.png"):
        assert (out / name).is_file(), name
    assert "| hybrid |" in (out / "report.md").read_text()
    estimate = saved["time_estimate"]  # printed at the start from this machine's probe, kept beside the measured time
    assert estimate["seconds"] > 0 and estimate["measured_seconds"] > 0
    assert set(estimate["tokens_per_s"]) == {"train", "encode", "encode_fp32"}
    assert f"estimated at the start: {estimate['seconds']:.0f} s" in (out / "report.md").read_text()

    # Repeatable: a second run from scratch, in another folder, gives exactly the same figures. (It starts from
    # the first run's data stage, files built from the bundled packages: every model is trained and scored again.)
    shutil.copytree(out / "data", tmp_path / "fresh" / "data")
    records = json.loads((out / "stages.json").read_text())
    (tmp_path / "fresh" / "stages.json").write_text(json.dumps({k: v for k, v in records.items()
                                                                if k.startswith("data/")}))
    fresh = demo(output=str(tmp_path / "fresh"), settings=tiny_settings(tiny_model_dir))

    def figures(r: dict) -> dict:
        return {k: {m: v for m, v in e.items() if m != "model"} for k, e in r["systems"].items()}

    assert figures(fresh) == figures(report) and fresh["label_curve"] == report["label_curve"]
    assert fresh["settings"]["recipe_choice"] == report["settings"]["recipe_choice"]
    assert fresh["out_of_domain"] == report["out_of_domain"]

    # A second run reuses every finished stage: no training, no encoding.
    def no_training(*args, **kwargs):
        pytest.fail("a finished stage ran again")

    monkeypatch.setattr("llama2vec.finetune.finetune", no_training)
    monkeypatch.setattr("llama2vec.adapt.adapt", no_training)
    monkeypatch.setattr(demo_mod, "evaluate_system", lambda *a, **k: json.loads(a[2].read_text()))
    again = demo(output=str(out), settings=tiny_settings(tiny_model_dir))
    assert again["systems"] == report["systems"]

    # Other settings into the same folder: what they change is recomputed (and said), the rest reused.
    # (Other eval queries make other dev sets, which could choose another query prompt or recipe, and so other
    # fine-tuning runs: both are fixed to the first run's choices, whatever they came out to.)
    monkeypatch.undo()
    monkeypatch.setattr("llama2vec.finetune.finetune", no_training)
    monkeypatch.setattr("llama2vec.adapt.adapt", no_training)
    capsys.readouterr()
    tiny = tiny_settings(tiny_model_dir)
    chosen = [r for r in tiny.recipes if r.name == report["settings"]["recipe"]["name"]]
    other = demo(output=str(out), settings=dataclasses.replace(tiny, eval_queries=10, recipes=chosen,
                                                               query_prompt=settings["query_prompt"]))
    said = capsys.readouterr().out
    assert "data/eval: made with another queries: recomputed" in said
    assert "eval/bm25.json: made with another data: recomputed" in said
    assert other["settings"]["eval_queries"] == 10 and len(read_beir(out / "data" / "eval", "test").queries) == 10


# `measure_rates` on the 2-core Xeon of BENCHMARKS.md ("The demo's time estimate"), on either path.
PROBED = {("fp32", "torch"): Rates(train=0.00373, encode=0.00120, encode_fp32=0.00120),
          ("bf16-mixed", "torch-bfloat16"): Rates(train=0.00272, encode=0.00044, encode_fp32=0.00110)}


def test_estimates_fit_the_presets():
    for (precision, backend), rates in PROBED.items():
        quick = dataclasses.replace(PRESETS["quick"], precision=precision, backend=backend)
        assert estimate_seconds(quick, rates, 200, 150, (200, 150)) < 15 * 60, precision
    # The work is priced at the measured speed: a machine half as fast takes twice the time, less the fixed part.
    quick, rates = PRESETS["quick"], PROBED[("fp32", "torch")]
    half = Rates(*(2 * x for x in dataclasses.astuple(rates)))
    fixed = demo_mod._FIXED_S
    twice = 2 * (estimate_seconds(quick, rates, 200, 150, (200, 150)) - fixed)
    assert estimate_seconds(quick, half, 200, 150, (200, 150)) - fixed == pytest.approx(twice)
    # More work, more time: the full preset against the quick one, a bigger corpus against a smaller.
    assert estimate_seconds(PRESETS["full"], rates, 603, 403, (422, 222)) > 5 * estimate_seconds(
        quick, rates, 200, 150, (200, 150))
    assert estimate_seconds(quick, rates, 2000, 150, (200, 150)) > estimate_seconds(quick, rates, 200, 150, (200, 150))


def test_the_probe_times_both_passes_on_the_run_s_path(tiny_model_dir, monkeypatch):
    s = dataclasses.replace(PRESETS["quick"], base_model=str(tiny_model_dir), precision="bf16-mixed",
                            backend="torch-bfloat16")
    rates = demo_mod.measure_rates(s, tokens=16)
    assert all(0 < x < 1 for x in dataclasses.astuple(rates))
    plain = demo_mod.measure_rates(dataclasses.replace(s, precision="fp32", backend="torch"), tokens=16)
    assert plain.encode == plain.encode_fp32  # one float32 pass serves both


def test_precision_and_backend_follow_the_hardware(monkeypatch):
    quick = PRESETS["quick"]
    monkeypatch.setattr("llama2vec.models.fast_bfloat16", lambda: (True, "a CUDA GPU"))
    fast = demo_mod.resolve_speed(quick)
    assert (fast.precision, fast.backend, fast.speed_reason) == ("bf16-mixed", "torch-bfloat16", "a CUDA GPU")
    monkeypatch.setattr("llama2vec.models.fast_bfloat16", lambda: (False, "no bfloat16 here"))
    slow = demo_mod.resolve_speed(quick)
    assert (slow.precision, slow.backend) == ("fp32", "torch")
    chosen = demo_mod.resolve_speed(dataclasses.replace(quick, precision="fp32", backend="onnx-int8"))
    assert (chosen.precision, chosen.backend) == ("fp32", "onnx-int8")  # explicit settings are kept
    assert chosen.speed_reason == "set explicitly"
    half = demo_mod.resolve_speed(dataclasses.replace(quick, precision="bf16-mixed"))
    assert (half.precision, half.backend) == ("bf16-mixed", "torch") and "no bfloat16 here" in half.speed_reason


def test_the_cpu_path_is_forced_by_one_variable(monkeypatch):
    """LLAMA2VEC_CPU_BF16 decides the path on a CPU whatever its instructions; a bad value is named."""
    from llama2vec.errors import Llama2VecError
    from llama2vec.models import cpu_bf16

    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    quick = PRESETS["quick"]
    for value, precision, backend in (("0", "fp32", "torch"), ("1", "bf16-mixed", "torch-bfloat16")):
        monkeypatch.setenv("LLAMA2VEC_CPU_BF16", value)
        assert cpu_bf16() == (value == "1", f"forced by $LLAMA2VEC_CPU_BF16={value}")
        s = demo_mod.resolve_speed(quick)
        assert (s.precision, s.backend) == (precision, backend)
        lines = demo_mod._choices({**dataclasses.asdict(s), "encoding_choice": {
            "dev_ndcg@10": {}, "chosen": "self", "passage_max_length": 64}, "recipe": dataclasses.asdict(FULL_2E5),
            "recipe_choice": None})
        assert lines[0] == (f"- Training in {precision}, encoding with the `{backend}` backend (forced by "
                            f"$LLAMA2VEC_CPU_BF16={value}; `LLAMA2VEC_CPU_BF16=0` or `1` forces the path).")
    monkeypatch.setenv("LLAMA2VEC_CPU_BF16", "yes")
    with pytest.raises(Llama2VecError, match=r"\$LLAMA2VEC_CPU_BF16 is 'yes': set it to 1 .* or 0"):
        demo_mod.resolve_speed(quick)
    monkeypatch.delenv("LLAMA2VEC_CPU_BF16")
    fast, why = cpu_bf16()  # the probe: oneDNN's answer on this CPU
    assert isinstance(fast, bool) and "bfloat16 instructions" in why
