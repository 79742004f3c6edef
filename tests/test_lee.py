"""The out-of-domain Lee task: built from the Lee news corpus bundled in gensim."""

from __future__ import annotations

import pytest

from llama2vec.cli import main
from llama2vec.errors import Llama2VecError
from llama2vec.formats import read_beir
from llama2vec.lee import lee_file, read_stories


def test_lee_task_from_the_bundled_stories(tmp_path):
    assert main(["data", "lee", "--output", str(tmp_path / "lee")]) == 0
    dev, test = read_beir(tmp_path / "lee", "dev"), read_beir(tmp_path / "lee", "test")
    assert len(test.corpus) == 299 and (len(dev.queries), len(test.queries)) == (109, 190)
    assert not set(dev.queries) & set(test.queries)
    lines = lee_file().read_text(encoding="utf-8", errors="replace").splitlines()
    for qid, query in test.queries.items():
        assert test.qrels[qid] == {qid: 1}
        story = " ".join(lines[int(qid.split("-")[1]) - 1].split())
        passage = test.corpus[qid]["text"]
        # The query opens the story, the passage is the rest of it: together they are the story.
        assert " ".join(f"{query} {passage}".split()) == story
        assert len(query.split()) >= 6 and len(passage.split()) >= 30
    assert dev.queries["lee-001"].startswith("Hundreds of people have been forced to vacate their homes")


def test_a_file_without_stories_is_refused(tmp_path):
    empty = tmp_path / "lee.cor"
    empty.write_text("Too short.\n")
    with pytest.raises(Llama2VecError, match="lee.cor: no stories found"):
        read_stories(empty)
