"""The benchmark suite: every benchmark side by side in one run, a table of ratios against targets,
and the results appended to BENCHMARKS.md with the command and the machine.

    python bench/suite.py                       # everything, CPU float32 (what `make bench` runs)
    python bench/suite.py --only peak encode    # a subset
    python bench/suite.py --device cuda --only peak adapt encode --output OUT/BENCHMARKS.md   # bf16 GPU

Benchmarks: peak (matmul GFLOP/s, the reference of every MFU figure), adapt (step throughput, MFU,
joint vs two passes), padding (with and without length grouping), encode (llama2vec against
sentence-transformers and a plain Hugging Face loop on the same weights, pooling, batch and
lengths), lastlayer (the last layer at the pooled positions only vs the whole layer), memory (peak
resident memory; logits only at the placeholders vs everywhere), search
(FAISS exact vs HNSW), int8 (the onnx-int8 encoding backend: speed-up and BBC test nDCG@10).
Timings are medians of repeats or single passes over hundreds of passages, never asserted in tests.
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from adapt_step import sync
from report import append_report, machine, markdown_table

ALL = ["peak", "adapt", "padding", "encode", "lastlayer", "memory", "search", "int8"]


@dataclass
class Section:
    title: str
    description: str
    header: list[str]
    rows: list[list[str]]
    checks: list[tuple[str, str, str, bool | None]] = field(default_factory=list)  # figure, value, target, met


# --------------------------------------------------------------------------------------------
# Shared helpers


def matmul_peak(device: str = "cpu", dtype=torch.float32, n: int = 2048, repeats: int = 10) -> float:
    """Matrix-product GFLOP/s through torch on this machine: the best of `repeats` products (the rate
    the hardware reaches; a shared machine only ever slows a product down)."""
    if device == "cuda":
        n = 8192
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    sync(device)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        sync(device)
        times.append(time.perf_counter() - t)
    return 2 * n**3 / min(times) / 1e9


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def non_embedding_params(model) -> int:
    return sum(p.numel() for name, p in model.named_parameters() if "embed" not in name and "lm_head" not in name)


def forward_flops(model, lengths: list[int], k: int | None = None) -> float:
    """Forward FLOPs of rows of these (unpadded) lengths, no LM head: 2 per non-embedding
    parameter per token, plus the attention products (QK^T and AV: 4 * n * d per token per layer).
    With `k`, the work encoding needs: the last layer's keys and values at every token, the rest of
    that layer (queries, attention, output projection, MLP) only at the last k tokens."""
    cfg = model.config
    d, layers = cfg.hidden_size, cfg.num_hidden_layers
    per_layer = non_embedding_params(model) / layers
    if k is None:
        return float(sum(n * layers * (2 * per_layer + 4 * n * d) for n in lengths))
    kv = 2 * d * cfg.num_key_value_heads * (d // cfg.num_attention_heads)  # k_proj + v_proj weights
    last = [2 * n * kv + k * (2 * (per_layer - kv) + 4 * n * d) for n in lengths]
    return float(sum(n * (layers - 1) * (2 * per_layer + 4 * n * d) for n in lengths) + sum(last))


def bbc_texts(count: int) -> list[str]:
    from llama2vec.bbc import read_articles

    return [f"{a.headline}\n{a.body}" for a in read_articles()][:count]


def dtype_of(device: str):
    return torch.bfloat16 if device == "cuda" else torch.float32


# --------------------------------------------------------------------------------------------
# 2. Adaptation step


def bench_adapt(args, peak: float) -> Section:
    from adapt_step import measure

    rows = measure(args.adapt_lengths, args.batch_size, args.repeats, peak, args.device)
    table = [[str(r["length"]), r["mode"], f"{r['step_s']:.3f}", f"{r['tokens_s']:.0f}", f"{r['mfu']:.2f}",
              f"{r['speedup']:.2f}x" if "speedup" in r else ""] for r in rows]
    checks = []
    for r in rows:
        if r["mode"] == "joint" and r["length"] == 128:
            checks.append(("adapt MFU @128", f"{r['mfu']:.3f}", ">= 0.70", r["mfu"] >= 0.70))
        if r["mode"] == "joint" and r["length"] == 512:
            checks.append(("joint vs two passes @512", f"{r['speedup']:.2f}x", ">= 1.8x", r["speedup"] >= 1.8))
    return Section(f"Adaptation step (SmolLM2-135M, batch {args.batch_size}, {args.dtype_name})",
                   f"median of {args.repeats} steps (forward, backward, AdamW) per mode, modes alternating; MFU "
                   "counts 6 FLOPs per non-embedding parameter per token, attention, and the LM head at the 2K "
                   "placeholders, over the tokens each mode needs (joint: T once with both suffixes; two passes: "
                   "T twice, once per suffix).",
                   ["passage tokens", "mode", "step (s)", "passage tokens/s", "MFU", "joint speed-up"], table, checks)


def bench_padding(args, peak: float) -> Section:
    from padding import measure

    rows, fixed = measure(args.adapt_lengths, args.batch_size)
    table = [[str(r[0]), str(r[1]), f"{r[2]:.1f}", f"{r[3]:.1%}", f"{r[4]:.1%}"] for r in rows]
    checks = [(f"padding @{r[0]}, grouped", f"{r[4]:.1%}", "< 5%", r[4] < 0.05) for r in rows]
    return Section(f"Padding in adaptation batches (batch {args.batch_size})",
                   f"share of all processed token slots (text plus the {fixed} prompt tokens of the joint layout) "
                   "that are padding, over one epoch of the Wikipedia sample's pairs.",
                   ["chunk tokens", "pairs", "mean text tokens", "padding, random batches", "padding, length-grouped"],
                   table, checks)


# --------------------------------------------------------------------------------------------
# 3. Encoding


def encoding_inputs(tok, spec, texts: list[str]) -> tuple[list[list[int]], list[str]]:
    """(prompted token rows, the same rows as strings for tools that tokenise themselves)."""
    from llama2vec.prompts import prompt_ids

    ids = prompt_ids(spec, tok)
    rows = [ids.wrap(r[: spec.max_length], "self") for r in tok(texts, add_special_tokens=False)["input_ids"]]
    strings = [tok.decode(r) for r in rows]  # re-tokenises to the same ids (checked by the cosine column)
    return rows, strings


class PlainLoop:
    """The loop a user writes by hand: AutoModel, batches in corpus order, right padding, the last
    real token's state."""

    def __init__(self, folder: str, device: str, batch_size: int, max_length: int):
        from transformers import AutoModel, AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(folder)
        self.tok.padding_side = "right"
        self.model = AutoModel.from_pretrained(folder, dtype=dtype_of(device)).to(device).eval()
        self.device, self.batch_size, self.max_length = device, batch_size, max_length

    @torch.no_grad()
    def encode(self, strings: list[str]) -> np.ndarray:
        out = []
        for i in range(0, len(strings), self.batch_size):
            enc = self.tok(strings[i: i + self.batch_size], padding=True, truncation=True,
                           max_length=self.max_length, return_tensors="pt").to(self.device)
            states = self.model(**enc).last_hidden_state
            last = enc["attention_mask"].sum(1) - 1
            emb = states[torch.arange(states.shape[0], device=self.device), last]
            out.append(torch.nn.functional.normalize(emb.float(), dim=-1).cpu().numpy())
        return np.concatenate(out)


