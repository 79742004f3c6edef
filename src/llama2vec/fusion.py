"""Fusion of ranked runs (query id -> {doc id: score}), and its choice on a dev split.

Methods, with one weight per run:

- ``rrf`` (weighted reciprocal rank fusion): ``score(d) = sum_i w_i / (k + rank_i(d))``; a document
  missing from run i gets nothing from it. ``rank_i`` is the document's position in run i as
  trec_eval orders it (score descending, then doc id descending), from 1.
- ``wsum`` (weighted sum of normalised scores): ``score(d) = sum_i w_i * norm_i(d)``, normalised per
  query and run: ``minmax`` maps the run's scores to [0, 1], ``zscore`` subtracts their mean and
  divides by their standard deviation (constant scores become 0). A document missing from run i
  gets run i's lowest normalised score for that query (0 under minmax): not retrieved counts as no
  better than the last document retrieved.

A run of weight 0 contributes no documents either, so a one-hot ``wsum`` ranks exactly as that run
alone. The fused ranking is ordered as trec_eval reads it (score descending, then doc id descending)
and cut at `depth`.

`choose_fusion` scores every candidate of a small grid (see `candidates`) with
`llama2vec.metrics.evaluate_run`, the same code that scores test runs, and keeps the best; each
input run alone is a candidate, so on the dev split the choice is never below the better input.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .errors import Llama2VecError
from .formats import Qrels, Run
from .metrics import METRICS, evaluate_run

log = logging.getLogger(__name__)

METHODS = ("rrf", "wsum")
NORMS = ("minmax", "zscore")
AUTO = "auto"
DEFAULT = "rrf"  # equal-weight RRF, k 60
RRF_KS = (60, 10, 30, 100)  # the grid's RRF k values; 60, the usual one, is preferred on ties
WEIGHT_STEP = 0.1
_CUTS = {"ndcg@10": 10, "mrr@10": 10, "recall@100": 100}  # the depth a metric reads
SYNTAX = "rrf[:K[:W1,W2,...]], wsum[:minmax|zscore[:W1,W2,...]] or auto"


@dataclass(frozen=True)
class FusionSpec:
    """A fusion method, one weight per run and the method's parameter (`k` for rrf, `norm` for
    wsum). `str(spec)` is its `--fusion` form, `to_json()` a JSON object; both read back."""

    method: str
    weights: tuple[float, ...]
    k: int = 60
    norm: str = "minmax"

    def __post_init__(self) -> None:
        object.__setattr__(self, "weights", tuple(float(w) for w in self.weights))
        if self.method not in METHODS:
            raise Llama2VecError(f"unknown method {self.method!r} (choose {', '.join(METHODS)})")
        if self.method == "rrf" and (isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1):
            raise Llama2VecError(f"k must be a positive integer, got {self.k!r}")
        if self.method == "wsum" and self.norm not in NORMS:
            raise Llama2VecError(f"norm must be {' or '.join(NORMS)}, got {self.norm!r}")
        if not self.weights or any(not math.isfinite(w) or w < 0 for w in self.weights):
            raise Llama2VecError(f"weights must be non-negative numbers, got {self.weights}")
        if not any(self.weights):
            raise Llama2VecError("weights must not all be 0")

    def __str__(self) -> str:
        param = self.k if self.method == "rrf" else self.norm
        return f"{self.method}:{param}:" + ",".join(f"{w:g}" for w in self.weights)

    @property
    def single(self) -> int | None:
        """The index of the only run with a weight, if just one has."""
        used = [i for i, w in enumerate(self.weights) if w > 0]
        return used[0] if len(used) == 1 else None

    def to_json(self) -> dict:
        param = {"k": self.k} if self.method == "rrf" else {"norm": self.norm}
        return {"method": self.method, "weights": list(self.weights), **param}

    @classmethod
    def from_json(cls, obj: dict) -> FusionSpec:
        return cls(obj["method"], tuple(obj["weights"]), obj.get("k", 60), obj.get("norm", "minmax"))


def parse_fusion(text: str, n_runs: int, option: str = "--fusion") -> FusionSpec:
    """An explicit fusion (see SYNTAX) of `n_runs` runs: `rrf:60:0.7,0.3`, `wsum:zscore:1,1`; weights
    left out are equal. `auto` is not a spec (the caller chooses one with `choose_fusion`)."""
    def bad(why: str) -> Llama2VecError:
        return Llama2VecError(f"{option} {text!r}: {why} (expected {SYNTAX})")

    parts = text.split(":")
    method = parts[0]
    if method == AUTO:
        raise bad("'auto' chooses a fusion on dev runs and takes no parameters")
    if method not in METHODS:
        raise bad(f"unknown method {method!r}")
    if len(parts) > 3:
        raise bad(f"{len(parts) - 1} parameters, at most 2")
    k, norm = 60, "minmax"
    if len(parts) > 1 and method == "rrf":
        try:
            k = int(parts[1])
        except ValueError:
            raise bad(f"k must be a positive integer, got {parts[1]!r}") from None
    elif len(parts) > 1:
        norm = parts[1]
    weights = (1.0,) * n_runs
    if len(parts) > 2:
        try:
            weights = tuple(float(w) for w in parts[2].split(","))
        except ValueError:
            raise bad(f"weights must be numbers separated by commas, got {parts[2]!r}") from None
        if len(weights) != n_runs:
            raise bad(f"weights: {len(weights)} given for {n_runs} runs")
    try:
        return FusionSpec(method, weights, k, norm)
    except Llama2VecError as e:
        raise bad(str(e)) from None


class _Prepared:
    """Per query: the union of the runs' documents (sorted), which run holds each, and their
    ranks and scores there; the per-method features are computed once and cached."""

    def __init__(self, runs: Sequence[Run]):
        self.n = len(runs)
        self.qids = list(dict.fromkeys(q for run in runs for q in run))
        self.docs: dict[str, list[str]] = {}
        self.present: dict[str, np.ndarray] = {}
        self.ranks: dict[str, np.ndarray] = {}
        self.scores: dict[str, np.ndarray] = {}
        self._cache: dict[tuple, dict[str, np.ndarray]] = {}
        for q in self.qids:
            docs = sorted({d for run in runs for d in run.get(q, {})})
            index = {d: j for j, d in enumerate(docs)}
            present = np.zeros((self.n, len(docs)), dtype=bool)
            ranks = np.full((self.n, len(docs)), np.inf)
            scores = np.zeros((self.n, len(docs)))
            for i, run in enumerate(runs):
                ranked = sorted(sorted(run.get(q, {}).items(), reverse=True), key=lambda kv: -kv[1])
                for r, (d, s) in enumerate(ranked, start=1):
                    j = index[d]
                    present[i, j], ranks[i, j], scores[i, j] = True, r, s
            self.docs[q], self.present[q], self.ranks[q], self.scores[q] = docs, present, ranks, scores

    def features(self, spec: FusionSpec) -> dict[str, np.ndarray]:
        """Query id -> (runs, docs) array whose weighted sum is the fused score."""
        key = ("rrf", spec.k) if spec.method == "rrf" else ("wsum", spec.norm)
        if key not in self._cache:
            self._cache[key] = {q: self._feature(q, spec) for q in self.qids}
        return self._cache[key]

    def _feature(self, q: str, spec: FusionSpec) -> np.ndarray:
        present = self.present[q]
        if spec.method == "rrf":
            return 1.0 / (spec.k + self.ranks[q])  # inf rank: 0
        out = np.zeros(present.shape)
        for i in range(self.n):
            s = self.scores[q][i, present[i]]
            if s.size == 0:
                continue
            if spec.norm == "minmax":
                span = s.max() - s.min()
                v = (s - s.min()) / span if span > 0 else np.zeros_like(s)
            else:
                std = s.std()
                v = (s - s.mean()) / std if std > 0 else np.zeros_like(s)
            out[i] = v.min()  # missing documents
            out[i, present[i]] = v
        return out

    def fuse(self, spec: FusionSpec, depth: int) -> Run:
        if len(spec.weights) != self.n:
            raise Llama2VecError(f"fusion {spec}: {len(spec.weights)} weights for {self.n} runs")
        w = np.asarray(spec.weights)
        features = self.features(spec)
        out: Run = {}
        for q in self.qids:
            keep = self.present[q][w > 0].any(axis=0)
            if not keep.any():
                continue
            idx = np.flatnonzero(keep)
            fused = w @ features[q][:, idx]
            order = np.lexsort((-idx, -fused))[:depth]  # score descending, then doc id descending
            docs = self.docs[q]
            out[q] = {docs[idx[j]]: float(fused[j]) for j in order}
        return out


def fuse(runs: Sequence[Run], spec: FusionSpec, depth: int = 1000) -> Run:
    """The fused top-`depth` run of `runs` (one weight each in `spec`)."""
    return _Prepared(runs).fuse(spec, depth)


def _weight_grid(n: int) -> list[tuple[float, ...]]:
    """Weights in steps of WEIGHT_STEP summing to 1, each with at least two runs weighted."""
    steps = round(1 / WEIGHT_STEP)
    grid = [c for c in itertools.product(range(steps + 1), repeat=n) if sum(c) == steps]
    return [tuple(x / steps for x in c) for c in grid if sum(1 for x in c if x) >= 2]


def candidates(n: int) -> list[FusionSpec]:
    """The grid `choose_fusion` searches for `n` runs, in order of preference on ties: each run
    alone (one-hot wsum, which ranks as that run), then for every weight vector in steps of 0.1
    summing to 1 (at least two runs weighted): rrf with k 60, 10, 30, 100, then wsum with minmax
    and zscore. For two runs: 2 + 9 x 6 = 56 candidates."""
    singles = [FusionSpec("wsum", tuple(float(i == j) for j in range(n))) for i in range(n)]
    methods = [("rrf", k, "minmax") for k in RRF_KS] + [("wsum", 60, norm) for norm in NORMS]
    return singles + [FusionSpec(m, w, k, norm) for w in _weight_grid(n) for m, k, norm in methods]


def _simplicity(spec: FusionSpec) -> int:
    """0: one run alone; 1: equal weights; 2: other weights."""
    if spec.single is not None:
        return 0
    return 1 if len(set(spec.weights)) == 1 else 2


def choose_fusion(dev_runs: Sequence[Run], dev_qrels: Qrels, metric: str = "ndcg@10",
                  depth: int = 1000) -> tuple[FusionSpec, list[tuple[FusionSpec, float]]]:
    """The candidate (see `candidates`) with the best `metric` on the dev runs and qrels, and every
    candidate with its dev score, best first. Ties (scores equal to 12 decimals) go to the simpler:
    a single run, then equal weights, then the earlier in the grid."""
    if metric not in METRICS:
        raise Llama2VecError(f"unknown metric {metric!r} (choose from {', '.join(METRICS)})")
    if len(dev_runs) < 2:
        raise Llama2VecError(f"choosing a fusion needs at least 2 runs, got {len(dev_runs)}")
    judged = {q: docs for q, docs in dev_qrels.items() if any(v > 0 for v in docs.values())}
    if not judged:
        raise Llama2VecError(f"the dev qrels: no positive judgement (score > 0) for any of {len(dev_qrels)} queries")
    if len(judged) < len(dev_qrels):
        log.warning("the dev qrels: %d of %d queries have no positive judgement and are left out",
                    len(dev_qrels) - len(judged), len(dev_qrels))
    prepared = _Prepared(dev_runs)
    grid = candidates(len(dev_runs))
    cut = min(depth, _CUTS.get(metric, depth))  # the same figure as the whole run's, computed faster
    scores = [evaluate_run(judged, prepared.fuse(c, cut), "the dev qrels")[metric] for c in grid]
    order = sorted(range(len(grid)), key=lambda i: (-round(scores[i], 12), _simplicity(grid[i]), i))
    table = [(grid[i], scores[i]) for i in order]
    return table[0][0], table


def describe(spec: FusionSpec, names: Sequence[str] | None = None) -> str:
    """`spec` in words, e.g. 'rrf:60:0.7,0.3' or 'bm25 alone (wsum:minmax:1,0)'."""
    if spec.single is not None and names is not None:
        return f"{names[spec.single]} alone ({spec})"
    return str(spec)


def format_choice(table: list[tuple[FusionSpec, float]], names: Sequence[str], metric: str = "ndcg@10",
                  top: int = 5) -> str:
    """The chosen fusion and its dev figures: the best `top` candidates, each input alone and
    equal-weight RRF (k 60)."""
    shown = table[:top]
    for spec, score in table[top:]:
        if spec.single is not None or (spec.method == "rrf" and spec.k == 60 and _simplicity(spec) == 1):
            shown.append((spec, score))
    lines = [f"fusion chosen on dev ({metric}): {describe(table[0][0], names)} {table[0][1]:.4f}"]
    lines += [f"  {describe(spec, names):<40} {score:.4f}" for spec, score in shown]
    return "\n".join(lines)
