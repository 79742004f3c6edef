"""BM25 through bm25s (Lucene variant, k1 1.5, b 0.75, English stopwords, no stemming)."""

from __future__ import annotations

import numpy as np

from .formats import Run


class BM25:
    """A BM25 index over passages; search returns a run {query id: {doc id: score}}."""

    def __init__(self, doc_ids: list[str], texts: list[str], k1: float = 1.5, b: float = 0.75):
        import bm25s

        self.doc_ids = doc_ids
        self.retriever = bm25s.BM25(k1=k1, b=b)
        self.retriever.index(bm25s.tokenize(texts, stopwords="en", show_progress=False), show_progress=False)

    def search(self, query_ids: list[str], queries: list[str], k: int = 100) -> Run:
        import bm25s

        k = min(k, len(self.doc_ids))
        tokens = bm25s.tokenize(queries, stopwords="en", show_progress=False)
        docs, scores = self.retriever.retrieve(tokens, k=k, show_progress=False, n_threads=0)  # (Q, k) each
        run: Run = {}
        for qid, row, srow in zip(query_ids, np.asarray(docs), np.asarray(scores)):
            run[qid] = {self.doc_ids[int(d)]: float(s) for d, s in zip(row, srow)}
        return run