def sentence_transformer(folder: str, device: str, max_length: int):
    from sentence_transformers import SentenceTransformer, models

    # Plain text in, no chat template: the same tokens as the other systems.
    text_only = {"text": {"method": "forward", "method_output_name": "last_hidden_state"}}
    word = models.Transformer(folder, max_seq_length=max_length, model_kwargs={"dtype": dtype_of(device)},
                              modality_config=text_only, module_output_name="token_embeddings")
    word.tokenizer.padding_side = "right"
    pooling = models.Pooling(word.get_word_embedding_dimension(), pooling_mode="lasttoken")
    return SentenceTransformer(modules=[word, pooling], device=device)


def whole_last_layer_states(lm, ids, pos, mask, k: int):
    """The plain path `last_states` replaces: the whole forward, then the last k states."""
    from llama2vec.losses import decoder_states

    return decoder_states(lm, ids, pos, mask)[:, -k:]


def whole_last_layer(encoder):
    """The same encoder (sharing its model) on the plain path: the last layer run at every position."""
    plain = copy.copy(encoder)
    plain.states_fn = whole_last_layer_states
    return plain


def bench_encode(args, peak: float) -> Section:
    from llama2vec.config import PromptConfig
    from llama2vec.encoder import Llama2Vec
    from llama2vec.models import resolve_model_path
    from llama2vec.prompts import resolve_prompt

    folder = resolve_model_path("smollm2")
    texts = bbc_texts(args.passages)
    spec = resolve_prompt(PromptConfig(prompt_preset="paper"), args.encode_length)  # K=1, last token: ST can pool it
    ours = Llama2Vec.from_pretrained("smollm2", device=args.device, prompt=PromptConfig(prompt_preset="paper"),
                                     max_length=args.encode_length, batch_size=args.encode_batch)
    rows, strings = encoding_inputs(ours.tokenizer, spec, texts)
    lengths = [len(r) for r in rows]
    longest = max(lengths) + 2
    flops = forward_flops(ours.model, lengths, ours.ids.k)
    # Each system maps a list of passage indices to embeddings.
    systems = {"llama2vec (length-sorted)": lambda idx: ours.encode_corpus([texts[i] for i in idx])}
    whole = whole_last_layer(ours)
    systems["llama2vec, whole last layer"] = lambda idx: whole.encode_corpus([texts[i] for i in idx])
    st = sentence_transformer(folder, args.device, longest)
    systems["sentence-transformers"] = lambda idx: st.encode(
        [strings[i] for i in idx], batch_size=args.encode_batch, normalize_embeddings=True, convert_to_numpy=True)
    plain = PlainLoop(folder, args.device, args.encode_batch, longest)
    systems["plain HF loop (corpus order)"] = lambda idx: plain.encode([strings[i] for i in idx])
    if args.device == "cpu":
        for backend in ("torch-compile", "onnx", "onnx-int8"):
            enc = Llama2Vec.from_pretrained("smollm2", backend=backend, prompt=PromptConfig(prompt_preset="paper"),
                                            max_length=args.encode_length, batch_size=args.encode_batch)
            systems[f"llama2vec, backend {backend}"] = lambda idx, e=enc: e.encode_corpus([texts[i] for i in idx])
    # Rounds over equal parts of the passages, the systems in one order then the reverse, so that no
    # system gains from its place in the run; each system's time is the sum of its rounds, and the
    # per-round time ratios show the spread.
    results = dict.fromkeys(systems, 0.0)
    rounds: dict[str, list[float]] = {name: [] for name in systems}
    parts: dict[str, list[np.ndarray]] = {name: [] for name in systems}
    warm_up = {name: timed(lambda r=run: r(list(range(args.encode_batch)))) for name, run in systems.items()}
    for r, idx in enumerate(np.array_split(np.arange(len(texts)), args.encode_rounds)):
        for name in (list(systems) if r % 2 == 0 else list(reversed(systems))):
            sync(args.device)
            t = time.perf_counter()
            parts[name].append(systems[name](idx.tolist()))
            sync(args.device)
            rounds[name].append(time.perf_counter() - t)
            results[name] += rounds[name][-1]
    embeddings = {name: np.concatenate(p) for name, p in parts.items()}
    base = "llama2vec (length-sorted)"
    table = []
    for name, secs in results.items():
        agree = float((embeddings[name] * embeddings[base]).sum(1).mean())
        spread = [a / b for a, b in zip(rounds[name], rounds[base])]
        table.append([name, f"{warm_up[name]:.1f}", f"{secs:.1f}", f"{len(texts) / secs:.2f}",
                      f"{flops / secs / (peak * 1e9):.2f}", f"{results[name] / results[base]:.2f}",
                      f"{min(spread):.2f}-{max(spread):.2f}", f"{agree:.4f}"])
    checks = []
    for name, label in ((base, ""), ("llama2vec, backend torch-compile", ", torch-compile")):
        if name not in results:
            continue
        mfu = flops / results[name] / (peak * 1e9)
        st_ratio = results["sentence-transformers"] / results[name]
        checks += [(f"encode MFU{label}", f"{mfu:.3f}", ">= 0.85", mfu >= 0.85),
                   (f"encode vs sentence-transformers{label}", f"{st_ratio:.2f}x", ">= 1.0x", st_ratio >= 1.0)]
    if "llama2vec, backend onnx-int8" in results:
        speed = results[base] / results["llama2vec, backend onnx-int8"]
        checks.append(("onnx-int8 vs float32 passages/s", f"{speed:.2f}x", ">= 1.5x", speed >= 1.5))
    return Section(f"Encoding {len(texts)} BBC passages with SmolLM2 ({args.dtype_name}, batch {args.encode_batch})",
                   f"passages cut to {args.encode_length} tokens, paper prompt (K=1, last-token pooling) so that every "
                   f"tool pools the same way; {sum(lengths)} tokens with the prompt; {args.encode_rounds} timed "
                   "rounds (equal parts of the passages, the systems' order reversed every other round), times "
                   "summed; 'warm-up' is one batch before the rounds, not in the time (torch-compile compiles "
                   "there). MFU: the forward FLOPs encoding needs (real, unpadded tokens; the last layer's "
                   "queries, attention and MLP only at the pooled token) / time / peak. 'time ratio' is the time over "
                   "llama2vec's, 'ratio by round' its range over the rounds; 'cosine' the mean cosine with "
                   "llama2vec's embeddings (the same model and inputs).",
                   ["system", "warm-up (s)", "time (s)", "passages/s", "MFU", "time ratio", "ratio by round",
                    "cosine"], table, checks)


