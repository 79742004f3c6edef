"""`llama2vec data lee`: an out-of-domain retrieval task from the Lee news corpus bundled in gensim
(300 Australian Broadcasting Corporation stories): another news source and another query style than the
BBC task. Query = the story's opening sentence (its lede); passage = the rest of the story; the one
relevant passage of a query is its own story's rest.

- story id ``lee-NNN`` (line number of ``lee_background.cor``); an opening sentence under 6 words takes
  the next sentence too (a sentence ends at . ! or ?, closing quotes or brackets, then a space); stories
  whose rest is under 30 words are dropped;
- split by ``int(sha1(story_id).hexdigest(), 16) % 3``: 0 dev, otherwise test. Nothing is for training:
  the task only measures how a model trained on BBC headlines carries over.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from .errors import Llama2VecError
from .formats import write_jsonl_rows, write_qrels

LEE_FILE = "lee_background.cor"


def lee_file() -> Path:
    try:
        from gensim.test.utils import datapath
    except ImportError as e:
        raise Llama2VecError("the Lee news task needs the package gensim==4.4.0") from e
    return Path(datapath(LEE_FILE))


def split_of(story_id: str) -> str:
    return "dev" if int(hashlib.sha1(story_id.encode("utf-8")).hexdigest(), 16) % 3 == 0 else "test"


_SENTENCE_END = re.compile(r"[.!?][\"')\]]*\s+")


def opening(text: str, min_words: int = 6) -> tuple[str, str]:
    """(the text up to the first sentence end that leaves at least `min_words` words before it, the rest),
    every character kept."""
    for end in _SENTENCE_END.finditer(text):
        if len(text[: end.end()].split()) >= min_words:
            return text[: end.end()].strip(), text[end.end():].strip()
    return text.strip(), ""


def read_stories(path: Path | None = None) -> list[tuple[str, str, str]]:
    """(story id, lede, rest) of every kept story, in file order."""
    path = path or lee_file()
    out = []
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        lede, rest = opening(line)
        if len(rest.split()) >= 30:
            out.append((f"lee-{number:03d}", lede, rest))
    if not out:
        raise Llama2VecError(f"{path}: no stories found")
    return out


def build_lee(output: str | Path) -> dict[str, int]:
    """Write the BEIR folder (corpus, queries, qrels/dev.tsv and qrels/test.tsv); returns the counts."""
    output = Path(output)
    stories = read_stories()
    write_jsonl_rows(output / "corpus.jsonl", ({"_id": i, "title": "", "text": rest} for i, _, rest in stories))
    write_jsonl_rows(output / "queries.jsonl", ({"_id": i, "text": lede} for i, lede, _ in stories))
    counts = {"passages": len(stories)}
    for split in ("dev", "test"):
        qrels = {i: {i: 1} for i, _, _ in stories if split_of(i) == split}
        write_qrels(output / "qrels" / f"{split}.tsv", qrels)
        counts[split] = len(qrels)
    return counts
