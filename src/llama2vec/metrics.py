"""Retrieval metrics through pytrec_eval (trec_eval's own code). Knows nothing of models.

Keys: ndcg@10, mrr@10, recall@100, recall@1000, map. Every query of the qrels counts: a query
missing from the run scores 0 (trec_eval alone would skip it).
"""

from __future__ import annotations

import logging

from .errors import Llama2VecError
from .formats import Qrels, Run

log = logging.getLogger(__name__)

METRICS = ("ndcg@10", "mrr@10", "recall@100", "recall@1000", "map")
_TREC = {"ndcg@10": "ndcg_cut_10", "recall@100": "recall_100", "recall@1000": "recall_1000", "map": "map"}


def top_k(run: Run, k: int) -> Run:
    return {q: dict(sorted(docs.items(), key=lambda kv: -kv[1])[:k]) for q, docs in run.items()}


def per_query(qrels: Qrels, run: Run) -> dict[str, dict[str, float]]:
    """metric -> {query id: value} for every query in qrels."""
    import pytrec_eval

    run = {q: docs for q, docs in run.items() if q in qrels}
    full = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.10", "recall.100,1000", "map"}).evaluate(run)
    rr = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}).evaluate(top_k(run, 10))
    out: dict[str, dict[str, float]] = {m: {} for m in METRICS}
    for q in qrels:
        for m, key in _TREC.items():
            out[m][q] = full.get(q, {}).get(key, 0.0)
        out["mrr@10"][q] = rr.get(q, {}).get("recip_rank", 0.0)
    return out


def evaluate_run(qrels: Qrels, run: Run, source: str = "the qrels") -> dict[str, float]:
    """Mean of each metric over the queries of qrels that have at least one relevant document;
    queries without one are left out with a warning, and qrels with none at all are an error."""
    judged = len(qrels)
    qrels = {q: docs for q, docs in qrels.items() if any(v > 0 for v in docs.values())}
    if not qrels:
        raise Llama2VecError(f"{source}: no positive judgement (score > 0) for any of {judged} queries: "
                             f"every metric would be 0")
    if len(qrels) < judged:
        log.warning("%s: %d of %d queries have no positive judgement and are left out", source,
                    judged - len(qrels), judged)
    values = per_query(qrels, run)
    return {m: sum(values[m].values()) / len(qrels) for m in METRICS}


def format_table(rows: dict[str, dict[str, float]], metrics: tuple[str, ...] = METRICS) -> str:
    """A Markdown table: one row per system."""
    head = "| system | " + " | ".join(metrics) + " |\n|---|" + "---|" * len(metrics) + "\n"
    body = "".join(f"| {name} | " + " | ".join(f"{vals.get(m, float('nan')):.3f}" for m in metrics) + " |\n"
                   for name, vals in rows.items())
    return head + body
