"""The README and docs/ against the code: every `llama2vec` command shown names a subcommand and flags that
exist, every `--flag` in the prose exists, every Python name shown imports, and the README's "your own
corpus" block runs end to end (a tiny model, the same commands with small sizes)."""

from __future__ import annotations

import importlib
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# Flags of other programs that the docs show beside llama2vec's (torchrun, accelerate, pip, pytest, bench scripts).
FOREIGN = {"--nproc-per-node", "--nnodes", "--rdzv-backend", "--rdzv-endpoint", "--config_file", "--no-deps",
           "--upgrade", "--only", "--demo", "--queries", "--passage-length", "--base", "--lr", "--interpolate",
           "--adapt-length", "--adapt-lr", "--adapt-steps", "--model-folder", "--documents", "--workers", "--sizes",
           "--ivf-rows", "--search", "--rows", "--dim", "--parts", "--clients", "--seconds", "--partitions",
           "--sub-vectors", "--changes", "--nprobe", "--train-size", "--factory", "--params",
           "--queries-per-request", "--offline-queries", "--max-batch-tokens", "--resident"}
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)


def blocks(text: str, lang: str) -> list[str]:
    return [body for kind, body in FENCE.findall(text) if kind == lang]


def prose(text: str) -> str:
    return FENCE.sub("", text)


def command_lines(block: str, prompted: bool = False) -> list[str]:
    """The shell lines of a block, continuation lines joined, comments removed (`prompted`: only the lines after
    a `$ ` prompt, the rest being output)."""
    joined = re.sub(r"\\\n\s*", " ", block)
    out = []
    for line in joined.splitlines():
        line = line.strip()
        if line.startswith("$ "):
            line = line[2:]
        elif prompted:
            continue
        line = re.sub(r"(^|\s)#.*$", "", line).strip()
        if line:
            out.append(line)
    return out


def llama2vec_args(line: str) -> list[str] | None:
    """The arguments after `llama2vec` (or `-m llama2vec`) in a shell line, None when it runs something else."""
    try:
        words = shlex.split(line)
    except ValueError:
        words = line.split()
    for i, word in enumerate(words):
        if word == "llama2vec" and (i == 0 or words[i - 1] == "-m" or re.fullmatch(r"\w+=\S*", words[i - 1])
                                    or all(re.fullmatch(r"\w+=\S*", w) for w in words[:i])):
            return words[i + 1:]
        if word.endswith("/llama2vec") and i == 0:
            return words[1:]
    return None


def commands() -> list[tuple[str, list[str]]]:
    """(page, arguments) of every llama2vec command in the code blocks and inline code of the pages."""
    found = []
    for page in PAGES:
        text = page.read_text()
        for lang in ("bash", "text", ""):
            for block in blocks(text, lang):
                for line in command_lines(block, prompted=lang == "text"):
                    args = llama2vec_args(line)
                    if args is not None:
                        found.append((page.name, args))
        for span in re.findall(r"`(llama2vec [^`]+)`", prose(text)):
            args = llama2vec_args(span.replace("...", ""))
            if args:
                found.append((page.name, args))
    return found


def parsers():
    import argparse

    from llama2vec.cli import build_parser

    top = build_parser()
    sub = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction))
    flags = {name: {s for a in p._actions for s in a.option_strings} for name, p in sub.choices.items()}
    return {s for a in top._actions for s in a.option_strings}, flags


def value_options() -> set[str]:
    """The options of `llama2vec` itself (before the command) that take a value."""
    from llama2vec.cli import build_parser

    return {s for a in build_parser()._actions if a.nargs != 0 and a.option_strings for s in a.option_strings}


def test_every_command_shown_exists_with_its_flags():
    top, flags = parsers()
    takes_value = value_options()
    seen = commands()
    assert len(seen) > 60, len(seen)  # the pages show many commands; a parse that finds few is broken
    bad = []
    for page, args in seen:
        start = 0
        while start < len(args) and args[start].startswith("-"):  # global options, and their values
            if args[start] not in top:
                bad.append(f"{page}: llama2vec {args[start]}: no such option")
            start += 2 if args[start] in takes_value else 1
        name = args[start] if start < len(args) else None
        if name is None or name in ("COMMAND", "...") or name.startswith("<"):
            continue
        if name not in flags:
            bad.append(f"{page}: llama2vec {name}: no such command")
            continue
        for word in args:
            flag = word.split("=", 1)[0]
            if flag.startswith("--") and flag not in flags[name] and flag not in top:
                bad.append(f"{page}: llama2vec {name} {flag}: no such flag")
    assert not bad, "\n".join(bad)


def test_every_flag_in_the_prose_exists():
    top, flags = parsers()
    known = top | set().union(*flags.values()) | FOREIGN
    bad = []
    for page in PAGES:
        for span in re.findall(r"`([^`\n]+)`", prose(page.read_text())):
            for flag in re.findall(r"(?<![\w-])(--[a-z][a-z0-9-_]*)", span):
                if flag not in known:
                    bad.append(f"{page.name}: {flag} (in `{span}`)")
    assert not bad, "\n".join(bad)


