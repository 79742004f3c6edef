"""The `llama2vec` command: one subcommand per pipeline stage. Heavy imports happen inside the
commands, so `--help` answers at once."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings

from .config import DataConfig, ModelConfig, PretextConfig, PromptConfig, TrainConfig, add_flags, build_configs
from .errors import Llama2VecError


def _adapt(args: argparse.Namespace) -> None:
    from .adapt import adapt

    result = adapt(*build_configs(args, ModelConfig, PromptConfig, PretextConfig, DataConfig, TrainConfig))
    if os.environ.get("RANK", "0") == "0":
        print(json.dumps({k: v for k, v in result.items() if k not in ("data", "model")}, indent=2, default=str))


def _data(args: argparse.Namespace) -> None:
    from . import data

    if args.dataset == "wiki":
        n = data.build_wiki(args.output)
        print(f"wrote {n} Wikipedia articles to {args.output}")


def _plot(args: argparse.Namespace) -> None:
    from .plots import plot_training_log

    print(plot_training_log(args.run, args.output, title=args.title))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llama2vec", description=__doc__.split("\n")[0].replace("The", "the"))
    parser.add_argument("-v", "--verbose", action="store_true", help="Debug logging.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("data", help="Write the embedded default data sets.")
    p.add_argument("dataset", choices=["wiki"], help="wiki: the Wikipedia sample bundled in gensim, as JSONL.")
    p.add_argument("--output", required=True, help="Output file (JSONL) or folder.")
    p.set_defaults(func=_data)

    p = sub.add_parser("adapt", help="Unsupervised Llama2Vec adaptation (EBAE + EBAR) of a causal LM.",
                       description="Adapt a causal LM with the EBAE and EBAR pretext tasks in one joint pass. "
                                   "Every option can also come from a YAML file given with --config.")
    add_flags(p, ModelConfig, PromptConfig, PretextConfig, DataConfig, TrainConfig)
    p.add_argument("--full", dest="lora", action="store_false", default=argparse.SUPPRESS,
                   help="Train all weights (the default for adapt); the opposite of --lora.")
    p.set_defaults(func=_adapt)

    p = sub.add_parser("plot", help="Plot the loss curves of a training run folder as a PNG.")
    p.add_argument("run", help="A folder written by adapt or finetune (holds log.jsonl).")
    p.add_argument("--output", required=True, help="PNG file to write.")
    p.add_argument("--title", default=None, help="Chart title.")
    p.set_defaults(func=_plot)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "urllib3", "filelock", "gensim", "accelerate"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*deprecated and will be removed in v6.*")
    func = args.func
    del args.verbose
    try:
        func(args)
    except Llama2VecError as e:
        print(f"llama2vec: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("llama2vec: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