def last_layer_row(args, preset: str) -> tuple[list, tuple]:
    """One prompt preset's row of `bench_last_layer` and its check."""
    from llama2vec.collate import left_pad
    from llama2vec.config import PromptConfig
    from llama2vec.encoder import Llama2Vec
    from llama2vec.losses import last_states, unwrap_lm

    enc = Llama2Vec.from_pretrained("smollm2", device=args.device, prompt=PromptConfig(prompt_preset=preset),
                                    max_length=args.encode_length)
    lm, k = unwrap_lm(enc.model), enc.ids.k
    cut, task = enc.fit(enc.tokenize(bbc_texts(args.encode_batch)), "passage")
    rows = [enc.ids.wrap(r, task) for r in cut]
    ids, mask, pos = (x.to(lm.device) for x in left_pad(rows, enc.tokenizer.pad_token_id))
    paths = {"last layer at K": lambda: last_states(lm, ids, pos, mask, k),
             "whole last layer": lambda: whole_last_layer_states(lm, ids, pos, mask, k)}
    times: dict[str, list[float]] = {name: [] for name in paths}
    with torch.inference_mode():
        diff = float((paths["last layer at K"]() - paths["whole last layer"]()).abs().max())
        for r in range(args.repeats_last_layer):
            for name in (list(paths) if r % 2 == 0 else list(reversed(paths))):
                sync(args.device)
                t = time.perf_counter()
                paths[name]()
                sync(args.device)
                times[name].append(time.perf_counter() - t)
    ratio = statistics.median(w / f for w, f in zip(times["whole last layer"], times["last layer at K"]))
    lengths = [len(r) for r in rows]
    ideal = forward_flops(enc.model, lengths) / forward_flops(enc.model, lengths, k)
    row = [preset, k, f"{statistics.median(times['whole last layer']):.3f}",
           f"{statistics.median(times['last layer at K']):.3f}", f"{ratio:.3f}x", f"{ideal:.3f}x", f"{diff:.1e}"]
    return row, (f"last layer at K vs whole, {preset} prompt", f"{ratio:.3f}x", f"(FLOPs: {ideal:.3f}x)", None)