def python_names() -> list[tuple[str, str, str | None]]:
    """(page, module, name or None) of every `from llama2vec... import` / `import llama2vec...` in Python blocks,
    and of every dotted `llama2vec.module.name` in the prose."""
    found = []
    for page in PAGES:
        text = page.read_text()
        for block in blocks(text, "python"):
            for module, names in re.findall(r"^\s*from (llama2vec[\w.]*) import ([^\n#]+)", block, re.M):
                for name in names.replace("(", "").replace(")", "").split(","):
                    found.append((page.name, module, name.split(" as ")[0].strip()))
            for module in re.findall(r"^\s*import (llama2vec[\w.]*)", block, re.M):
                found.append((page.name, module, None))
        for dotted in re.findall(r"`(llama2vec(?:\.\w+)+)(?:\([^`]*\))?`", prose(text)):
            found.append((page.name, dotted, None))
    return found


def resolve(dotted: str):
    """Import the longest importable module prefix of `dotted`, then follow the attributes."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise ModuleNotFoundError(dotted)


def test_every_python_name_shown_imports():
    pytest.importorskip("lancedb")
    names = python_names()
    assert len(names) > 10, names
    bad = []
    for page, module, name in names:
        try:
            resolve(module if name is None else f"{module}.{name}")
        except (ImportError, AttributeError) as e:
            bad.append(f"{page}: {module} {name or ''}: {e}")
    assert not bad, "\n".join(bad)


def test_a_renamed_flag_or_a_removed_name_is_caught(monkeypatch):
    """The checks above fail when the code and the pages part: a flag the parser no longer has, a Python name
    the package no longer has."""
    import argparse

    import llama2vec.formats
    from llama2vec import cli

    real = cli.build_parser

    def renamed():
        parser = real()
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        for command in sub.choices.values():
            for action in command._actions:
                if "--refresh-seconds" in action.option_strings:
                    action.option_strings = ["--reload-seconds"]
        return parser

    monkeypatch.setattr(cli, "build_parser", renamed)
    for check in (test_every_command_shown_exists_with_its_flags, test_every_flag_in_the_prose_exists):
        with pytest.raises(AssertionError, match="--refresh-seconds"):
            check()
    monkeypatch.setattr(cli, "build_parser", real)
    monkeypatch.delattr(llama2vec.formats, "read_beir")
    with pytest.raises(AssertionError, match="read_beir"):
        test_every_python_name_shown_imports()


def own_corpus_block() -> str:
    text = (ROOT / "README.md").read_text()
    after = text.split("<!-- own-corpus -->", 1)[1]
    return FENCE.search(after).group(2)


@pytest.mark.slow
def test_the_own_corpus_block_runs_end_to_end(tiny_model_dir, tmp_path):
    """The README's block, as a user copies it into a shell: a tiny model and 2 steps instead of SmolLM2 and
    20; the server started by its own line (on a free port), asked for a search, then stopped."""
    import httpx

    lines = command_lines(own_corpus_block())
    serve = [line for line in lines if line.startswith("llama2vec serve")]
    assert len(serve) == 1 and lines[-1] == serve[0]
    script = own_corpus_block().rsplit("llama2vec serve", 1)[0]
    env = {**os.environ, "MODEL": str(tiny_model_dir), "DATA": str(tmp_path / "own"), "OUT": str(tmp_path / "run"),
           "STEPS": "2", "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    run = tmp_path / "run"
    for made in ("adapted/llama2vec_config.json", "train.jsonl", "ft/llama2vec_config.json", "corpus-emb/meta.json",
                 "test-emb/meta.json", "index/meta.json", "test.trec", "st/modules.json"):
        assert (run / made).exists(), made
    metrics = json.loads((run / "test-metrics.json").read_text())
    assert 0.0 <= metrics["ndcg@10"] <= 1.0 and "auto" in done.stdout + done.stderr
    # the serve line, with the shell's variables, on a free port
    line = serve[0].replace("$OUT", str(run)).replace("$DATA", str(tmp_path / "own")).replace("--port 8000",
                                                                                              "--port 0")
    log = tmp_path / "serve.log"
    with log.open("w") as out:
        proc = subprocess.Popen(["bash", "-c", "exec " + line], cwd=tmp_path, env=env, stdout=out,
                                stderr=subprocess.STDOUT)
    try:
        url = None
        deadline = time.monotonic() + 300
        while url is None and time.monotonic() < deadline and proc.poll() is None:
            found = re.search(r"on (http://127\.0\.0\.1:\d+)", log.read_text())
            url = found.group(1) if found else None
            time.sleep(0.2)
        assert url, log.read_text()[-3000:]
        for _ in range(100):
            try:
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        answer = httpx.post(f"{url}/v1/search", json={"query": "who won the final?", "k": 3}, timeout=60)
        assert answer.status_code == 200, answer.text
        assert len(answer.json()["data"][0]["results"]) == 3
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
