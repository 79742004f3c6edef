"""The `llama2vec` command: one subcommand per pipeline stage. Heavy imports happen inside the
commands, so `--help` answers at once."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import textwrap
import warnings
from pathlib import Path

from .config import (
    FINETUNE_CONFIGS,
    DataConfig,
    ModelConfig,
    PretextConfig,
    PromptConfig,
    TrainConfig,
    add_flags,
    build_configs,
)
from .errors import Llama2VecError

DESCRIPTION = ("Llama2Vec: adapt a causal LLM into a dense retriever, then fine-tune, encode, index, search "
               "and evaluate.")


FUSION_HELP = ("How runs are fused: rrf (default: equal-weight reciprocal rank fusion, k 60); rrf:K:W1,W2 "
               "(weighted RRF); wsum:minmax:W1,W2 or wsum:zscore:W1,W2 (weighted sum of normalised scores); "
               "weights in the order {order}; auto: chosen on {auto} (see llama2vec.fusion), printed with its "
               "dev figures.")


PLAN_FLAGS = ("dry_run", "plan_gpus", "plan_gpu_memory", "plan_nodes", "plan_gpu_tflops", "plan_host_memory")


def _plan_args(args: argparse.Namespace) -> dict | None:
    """The --dry-run target (removed from `args`), or None for a real run."""
    values = {name: vars(args).pop(name, None) for name in PLAN_FLAGS}  # flags absent unless given
    if not values.pop("dry_run"):
        given = [f"--{k.replace('_', '-')}" for k, v in values.items() if v is not None and k != "plan_nodes"]
        if given:
            raise Llama2VecError(f"{', '.join(given)} describe(s) the target of --dry-run: add --dry-run")
        return None
    return {"gpus": values["plan_gpus"], "gpu_memory": values["plan_gpu_memory"], "nodes": values["plan_nodes"] or 1,
            "gpu_tflops": values["plan_gpu_tflops"], "host_memory": values["plan_host_memory"]}


def _add_plan_flags(p: argparse.ArgumentParser) -> None:
    """The --dry-run flags: absent from the parsed arguments unless given (they are no config's fields)."""
    g = p.add_argument_group("dry run", "Plan the launch without training: world size, each rank's device, the "
                                        "sharding, the memory each process needs against its device's, the steps, "
                                        "tokens and time; exits 2 with what would fit when it does not fit.")
    g.add_argument("--dry-run", action="store_true", default=argparse.SUPPRESS,
                   help="Print the plan and exit (0: it fits).")
    for flag, kind, text in (
            ("--plan-gpus", int, "Plan for this many GPUs (one process each) instead of the processes this command "
                                 "runs on."),
            ("--plan-gpu-memory", float, "GiB of each of those GPUs (an 80 GB H100 or A100: 80)."),
            ("--plan-nodes", int, "Machines the GPUs are spread over (default 1)."),
            ("--plan-gpu-tflops", float, "A GPU's dense bfloat16 TFLOP/s, for the time estimate (an H100 SXM: 989)."),
            ("--plan-host-memory", float, "GiB of CPU memory a node, checked under --fsdp.")):
        g.add_argument(flag, type=kind, default=argparse.SUPPRESS, help=text)


def _adapt(args: argparse.Namespace) -> None:
    from .adapt import adapt

    target = _plan_args(args)
    configs = build_configs(args, ModelConfig, PromptConfig, PretextConfig, DataConfig, TrainConfig)
    if target is not None:
        from .plan import dry_run

        model_cfg, prompt_cfg, pretext_cfg, data_cfg, train_cfg = configs
        dry_run("adapt", model_cfg, train_cfg, target, prompt_cfg, pretext_cfg, data_cfg)
        return
    result = adapt(*configs)
    if os.environ.get("RANK", "0") == "0":
        print(json.dumps({k: v for k, v in result.items() if k not in ("data", "model")}, indent=2, default=str))


def _finetune(args: argparse.Namespace) -> None:
    from .finetune import finetune

    target = _plan_args(args)
    configs = build_configs(args, *FINETUNE_CONFIGS)
    if target is not None:
        from .plan import dry_run

        model_cfg, prompt_cfg, con_cfg, train_cfg = configs
        dry_run("finetune", model_cfg, train_cfg, target, prompt_cfg, con_cfg=con_cfg)
        return
    result = finetune(*configs)
    if os.environ.get("RANK", "0") == "0":
        print(json.dumps({k: v for k, v in result.items() if k != "model"}, indent=2, default=str))


def _data(args: argparse.Namespace) -> None:
    from . import data

    if args.dataset == "wiki":
        n = data.build_wiki(args.output)
        print(f"wrote {n} Wikipedia articles to {args.output}")
    elif args.dataset == "chunk":
        from .models import add_placeholder_tokens, load_tokenizer, resolve_model_path
        from .prompts import resolve_prompt

        if not args.corpus:
            raise Llama2VecError("data chunk needs --corpus")
        tokenizer = load_tokenizer(resolve_model_path(args.model))
        # The placeholders that adapt adds: the cache records the tokenizer it was made with.
        spec = resolve_prompt(PromptConfig(prompt_preset=args.prompt_preset))
        add_placeholder_tokens(tokenizer, None, spec.new_tokens())
        folder = data.build_pair_cache(args.corpus, tokenizer, args.output, args.chunk_tokens, args.min_chunk_tokens,
                                       args.max_documents, workers=args.workers)
        print(f"wrote the pair cache {folder}: {data.PairDataset(folder).meta}")
    elif args.dataset == "lee":
        from .lee import build_lee

        counts = build_lee(args.output)
        print(f"wrote the Lee news BEIR folder (lede -> rest of the story) to {args.output}: {counts}")
    else:
        from .bbc import build_bbc

        counts = build_bbc(args.output, negatives=args.negatives)
        print(f"wrote the BBC BEIR folder to {args.output}: {counts}")


def _mine(args: argparse.Namespace) -> None:
    from .mine import mine

    n = mine(args.output, train=args.train, dataset=args.dataset, split=args.split, corpus=args.corpus,
             method=args.method, model=args.model, negatives=args.negatives, rank_range=tuple(args.rank_range),
             seed=args.seed, batch_size=args.batch_size)
    print(f"wrote {n} training examples with mined negatives to {args.output}")


def _encode_source(args: argparse.Namespace):
    """The texts `encode` reads: a BEIR corpus (streamed) or its queries, or a JSONL or Parquet file."""
    from pathlib import Path

    from .embeddings import FileSource, ListSource
    from .formats import beir_queries

    if args.dataset:
        if args.what == "corpus":  # no qrels needed: a folder of one's own documents is enough
            corpus = Path(args.dataset) / "corpus.jsonl"
            if not Path(args.dataset).is_dir():
                raise Llama2VecError(f"{args.dataset}: BEIR folder not found")
            return FileSource(corpus, require_id=True)
        queries = beir_queries(args.dataset, args.split)
        return ListSource(list(queries), list(queries.values()))
    if args.input:
        return FileSource(args.input)
    raise Llama2VecError("give --dataset DIR or --input FILE")


def _encode(args: argparse.Namespace) -> None:
    from pathlib import Path

    from .embeddings import encode_to_folder, merge

    if args.merge:
        print(f"completed {merge(args.output)}")
        return
    if not args.model:
        raise Llama2VecError("--model is needed (except with --merge)")
    source = _encode_source(args)
    if args.engine == "ray":
        from .ray_engine import encode_with_ray

        out = encode_with_ray(args.model, source, args.output, args.what, backend=args.backend,
                              shard_size=args.shard_size, dtype=args.dtype, batch_size=args.batch_size,
                              overwrite=args.overwrite, actors=args.ray_actors, address=args.ray_address)
    else:
        from .encoder import Llama2Vec

        encoder = Llama2Vec.from_pretrained(args.model, device=args.device, batch_size=args.batch_size,
                                            backend=args.backend)
        kind = "passage" if args.what == "corpus" else "query"
        out = encode_to_folder(encoder, source, args.output, kind, args.shard_size, args.dtype,
                               overwrite=args.overwrite, num_shards=args.num_shards, shard_index=args.shard_index)
    if (Path(out) / "meta.json").is_file():
        print(f"wrote the embeddings folder {out}")
    else:
        print(f"wrote this process's shards into {out}; the last process to finish completes it")


def _index(args: argparse.Namespace) -> None:
    from .index import index_folder
    from .store import read_json

    lance_only = {"--dataset": args.dataset, "--index-type": args.index_type, "--float16": args.float16,
                  "--partitions": args.partitions, "--sub-vectors": args.sub_vectors}
    if args.add or args.delete_ids:
        from .lance_store import is_store, update_store

        if args.store != "lancedb" or not is_store(args.output):
            raise Llama2VecError(f"--add and --delete-ids update a LanceDB store (--store lancedb --output STORE); "
                                 f"{args.output} is not one")
        if args.embeddings:
            raise Llama2VecError("--embeddings builds a store; to update one, give --add (and --dataset)")
        done = update_store(args.output, args.add, args.dataset, args.delete_ids)
        print(f"updated {args.output}: {done['added']} added, {done['replaced']} replaced, {done['deleted']} deleted")
        return
    if not args.embeddings:
        raise Llama2VecError("--embeddings: the embeddings folder to index")
    if args.store == "lancedb":
        from .lance_store import build_store

        if not args.dataset:
            raise Llama2VecError("--store lancedb needs --dataset: the BEIR folder whose passages the store holds")
        out = build_store(args.embeddings, args.dataset, args.output, args.index_type or "flat", args.float16,
                          args.train_size, args.partitions, args.sub_vectors, seed=args.seed)
        print(f"stored {args.embeddings} and the passages of {args.dataset} in the LanceDB store {out}")
        return
    given = [flag for flag, value in lance_only.items() if value]
    if given:
        raise Llama2VecError(f"{', '.join(given)}: options of --store lancedb")
    source = read_json(f"{args.embeddings}/meta.json").get("fingerprint")
    out = index_folder(args.embeddings, args.output, args.factory, args.train_size, args.pca, args.parts,
                       seed=args.seed, gpu=args.faiss_gpu, meta={"embeddings": source})
    print(f"indexed {args.embeddings} ({args.factory}{f' after PCA to {args.pca}' if args.pca else ''}) into {out}")


def _store_search(args: argparse.Namespace):
    """`search --mode fts` or `hybrid` over one LanceDB store: the query texts of --dataset (--split), and for
    hybrid the dense run of --queries fused with the full-text run by --fusion."""
    from pathlib import Path

    from .embeddings import load_embeddings
    from .evaluate import fuse_runs
    from .formats import beir_queries, read_qrels, read_run
    from .fusion import AUTO
    from .index import check_queries, search_shards
    from .lance_store import is_store, text_search
    from .store import read_json_or_none

    if len(args.index) != 1 or not is_store(args.index[0]):
        raise Llama2VecError(f"--mode {args.mode} searches one LanceDB store (index --store lancedb)")
    if not args.dataset:
        raise Llama2VecError(f"--mode {args.mode} needs --dataset: the BEIR folder of the query texts")
    texts = beir_queries(args.dataset, args.split)
    if args.mode == "fts":
        if args.fuse_run:
            raise Llama2VecError("--fuse-run goes with --mode dense or hybrid")
        return text_search(args.index[0], list(texts), list(texts.values()), args.k, args.where)
    if not args.queries:
        raise Llama2VecError("--mode hybrid needs --queries: the embeddings folder of the queries")
    qids, queries = load_embeddings(args.queries)
    missing = [q for q in qids if q not in texts]
    if missing:
        raise Llama2VecError(f"{args.queries}: queries not in {args.dataset} ({args.split}): {', '.join(missing[:5])}")
    made_by = (read_json_or_none(Path(args.queries) / "meta.json") or {}).get("fingerprint") or {}
    check_queries(args.index, made_by.get("model"), queries.shape[1], f"the queries of {args.queries}",
                  args.allow_model_mismatch)
    dense = search_shards(args.index, qids, queries, args.k, args.params, args.where)
    lexical = text_search(args.index[0], qids, [texts[q] for q in qids], args.k, args.where)
    dev_runs = [read_run(r) for r in args.dev_runs] if args.fusion == AUTO else None
    dev_qrels = read_qrels(Path(args.dev_qrels)) if args.fusion == AUTO else None
    runs = [dense, lexical, *(read_run(r) for r in args.fuse_run)]
    return fuse_runs(runs, args.fusion, args.k, dev_runs, dev_qrels, ["dense", "full-text", *args.fuse_run])


def _search(args: argparse.Namespace) -> None:
    from pathlib import Path

    from .embeddings import load_embeddings
    from .evaluate import fuse_runs
    from .formats import read_qrels, read_run, write_run
    from .fusion import AUTO, DEFAULT, parse_fusion
    from .index import check_queries, search_shards
    from .store import read_json_or_none

    systems = (2 if args.mode == "hybrid" else 1) + len(args.fuse_run)  # the runs --fusion fuses
    if args.fusion != DEFAULT and systems == 1:
        raise Llama2VecError(f"--fusion {args.fusion!r} needs --fuse-run (the runs to fuse with) or --mode hybrid")
    if (args.dev_runs or args.dev_qrels) and args.fusion != AUTO:
        raise Llama2VecError("--dev-runs and --dev-qrels go with --fusion auto")
    if args.fusion == AUTO and (len(args.dev_runs) != systems or not args.dev_qrels):
        order = "the dense then the full-text run of the store" if args.mode == "hybrid" else "this index's run"
        raise Llama2VecError(f"--fusion auto needs --dev-qrels and --dev-runs: {systems} runs on the dev queries, "
                             f"{order}, then one of each --fuse-run system in order ({len(args.dev_runs)} given)")
    if args.fusion not in (DEFAULT, AUTO):
        parse_fusion(args.fusion, systems)
    if args.mode != "dense":
        run = _store_search(args)
    else:
        if not args.queries:
            raise Llama2VecError("--queries: the embeddings folder of the queries (--mode dense)")
        qids, queries = load_embeddings(args.queries)
        made_by = (read_json_or_none(Path(args.queries) / "meta.json") or {}).get("fingerprint") or {}
        check_queries(args.index, made_by.get("model"), queries.shape[1], f"the queries of {args.queries}",
                      args.allow_model_mismatch)
        run = search_shards(args.index, qids, queries, args.k, args.params, args.where)
    if args.fuse_run and args.mode == "dense":
        dev_runs = [read_run(r) for r in args.dev_runs] if args.fusion == AUTO else None
        dev_qrels = read_qrels(Path(args.dev_qrels)) if args.fusion == AUTO else None
        run = fuse_runs([run, *(read_run(r) for r in args.fuse_run)], args.fusion, args.k, dev_runs, dev_qrels,
                        ["index", *args.fuse_run])
    write_run(args.output, run)
    print(f"wrote the top {args.k} of {len(run)} queries to {args.output}")


def _serve(args: argparse.Namespace) -> None:
    from .serve import serve

    serve(args.model, args.host, args.port, args.index, args.dataset, args.backend, args.device, args.drain_seconds,
          allow_model_mismatch=args.allow_model_mismatch, resident=args.resident, params=args.params,
          refresh_seconds=args.refresh_seconds,
          max_hits=args.max_hits, max_response_bytes=int(args.max_response_mb * 1024 * 1024),
          api_key=args.api_key or os.environ.get("LLAMA2VEC_API_KEY"),
          auto_truncate=args.auto_truncate,
          max_batch_tokens=args.max_batch_tokens, max_wait_ms=args.max_wait_ms, max_queue=args.max_queue,
          max_queue_seconds=args.max_queue_seconds,
          max_request_bytes=int(args.max_request_mb * 1024 * 1024), batching=not args.no_batching)


def _evaluate(args: argparse.Namespace) -> None:
    from .evaluate import evaluate, print_table

    metrics = evaluate(args.output, args.run, args.qrels, args.model, args.dataset, args.split, args.k, args.fuse,
                       args.save_run, args.device, args.batch_size, args.backend, args.fusion, args.dev_split,
                       args.index, args.mode, args.where, args.params, args.allow_model_mismatch)
    name = {"fts": "full-text", "hybrid": f"{args.model} + full-text"}.get(args.mode, args.model) or args.run
    if args.index:
        name += f" in {args.index}"
    fused = args.fuse or args.mode == "hybrid"
    print_table(name + (f" + {args.fuse}" if args.fuse else "")
                + (f" ({'RRF' if args.fusion == 'rrf' else args.fusion})" if fused else ""), metrics)


def _demo(args: argparse.Namespace) -> None:
    import dataclasses

    from .demo import PRESETS, demo

    changes = {k: v for k, v in (("base_model", args.model), ("precision", args.precision),
                                 ("backend", args.backend)) if v}
    settings = dataclasses.replace(PRESETS[args.preset], **changes) if changes else None
    demo(args.preset, args.output, args.force, settings)


def _plot(args: argparse.Namespace) -> None:
    from .plots import plot_training_log

    print(plot_training_log(args.run, args.output, title=args.title))


def _export(args: argparse.Namespace) -> None:
    from .st_export import export_sentence_transformers

    out = export_sentence_transformers(args.model, args.output, device=args.device)
    print(f"wrote the {args.format} folder {out}: SentenceTransformer({str(out)!r}, trust_remote_code=True) opens it")


class HelpFormatter(argparse.HelpFormatter):
    """The help of every llama2vec command: an option's default is added to its help text unless the text
    already speaks of it; in descriptions and epilogs, indented lines (the examples) are kept as written."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (default is None or default is False or default is argparse.SUPPRESS or default == []
                or "default" in text.lower()):
            return text
        shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else str(default)
        return f"{text} (default: {shown.replace('%', '%%')})"

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        lines = []
        for line in text.splitlines():
            if not line.strip() or line[0].isspace():
                lines.append(indent + line if line.strip() else "")
            else:
                lines.extend(textwrap.wrap(line, width, initial_indent=indent, subsequent_indent=indent))
        return "\n".join(lines)


def _command(sub: argparse._SubParsersAction, name: str, summary: str, description: str,
             *examples: str) -> argparse.ArgumentParser:
    """Subcommand `name`: `summary` is its line in `llama2vec --help`, `description` opens its own help and
    `examples` (command lines) close it."""
    epilog = ("examples:" if len(examples) > 1 else "example:") + "".join(f"\n  {e}" for e in examples)
    return sub.add_parser(name, help=summary, description=description, epilog=epilog,
                          formatter_class=HelpFormatter)


# adapt's and finetune's options come from add_flags, a section per config class named after it ("data",
# "train", ...); they are shown under these titles, some of them moved to the sections named here, in this order.
CONFIG_TITLES = {"data": "input", "pretext": "pretext tasks", "contrastive": "contrastive loss",
                 "train": "training", "finetunetrain": "training"}
CONFIG_MOVES = {"input": ("--train", "--max-examples"),
                "training": ("--full",),
                "distributed": ("--fsdp", "--fsdp-offload"),
                "output": ("--output", "--overwrite", "--resume", "--logging-steps", "--save-steps",
                           "--save-total-limit")}
CONFIG_ORDER = ("input", "model", "prompt", "pretext tasks", "contrastive loss", "training", "distributed",
                "output", "dry run")


def _arrange_config_sections(p: argparse.ArgumentParser) -> None:
    """Retitle, regroup and order the help sections of the config flags (parsing is not affected)."""
    for group in p._action_groups:
        group.title = CONFIG_TITLES.get(group.title, group.title)
    for title, flags in CONFIG_MOVES.items():
        target = next((g for g in p._action_groups if g.title == title), None) or p.add_argument_group(title)
        for action in [p._option_string_actions[f] for f in flags if f in p._option_string_actions]:
            for group in p._action_groups:
                if action in group._group_actions:
                    group._group_actions.remove(action)
            target._group_actions.append(action)
    p._action_groups.sort(key=lambda g: CONFIG_ORDER.index(g.title) if g.title in CONFIG_ORDER else -1)


def _add_backend(p: argparse._ActionsContainer) -> None:
    from .config import BACKENDS

    p.add_argument("--backend", choices=BACKENDS, default="torch",
                   help="torch-bfloat16: torch in bfloat16, also on the CPU; torch-compile: torch compiled by "
                        "TorchInductor (about 1.5 min at the start, then faster; for large corpora); onnx-int8: "
                        "CPU encoding with int8 weights through ONNX Runtime (exported once, cached).")


DEVICE_HELP = "auto (a GPU if there is one, else the CPU), cpu, cuda or cuda:N."
PARAMS_HELP = "FAISS search parameters, e.g. nprobe=16 (IVF) or efSearch=128 (HNSW); for a LanceDB store, nprobes=N."

EPILOG = """\
the usual order of the commands:
  data -> adapt -> [mine ->] finetune -> encode -> index -> search / evaluate -> export / serve

  llama2vec data wiki --output runs/wiki.jsonl
  llama2vec data bbc --output runs/bbc
  llama2vec adapt --corpus runs/wiki.jsonl --output runs/adapted --max-steps 200
  llama2vec finetune --model runs/adapted --train runs/bbc/train.jsonl --output runs/ft
  llama2vec encode --model runs/ft --dataset runs/bbc --output runs/emb/corpus
  llama2vec index --embeddings runs/emb/corpus --output runs/index
  llama2vec evaluate --model runs/ft --dataset runs/bbc --index runs/index

the main job, every stage on the bundled defaults:
  llama2vec demo --preset quick

A command's options and examples: llama2vec COMMAND --help."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llama2vec", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=HelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="Show every log record, other libraries' DEBUG and INFO included (by default the "
                             "console shows llama2vec's own messages and other libraries' errors only).")
    parser.add_argument("--log-file", default=None,
                        help="Also write log records to this file, other libraries' included (they then leave the "
                             "console but for errors). The demo keeps one in its output folder: llama2vec.log.")
    sub = parser.add_subparsers(dest="command", required=True, title="commands")

    p = _command(sub, "data", "Write a bundled data set, or the adaptation pairs of a corpus.",
                 "Write one of the bundled data sets (wiki: a Wikipedia sample as JSONL; bbc, lee: retrieval tasks "
                 "as BEIR folders), or (chunk) cut a corpus into the pair cache that adapt --pairs reads.",
                 "llama2vec data wiki --output runs/wiki.jsonl",
                 "llama2vec data bbc --output runs/bbc",
                 "llama2vec data chunk --corpus runs/wiki.jsonl --output runs/wiki-pairs --workers 2")
    p.add_argument("dataset", choices=["wiki", "bbc", "lee", "chunk"],
                   help="wiki: the Wikipedia sample bundled in gensim, as JSONL; bbc: the BBC News retrieval "
                        "task as a BEIR folder with train.jsonl; lee: an out-of-domain task (ABC news, "
                        "opening sentence -> rest of the story; dev and test only); chunk: the adaptation pairs of "
                        "--corpus, made ahead of training (adapt --pairs), in parallel with --workers.")
    g = p.add_argument_group("output")
    g.add_argument("--output", required=True, help="Output file (wiki: JSONL) or folder (bbc, lee, chunk).")
    g = p.add_argument_group("bbc", "Options of data bbc.")
    g.add_argument("--negatives", type=int, default=15, help="BM25 hard negatives per training query.")
    g = p.add_argument_group("chunk", "Options of data chunk.")
    g.add_argument("--corpus", help="The corpus (JSONL, .txt or .parquet).")
    g.add_argument("--model", default="smollm2", help="The model whose tokenizer cuts the chunks.")
    g.add_argument("--prompt-preset", default="llara", help="The prompt preset of the adapt run.")
    g.add_argument("--chunk-tokens", type=int, default=128, help="Target tokens per chunk (adapt's --max-length).")
    g.add_argument("--min-chunk-tokens", type=int, default=16, help="Shorter chunks are dropped.")
    g.add_argument("--max-documents", type=int, default=None, help="Read at most this many documents.")
    g.add_argument("--workers", type=int, default=1, help="Processes that chunk in parallel.")
    p.set_defaults(func=_data)

    p = _command(sub, "adapt", "Adapt a causal LM into an embedding model (EBAE + EBAR, unsupervised).",
                 "Adapt a causal LM with the EBAE and EBAR pretext tasks in one joint pass. Every option can also "
                 "come from a YAML file given with --config.",
                 "llama2vec adapt --model smollm2 --corpus runs/wiki.jsonl --output runs/adapted --max-steps 200",
                 "llama2vec adapt --config configs/paper/adapt-llama2-7b.yaml --fsdp --dry-run --plan-gpus 8 "
                 "--plan-gpu-memory 80")
    add_flags(p, ModelConfig, PromptConfig, PretextConfig, DataConfig, TrainConfig)
    p.add_argument("--full", dest="lora", action="store_false", default=argparse.SUPPRESS,
                   help="Train all weights (the default for adapt); the opposite of --lora.")
    _add_plan_flags(p)
    _arrange_config_sections(p)
    p.set_defaults(func=_adapt)

    p = _command(sub, "finetune", "Fine-tune a model for retrieval with a contrastive loss (InfoNCE).",
                 "Fine-tune a llama2vec model or any causal LM on training JSONL with InfoNCE over hard, in-batch "
                 "and cross-process negatives. Every option can also come from a YAML file given with --config.",
                 "llama2vec finetune --model runs/adapted --train runs/bbc/train.jsonl --output runs/ft "
                 "--max-steps 100")
    add_flags(p, *FINETUNE_CONFIGS)
    p.add_argument("--full", dest="lora", action="store_false", default=argparse.SUPPRESS,
                   help="Train all weights instead of LoRA adapters.")
    _add_plan_flags(p)
    _arrange_config_sections(p)
    p.set_defaults(func=_finetune)

    p = _command(sub, "mine", "Mine hard negatives for finetune with BM25 or a dense model.",
                 "Write training JSONL for finetune whose negatives are passages ranked high for each query by "
                 "BM25 or a dense model, positives left out, from a BEIR split or from a training file.",
                 "llama2vec mine --dataset runs/bbc --split train --output runs/mined.jsonl",
                 "llama2vec mine --dataset runs/bbc --method dense --model runs/ft --output runs/mined.jsonl")
    g = p.add_argument_group("input", "Give --train or --dataset.")
    g.add_argument("--train", help="Training JSONL whose negatives are replaced.")
    g.add_argument("--dataset", help="BEIR folder (instead of --train).")
    g.add_argument("--split", default="train", help="Split of --dataset.")
    g.add_argument("--corpus", help="With --train: a corpus.jsonl of candidates (default: the file's passages).")
    g = p.add_argument_group("mining")
    g.add_argument("--method", choices=["bm25", "dense"], default="bm25",
                   help="Rank the candidates by BM25 or by the embeddings of --model.")
    g.add_argument("--negatives", type=int, default=15, help="Negatives per query.")
    g.add_argument("--rank-range", type=int, nargs=2, default=[10, 100], metavar=("LOW", "HIGH"),
                   help="Sample from these ranks (1-based, inclusive) after removing positives.")
    g.add_argument("--seed", type=int, default=0, help="Seed of the sampling of negatives.")
    g = p.add_argument_group("model", "With --method dense.")
    g.add_argument("--model", help="Model for --method dense.")
    g.add_argument("--batch-size", type=int, default=16, help="Texts encoded per forward pass.")
    g = p.add_argument_group("output")
    g.add_argument("--output", required=True, help="Training JSONL to write.")
    p.set_defaults(func=_mine)

    p = _command(sub, "encode", "Encode a corpus or queries into an embeddings folder, shard by shard.",
                 "Encode the passages or queries of a BEIR folder, or the texts of a JSONL or Parquet file, into "
                 "an embeddings folder, streamed shard by shard. The shards can be split between the processes "
                 "of torchrun, between --num-shards jobs, or between Ray actors; an interrupted run resumes.",
                 "llama2vec encode --model runs/ft --dataset runs/bbc --what queries --split test --output "
                 "runs/emb/test",
                 "llama2vec encode --model runs/ft --input runs/bbc/corpus.jsonl --output runs/bbc-emb")
    g = p.add_argument_group("input", "Give --dataset or --input.")
    g.add_argument("--dataset", help="BEIR folder.")
    g.add_argument("--what", choices=["corpus", "queries"], default="corpus",
                   help="corpus: encode the texts as passages (with --dataset: its corpus.jsonl); queries: as "
                        "queries, with the query prompt (with --dataset: the queries of --split).")
    g.add_argument("--split", default="test", help="Split whose queries are encoded.")
    g.add_argument("--input", help="JSONL ({_id, text[, title]} per line) or Parquet (text[, title, id]) instead "
                                   "of --dataset.")
    g = p.add_argument_group("model")
    g.add_argument("--model", help="llama2vec model folder, causal LM, or 'smollm2'.")
    g.add_argument("--device", default="auto", help=DEVICE_HELP + " Under torchrun, auto is the GPU of LOCAL_RANK.")
    g.add_argument("--batch-size", type=int, default=16, help="Texts encoded per forward pass.")
    _add_backend(g)
    g = p.add_argument_group("output")
    g.add_argument("--output", required=True, help="Embeddings folder: shards/, ids.txt, meta.json (the manifest).")
    g.add_argument("--dtype", choices=["float32", "float16"], default="float32",
                   help="Data type of the stored embeddings.")
    g.add_argument("--shard-size", type=int, default=1024,
                   help="Texts per shard: the unit of work of a process and of resuming.")
    g.add_argument("--overwrite", action="store_true",
                   help="Encode again into an --output that holds embeddings made from other inputs or options.")
    g = p.add_argument_group("distributed", "Without these, the processes of torchrun share the shards.")
    g.add_argument("--num-shards", type=int, help="Split the shards over this many jobs (a SLURM array, "
                                                  "Kubernetes jobs) writing into one --output ...")
    g.add_argument("--shard-index", type=int, help="... of which this is job i (0-based).")
    g.add_argument("--merge", action="store_true",
                   help="Complete --output once every job's shards are written (the last job does it too).")
    g.add_argument("--engine", choices=["local", "ray"], default="local",
                   help="ray: encoder actors in a Ray Data pipeline (pip install 'llama2vec[ray]').")
    g.add_argument("--ray-address", help="Ray cluster to join (default: a local Ray instance).")
    g.add_argument("--ray-actors", type=int, help="Encoder actors (default: one per GPU in the cluster, else 1).")
    p.set_defaults(func=_encode)

    p = _command(sub, "index", "Build a FAISS index or a LanceDB store from an embeddings folder.",
                 "Index an embeddings folder shard by shard, without holding it in memory: a FAISS index folder, "
                 "or a LanceDB store of the passages, their fields and vectors, which can later be updated.",
                 "llama2vec index --embeddings runs/emb/corpus --output runs/index --factory HNSW32",
                 "llama2vec index --store lancedb --embeddings runs/emb/corpus --dataset runs/bbc --output "
                 "runs/bbc-store")
    g = p.add_argument_group("input")
    g.add_argument("--embeddings", help="The embeddings folder to index.")
    g = p.add_argument_group("output")
    g.add_argument("--output", required=True,
                   help="The index folder to write; with --store lancedb, the store to write or update.")
    g.add_argument("--store", choices=["faiss", "lancedb"], default="faiss",
                   help="faiss: a FAISS index folder; lancedb: a LanceDB table of the passages, their fields and "
                        "vectors, with vector and full-text indexes (needs --dataset).")
    g = p.add_argument_group("index")
    g.add_argument("--factory", default="Flat", help="FAISS index factory string: Flat (exact), HNSW32, IVF256,PQ16.")
    g.add_argument("--train-size", type=int, default=262_144,
                   help="Rows (a seeded sample) that IVF, PQ and PCA are trained on.")
    g.add_argument("--pca", type=int, help="Reduce to this many dimensions first (a FAISS PCA matrix).")
    g.add_argument("--parts", type=int, default=1,
                   help="Write this many index parts (consecutive shards each), searched one at a time.")
    g.add_argument("--seed", type=int, default=0, help="Seed of the training sample.")
    g.add_argument("--faiss-gpu", action="store_true", help="Train IVF on the GPUs (faiss-gpu).")
    g = p.add_argument_group("LanceDB store", "Options of --store lancedb.")
    g.add_argument("--dataset", help="The BEIR folder whose corpus.jsonl gives each passage's title, text and other "
                                     "fields.")
    g.add_argument("--index-type", choices=["flat", "ivf_pq", "hnsw"],
                   help="The vector index (default flat: exact search; ivf_pq: lists and codes trained by FAISS on "
                        "the --train-size sample; hnsw: LanceDB's IVF_HNSW_SQ).")
    g.add_argument("--float16", action="store_true", help="Store the vectors in float16.")
    g.add_argument("--partitions", type=int, help="IVF lists (default: about sqrt(count)).")
    g.add_argument("--sub-vectors", type=int, help="PQ sub-vectors (default: dim / 16).")
    g.add_argument("--add", help="Upsert the passages of this embeddings folder (their lines in --dataset) into the "
                                 "store --output: a passage whose id is there replaces it.")
    g.add_argument("--delete-ids", help="Delete the passages whose ids this file lists (one a line) from the store "
                                        "--output.")
    p.set_defaults(func=_index)

    p = _command(sub, "search", "Search index folders or a LanceDB store and write a TREC run.",
                 "Search the queries of an embeddings folder in one or more index folders (shards, merged by top "
                 "k), or a LanceDB store by its vectors, its full-text index or both; other runs can be fused in.",
                 "llama2vec search --index runs/index --queries runs/emb/test --k 100 --output runs/test.trec",
                 "llama2vec search --index runs/bbc-store --mode hybrid --queries runs/emb/test --dataset runs/bbc "
                 "--output runs/hybrid.trec")
    g = p.add_argument_group("input")
    g.add_argument("--index", required=True, nargs="+",
                   help="One or more index folders (shards), or one LanceDB store.")
    g.add_argument("--queries", help="Embeddings folder of the queries (--mode dense and hybrid).")
    g.add_argument("--dataset", help="With --mode fts or hybrid: the BEIR folder of the query texts.")
    g.add_argument("--split", default="test", help="With --dataset: the queries of this split (all without qrels).")
    g = p.add_argument_group("search")
    g.add_argument("--mode", choices=["dense", "fts", "hybrid"], default="dense",
                   help="A LanceDB store can also be searched by its full-text index (fts: the query texts of "
                        "--dataset) or both, fused by --fusion (hybrid).")
    g.add_argument("--k", type=int, default=100, help="Hits per query written to the run.")
    g.add_argument("--params", help=PARAMS_HELP)
    g.add_argument("--where", help="A LanceDB store only: an SQL filter on the passages' fields, e.g. "
                                   "\"category = 'sport'\".")
    g.add_argument("--allow-model-mismatch", action="store_true",
                   help="Search an index of another model's embeddings (refused otherwise).")
    g = p.add_argument_group("fusion")
    g.add_argument("--fuse-run", nargs="*", default=[], help="TREC runs to fuse with (see --fusion).")
    order = "this index's run (--mode hybrid: the store's dense, then full-text run), then --fuse-run's"
    g.add_argument("--fusion", default="rrf", help=FUSION_HELP.format(order=order, auto="--dev-runs and --dev-qrels"))
    g.add_argument("--dev-runs", nargs="+", default=[],
                   help="With --fusion auto: TREC runs of the same systems on dev queries, this index's first, then "
                        "one per --fuse-run in order.")
    g.add_argument("--dev-qrels", help="With --fusion auto: qrels of the dev queries.")
    g = p.add_argument_group("output")
    g.add_argument("--output", required=True, help="TREC run file.")
    p.set_defaults(func=_search)

    p = _command(sub, "serve", "Serve embeddings (OpenAI's API) and search over HTTP, with dynamic batching.",
                 "Serve a model over HTTP: POST /v1/embeddings (OpenAI's schema, plus input_type: query or "
                 "document), POST /v1/search (with --index), GET /v1/models, /health and /metrics (Prometheus). "
                 "SIGTERM finishes the requests in flight, then exits.",
                 "llama2vec serve --model runs/ft --index runs/index --dataset runs/bbc --port 8000")
    g = p.add_argument_group("model")
    g.add_argument("--model", required=True, help="llama2vec model folder, causal LM, or 'smollm2'.")
    g.add_argument("--device", default="auto", help=DEVICE_HELP)
    _add_backend(g)
    g.add_argument("--auto-truncate", action="store_true",
                   help="Cut texts longer than the model's limit (as encode does) instead of answering 400.")
    g = p.add_argument_group("search", "What /v1/search searches and returns.")
    g.add_argument("--index", help="Index folder (llama2vec index) that /v1/search searches.")
    g.add_argument("--dataset", help="BEIR folder whose corpus.jsonl gives the titles and texts of the hits.")
    g.add_argument("--allow-model-mismatch", action="store_true",
                   help="Serve search over an index of another model's embeddings (refused otherwise).")
    g.add_argument("--resident", action="store_true",
                   help="Read the index parts whole into memory (default: memory-mapped, the page cache holding "
                        "what searches touch).")
    g.add_argument("--params", help=PARAMS_HELP)
    g.add_argument("--refresh-seconds", type=float, default=10.0,
                   help="With a LanceDB store as --index: check out its latest committed version at most this often.")
    g.add_argument("--max-hits", type=int, default=100_000,
                   help="Queries x k of one /v1/search request at most; more gets 400.")
    g.add_argument("--max-response-mb", type=float, default=32.0,
                   help="The hits' titles and texts of one /v1/search response at most; more gets 400.")
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="Address to listen on (0.0.0.0: every interface).")
    g.add_argument("--port", type=int, default=8000, help="TCP port to listen on.")
    g.add_argument("--api-key", help="Require 'Authorization: Bearer KEY' (default: $LLAMA2VEC_API_KEY, else none).")
    g.add_argument("--max-request-mb", type=float, default=16.0, help="Request bodies over this get 413.")
    g.add_argument("--drain-seconds", type=float, default=60.0,
                   help="After SIGTERM, how long requests in flight may take to finish.")
    g = p.add_argument_group("batching")
    g.add_argument("--max-batch-tokens", type=int, default=8192,
                   help="Padded tokens (prompt included) a forward takes at most; the requests queued when the "
                        "encoder is free are encoded together, up to four forwards' worth, sorted by length.")
    g.add_argument("--max-wait-ms", type=float, default=10.0,
                   help="How long the oldest queued request waits for others to join its batch.")
    g.add_argument("--max-queue", type=int, default=8192,
                   help="Texts queued or being encoded at most; beyond that requests get 503 (at least 2048).")
    g.add_argument("--max-queue-seconds", type=float, default=30.0,
                   help="Admit a request only while the queued work is expected to take at most this long (at the "
                        "rate the server measures); the rest get 503 at once, with Retry-After.")
    g.add_argument("--no-batching", action="store_true",
                   help="One forward per request: no dynamic batching (for comparison).")
    p.set_defaults(func=_serve)

    p = _command(sub, "evaluate", "Metrics of a run, or of a system end to end on a BEIR split.",
                 "Compute nDCG@10, MRR@10, recall@100, recall@1000 and MAP of a TREC run against qrels, or of a "
                 "system (BM25, a dense model, an index, a fusion) on the queries of a BEIR split.",
                 "llama2vec evaluate --run runs/test.trec --qrels runs/bbc/qrels/test.tsv --output runs/metrics.json",
                 "llama2vec evaluate --model runs/ft --dataset runs/bbc --split test --fuse bm25")
    g = p.add_argument_group("input", "Give --run and --qrels, or --model and --dataset.")
    g.add_argument("--run", help="TREC run file (with --qrels).")
    g.add_argument("--qrels", help="BEIR qrels TSV or TREC qrels.")
    g.add_argument("--dataset", help="BEIR folder.")
    g.add_argument("--split", default="test", help="Split of --dataset whose queries and qrels are evaluated.")
    g = p.add_argument_group("model")
    g.add_argument("--model", help="bm25, minilm, a sentence-transformers folder, a llama2vec folder or causal LM.")
    g.add_argument("--device", default="auto", help=DEVICE_HELP)
    g.add_argument("--batch-size", type=int, default=16, help="Texts encoded per forward pass.")
    _add_backend(g)
    g = p.add_argument_group("search")
    g.add_argument("--k", type=int, default=1000, help="Depth of the retrieved ranking.")
    g.add_argument("--index", help="Search the queries in this FAISS index folder or LanceDB store (built from "
                                   "--model's embeddings of --dataset's corpus) rather than exactly over the corpus "
                                   "encoded anew.")
    g.add_argument("--mode", choices=["dense", "fts", "hybrid"], default="dense",
                   help="With a LanceDB store as --index: dense (--model's query embeddings), fts (its full-text "
                        "index, no model), hybrid (both, fused by --fusion).")
    g.add_argument("--where", help="With a LanceDB store as --index: an SQL filter on its fields.")
    g.add_argument("--params", help="With --index: search parameters, e.g. nprobe=16 (FAISS IVF), efSearch=128 "
                                    "(FAISS HNSW), nprobes=16 (a store's IVF).")
    g.add_argument("--allow-model-mismatch", action="store_true",
                   help="Search --index with --model's queries even though the index holds another model's "
                        "embeddings.")
    g = p.add_argument_group("fusion")
    g.add_argument("--fuse", help="A second system fused with --model (e.g. bm25; see --fusion).")
    g.add_argument("--fusion", default="rrf", help=FUSION_HELP.format(order="--model, --fuse",
                                                                      auto="--dev-split of --dataset"))
    g.add_argument("--dev-split", help="With --fusion auto: the split of --dataset the fusion is chosen on (e.g. "
                                       "dev); it is then applied unchanged to --split.")
    g = p.add_argument_group("output")
    g.add_argument("--output", help="Metrics JSON to write.")
    g.add_argument("--save-run", help="Also write the system's TREC run here.")
    p.set_defaults(func=_evaluate)

    p = _command(sub, "demo", "The main job: test the paper's claim end to end on the bundled defaults.",
                 "Run the pipeline on the bundled SmolLM2 and data sets: adapt, fine-tune the adapted and the "
                 "unadapted model alike, evaluate both on BBC and Lee test, and write report.json, report.md "
                 "and charts. Finished stages in the output folder are reused.",
                 "llama2vec demo --preset quick",
                 "llama2vec demo --preset full --output runs/demo-full")
    p.add_argument("--preset", choices=["quick", "full", "paper"], default="quick",
                   help="quick: under 15 minutes on a 2-core CPU; full: under 2 hours; paper: the whole protocol, "
                        "for a GPU.")
    g = p.add_argument_group("model")
    g.add_argument("--model", default=None,
                   help="Run the demo on this causal LM (hub id or folder) instead of the bundled SmolLM2.")
    g.add_argument("--precision", choices=["auto", "fp32", "bf16-mixed"], default=None,
                   help="Training precision (default auto: bf16-mixed where bfloat16 products are fast, a GPU or "
                        "a CPU with bfloat16 instructions such as AVX-512 BF16; fp32 elsewhere). On a CPU, the "
                        "environment variable LLAMA2VEC_CPU_BF16=1 or 0 forces what auto takes for both choices.")
    g.add_argument("--backend", choices=["auto", "torch", "torch-bfloat16"], default=None,
                   help="How the SmolLM2 systems encode (default auto: torch-bfloat16 where bfloat16 products are "
                        "fast, torch elsewhere).")
    g = p.add_argument_group("output")
    g.add_argument("--output", default="runs/demo", help="Output folder (finished stages there are reused).")
    g.add_argument("--force", action="store_true", help="Delete the output folder first and redo every stage.")
    p.set_defaults(func=_demo)

    p = _command(sub, "plot", "Plot the loss curves of a training run folder as a PNG.",
                 "Draw the losses that adapt or finetune logged in a run folder's log.jsonl as a PNG chart.",
                 "llama2vec plot runs/adapted --output runs/adapted/losses.png")
    p.add_argument("run", help="A folder written by adapt or finetune (holds log.jsonl).")
    g = p.add_argument_group("output")
    g.add_argument("--output", required=True, help="PNG file to write.")
    g.add_argument("--title", default=None, help="Chart title.")
    p.set_defaults(func=_plot)

    p = _command(sub, "export", "Export a model for another library (sentence-transformers).",
                 "Write a model as a folder that another library opens without llama2vec installed and that "
                 "gives the same embeddings.",
                 "llama2vec export --model runs/ft --format sentence-transformers --output runs/ft-st")
    g = p.add_argument_group("model")
    g.add_argument("--model", required=True, help="llama2vec model folder, causal LM, or 'smollm2'.")
    g.add_argument("--device", default="cpu", help="Device the model is loaded on to be saved (float32).")
    g = p.add_argument_group("output")
    g.add_argument("--format", choices=["sentence-transformers"], default="sentence-transformers",
                   help="sentence-transformers: a folder that SentenceTransformer(..., trust_remote_code=True) "
                        "opens without llama2vec; encode_query / encode_document give llama2vec's embeddings.")
    g.add_argument("--output", required=True, help="Folder to write (an earlier export there is replaced).")
    p.set_defaults(func=_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .logs import add_log_file, setup_logging

    setup_logging(args.verbose)
    if args.log_file:
        add_log_file(Path(args.log_file))
    for noisy in ("httpx", "urllib3", "filelock", "gensim", "accelerate"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*deprecated and will be removed in v6.*")
    func = args.func
    del args.verbose, args.log_file
    try:
        func(args)
    except Llama2VecError as e:
        print(f"llama2vec: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("llama2vec: interrupted", file=sys.stderr)
        return 130
    except OSError as e:  # permission denied, disk full, ...: the file and the reason, not a traceback
        where = f"{e.filename}: " if e.filename else ""
        print(f"llama2vec: error: {where}{e.strerror or e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
