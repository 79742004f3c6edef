"""`llama2vec --help` and each command's help: groups, a help text for every option, defaults, examples."""

from __future__ import annotations

import argparse

import pytest

from llama2vec.cli import build_parser

DEFAULT_SECTIONS = ("positional arguments", "options")


def commands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if not isinstance(a, argparse._HelpAction)]


COMMANDS = list(commands())


def test_the_top_help_lists_every_command_and_the_usual_order():
    text = build_parser().format_help()
    for name in COMMANDS:
        assert f"\n    {name} " in text, name
    assert "data -> adapt" in text and "llama2vec demo" in text
    parsers = commands()
    for line in text.splitlines():
        if line.strip().startswith("llama2vec ") and "COMMAND" not in line:
            name, *words = line.split()[1:]
            flags = {s for a in parsers[name]._actions for s in a.option_strings}
            assert {w for w in words if w.startswith("--")} <= flags, line


@pytest.mark.parametrize("name", COMMANDS)
def test_a_command_help_renders_with_groups_and_ends_with_an_example(name):
    parser = commands()[name]
    text = parser.format_help()
    assert parser.description and text.startswith(f"usage: llama2vec {name}")
    sections = [g for g in parser._action_groups if g._group_actions and g.title not in DEFAULT_SECTIONS]
    if len(options(parser)) > 3:
        assert len(sections) >= 2, [g.title for g in sections]
    last = text.rstrip().splitlines()[-1].strip()
    assert last.startswith(f"llama2vec {name}"), last


@pytest.mark.parametrize("name", COMMANDS)
def test_every_option_has_a_help_text(name):
    parser = commands()[name]
    missing = [a.option_strings or a.dest for a in options(parser) if not (a.help or "").strip()]
    assert not missing


@pytest.mark.parametrize("name", COMMANDS)
def test_every_example_uses_flags_the_command_has(name):
    parser = commands()[name]
    flags = {s for a in parser._actions for s in a.option_strings}
    examples = [line.strip() for line in parser.epilog.splitlines() if line.strip().startswith("llama2vec ")]
    assert examples
    for line in examples:
        used = {w for w in line.split() if w.startswith("--")}
        assert used <= flags, used - flags


def test_defaults_are_shown_once():
    text = commands()["search"].format_help()
    assert "(default: 100)" in text  # --k, which has no word of its default
    assert "(default: 10 100)" in commands()["mine"].format_help()  # --rank-range
    assert text.count("(default: rrf)") == 0  # --fusion's help speaks of its default itself
    adapt = commands()["adapt"].format_help()
    assert "(default: None)" not in adapt and "(default: 128)" in adapt  # --max-length, from add_flags