def bench_last_layer(args, peak: float) -> Section:
    """The encoder's forward with the last layer at the pooled positions only, against the whole last
    layer: the same batch of real passages, the two paths alternating, paired ratios."""
    results = [last_layer_row(args, preset) for preset in ("paper", "llara")]
    return Section(f"The last layer at the pooled positions only ({args.encode_batch} BBC passages, "
                   f"{args.encode_length} tokens, {args.dtype_name})",
                   f"one batch, the two paths alternating {args.repeats_last_layer} times; times are medians, the "
                   "speed-up the median of paired ratios; 'FLOPs' the ratio of the work each path does; 'max diff' "
                   "the largest absolute difference of the pooled states.",
                   ["prompt", "K", "whole last layer (s)", "last layer at K (s)", "speed-up", "FLOPs", "max diff"],
                   [r for r, _ in results], [c for _, c in results])


# --------------------------------------------------------------------------------------------
# 4. Memory (each probe in a fresh process: peak resident memory is per process)


def high_water_mb() -> float:
    """This process's peak resident memory (VmHWM). Unlike getrusage's ru_maxrss, it restarts at exec,
    so a probe started from a large parent does not inherit the parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def probe(kind: str, length: int, batch: int) -> dict:
    """Run one adaptation step or one encoding pass; report peak RSS and RSS after loading."""
    from llama2vec.collate import PretextCollator, excluded_target_ids
    from llama2vec.config import ModelConfig, PromptConfig
    from llama2vec.losses import PretextModel, PretextWeights
    from llama2vec.models import add_placeholder_tokens, load_causal_lm
    from llama2vec.prompts import prompt_ids, resolve_prompt

    tok, model, _ = load_causal_lm(ModelConfig(device="cpu"))
    spec = resolve_prompt(PromptConfig(), length)
    add_placeholder_tokens(tok, model, spec.new_tokens())
    ids = prompt_ids(spec, tok)
    from adapt_step import passages

    rows = passages(tok, length, 4 * batch)  # real Wikipedia windows of exactly `length` tokens
    loaded = high_water_mb()
    if kind.startswith("adapt"):
        batch_rows = rows[: batch + 1]
        examples = [{"text": batch_rows[i], "next": batch_rows[i + 1]} for i in range(batch)]
        inputs = PretextCollator(ids, tok.pad_token_id, excluded_target_ids(tok, ids), length)(examples)
        model.train()
        out = PretextModel(model, PretextWeights(), all_logits=kind == "adapt-all-logits")(**inputs)
        out["loss"].backward()
    else:
        from llama2vec.encoder import Llama2Vec

        Llama2Vec(model, tok, spec, batch_size=batch).encode_ids(rows[: 4 * batch], "self")
    return {"loaded_mb": loaded, "peak_mb": high_water_mb()}


LABELS = {"adapt": "adaptation step, logits at the placeholders only",
          "adapt-all-logits": "adaptation step, logits everywhere (plain forward)", "encode": "encoding"}


def bench_memory(args, peak: float) -> Section:
    table, found = [], {}
    for kind, length, batch in (("adapt", 128, 8), ("adapt-all-logits", 128, 8), ("adapt", 512, 8),
                                ("adapt-all-logits", 512, 8), ("encode", 128, 32)):
        cmd = [sys.executable, __file__, "--probe", kind, "--probe-length", str(length), "--probe-batch", str(batch)]
        lines = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()
        res = json.loads(lines[-1])
        found[(kind, length)] = res
        table.append([LABELS[kind], str(length), str(batch), f"{res['loaded_mb']:.0f}", f"{res['peak_mb']:.0f}",
                      f"{res['peak_mb'] - res['loaded_mb']:.0f}"])
    checks = []
    for length in (128, 512):
        fast, plain = found[("adapt", length)], found[("adapt-all-logits", length)]
        saved = (plain["peak_mb"] - plain["loaded_mb"]) / max(fast["peak_mb"] - fast["loaded_mb"], 1)
        checks.append((f"step memory, all logits / placeholder logits @{length}", f"{saved:.2f}x", "(information)",
                       None))
    return Section("Peak resident memory (SmolLM2, float32, CPU)",
                   "each row is a fresh process: load the model, then one adaptation step (forward and backward) or "
                   "one encoding pass over 128 passages; 'step' is the peak minus the resident size after loading.",
                   ["work", "tokens", "batch", "after loading (MB)", "peak (MB)", "step (MB)"], table, checks)


# --------------------------------------------------------------------------------------------
# 5. Search


def bench_search(args, peak: float) -> Section:
    import faiss

    from llama2vec.bbc import read_articles
    from llama2vec.evaluate import load_encoder
    from llama2vec.index import build_index, search_index

    articles = read_articles()
    encoder = load_encoder("minilm", device=args.device, batch_size=64)
    passages = encoder.encode_corpus([a.body for a in articles])
    queries = encoder.encode_queries([a.headline for a in articles])
    k, table = 10, []
    exact = build_index(passages, "Flat")
    search_index(exact, queries[:100], k)  # warm-up
    exact_s = statistics.median(timed(lambda: search_index(exact, queries, k)) for _ in range(3))
    _, truth = search_index(exact, queries, k)
    table.append(["Flat (exact)", "", f"{len(queries) / exact_s:.0f}", "1.000"])
    t = time.perf_counter()
    hnsw = build_index(passages, "HNSW32")
    build_s = time.perf_counter() - t
    checks = []
    for ef in (16, 64, 256):
        search_index(hnsw, queries[:100], k, params=f"efSearch={ef}")  # warm-up
        secs = statistics.median(timed(lambda ef=ef: search_index(hnsw, queries, k, params=f"efSearch={ef}"))
                                 for _ in range(3))
        _, found = search_index(hnsw, queries, k, params=f"efSearch={ef}")
        recall = np.mean([len(set(found[i]) & set(truth[i])) / k for i in range(len(queries))])
        table.append([f"HNSW32, efSearch={ef}", f"{build_s:.2f}", f"{len(queries) / secs:.0f}", f"{recall:.3f}"])
        checks.append((f"HNSW efSearch={ef} speed vs exact", f"{exact_s / secs:.2f}x", "(information)", None))
    return Section(f"Search: FAISS exact vs HNSW ({len(passages)} BBC passages, {len(queries)} headline queries)",
                   f"all-MiniLM-L6-v2 embeddings ({passages.shape[1]} dimensions); {faiss.omp_get_max_threads()} "
                   "FAISS threads; median of 3 timed searches of all queries after a warm-up; recall@10 of the "
                   "HNSW top 10 "
                   "against the exact top 10.",
                   ["index", "build (s)", "queries/s", "recall@10 vs exact"], table, checks)


# --------------------------------------------------------------------------------------------
# 7. int8 encoding: speed (in `encode`) and retrieval quality


def bench_int8(args, peak: float) -> Section:
    from llama2vec.encoder import Llama2Vec
    from llama2vec.evaluate import dense_retrieve
    from llama2vec.formats import read_beir
    from llama2vec.metrics import evaluate_run

    model, dataset = args.int8_model, Path(args.int8_dataset)
    if model is None:  # the full demo's smollm2-adapted-finetuned, from its report
        report = Path("runs/demo-full/report.json")
        systems = json.loads(report.read_text())["systems"] if report.is_file() else {}
        model = systems.get("smollm2-adapted-finetuned", {}).get("model") or ""
    model = Path(model)
    if not (model / "llama2vec_config.json").is_file() or not (dataset / "corpus.jsonl").is_file():
        raise SystemExit(f"int8: needs a fine-tuned model folder ({model}) and a BEIR folder ({dataset}); run "
                         "`llama2vec demo --preset full` first or pass --int8-model and --int8-dataset")
    data = read_beir(dataset, "test")
    table, found = [], {}
    for name, backend, dtype in (("torch float32", "torch", "float32"), ("torch bfloat16", "torch", "bfloat16"),
                                 ("onnx-int8", "onnx-int8", "float32")):
        enc = Llama2Vec.from_pretrained(str(model), device="cpu", dtype=dtype, backend=backend,
                                        batch_size=args.encode_batch)
        t = time.perf_counter()
        metrics = evaluate_run(data.qrels, dense_retrieve(enc, data, 100))
        secs = time.perf_counter() - t
        found[name] = (metrics, secs)
        table.append([name, f"{metrics['ndcg@10']:.4f}", f"{metrics['mrr@10']:.4f}",
                      f"{metrics['recall@100']:.4f}", f"{secs:.0f}", f"{found['torch float32'][1] / secs:.2f}x"])
    delta = found["onnx-int8"][0]["ndcg@10"] - found["torch float32"][0]["ndcg@10"]
    speed = found["torch float32"][1] / found["onnx-int8"][1]
    bf16 = found["torch bfloat16"][0]["ndcg@10"] - found["torch float32"][0]["ndcg@10"]
    return Section(f"int8 encoding: BBC test retrieval ({len(data.queries)} queries, {len(data.corpus)} passages)",
                   f"model {model}; dataset {dataset}; the same model encoded on the CPU by torch in float32 and "
                   "in bfloat16 and by the onnx-int8 backend (export cached beforehand, not timed); time = "
                   "encoding the passages and queries plus exact search; 'speed-up' against torch float32.",
                   ["encoder", "ndcg@10", "mrr@10", "recall@100", "time (s)", "speed-up"], table,
                   [("onnx-int8 nDCG@10 - float32", f"{delta:+.4f}", "within 0.005", abs(delta) <= 0.005),
                    ("onnx-int8 end-to-end speed-up", f"{speed:.2f}x", "(information)", None),
                    ("torch bfloat16 (CPU) nDCG@10 - float32", f"{bf16:+.4f}", "(information)", None)])


# --------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", nargs="+", choices=ALL, default=ALL)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--output", default="BENCHMARKS.md")
    parser.add_argument("--batch-size", type=int, default=8, help="Adaptation batch.")
    parser.add_argument("--adapt-lengths", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--passages", type=int, default=512, help="BBC passages to encode.")
    parser.add_argument("--encode-length", type=int, default=128)
    parser.add_argument("--encode-batch", type=int, default=32)
    parser.add_argument("--encode-rounds", type=int, default=2, help="Timed rounds of the encode benchmark.")
    parser.add_argument("--repeats-last-layer", type=int, default=10)
    parser.add_argument("--int8-model", default=None,
                        help="Default: smollm2-adapted-finetuned of runs/demo-full/report.json.")
    parser.add_argument("--int8-dataset", default="runs/demo-full/data/bbc",
                        help="A BEIR folder; default: the whole BBC test protocol (403 queries, 2,089 passages).")
    parser.add_argument("--probe", help=argparse.SUPPRESS)
    parser.add_argument("--probe-length", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--probe-batch", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.device == "cpu":
        torch.set_flush_denormal(True)
    if args.probe:
        print(json.dumps(probe(args.probe, args.probe_length, args.probe_batch)))
        return
    args.dtype_name = "bfloat16" if args.device == "cuda" else "float32"
    command = "python bench/suite.py " + " ".join(sys.argv[1:])
    start = time.time()
    peak = matmul_peak(args.device, dtype_of(args.device))
    sections = [Section("Peak", "matrix products of 2048 x 2048 (8192 on GPU), best of 10",
                        ["figure", "value"], [[f"{args.dtype_name} matmul GFLOP/s", f"{peak:.0f}"]])]
    runners = {"adapt": bench_adapt, "padding": bench_padding, "encode": bench_encode,
               "lastlayer": bench_last_layer, "memory": bench_memory,
               "search": bench_search, "int8": bench_int8}
    for name in args.only:
        if name in runners:
            print(f"[{time.time() - start:.0f}s] {name} ...", flush=True)
            try:
                section = runners[name](args, peak)
            except Exception as err:  # one broken benchmark must not lose the others' figures
                section = Section(name, f"FAILED: {type(err).__name__}: {err}", ["error"], [[str(err)[:200]]])
            sections.append(section)
            print(f"### {section.title}\n\n{section.description}\n\n{markdown_table(section.header, section.rows)}",
                  flush=True)
    checks = [(f"{args.dtype_name} matmul peak (GFLOP/s)", f"{peak:.0f}", "(reference)", None)]
    checks += [c for s in sections for c in s.checks]
    summary = markdown_table(["figure", "measured", "target", "met"],
                             [[f, v, t, "" if m is None else ("yes" if m else "NO")] for f, v, t, m in checks])
    body = "\n".join(f"### {s.title}\n\n{s.description}\n\n{markdown_table(s.header, s.rows)}" for s in sections)
    append_report(args.output, "Benchmark suite", command,
                  f"{machine(args.device)}; {time.time() - start:.0f} s in all.",
                  f"{summary}\n{body}")


if __name__ == "__main__":
    main()
