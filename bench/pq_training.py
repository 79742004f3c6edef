"""IVF-PQ training with and without FAISS's polysemous step (on by default in FAISS, off in llama2vec: it only
reorders the codes for Hamming-distance filtering, which an inner-product search never uses), side by side on the
same clustered vectors: seconds to train, and whether the two indexes find the same hits. Appends a table to
BENCHMARKS.md.

    python bench/pq_training.py --vectors 50000 --dim 128 --factory IVF256,PQ16
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from report import append_report, machine, markdown_table


def clustered(n: int, dim: int, seed: int) -> np.ndarray:
    basis = np.random.default_rng(99).standard_normal((32, dim))
    centres = np.random.default_rng(98).standard_normal((128, 32))
    rng = np.random.default_rng(seed)
    x = (centres[rng.integers(0, 128, n)] + 0.6 * rng.standard_normal((n, 32))) @ basis
    x += 0.3 * rng.standard_normal((n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def main() -> None:
    import faiss

    from llama2vec.index import new_index

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vectors", type=int, default=50_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--factory", default="IVF256,PQ16")
    parser.add_argument("--output", default=str(Path(__file__).resolve().parents[1] / "BENCHMARKS.md"))
    args = parser.parse_args()
    data, queries = clustered(args.vectors, args.dim, 0), clustered(500, args.dim, 1)
    found, seconds = {}, {}
    for name in ("FAISS's default (polysemous)", "llama2vec (without)"):
        index = new_index(args.dim, args.factory)
        if name.startswith("FAISS"):
            faiss.downcast_index(faiss.extract_index_ivf(index)).do_polysemous_training = True
        start = time.perf_counter()
        index.train(data)
        seconds[name] = time.perf_counter() - start
        index.add(data)
        faiss.extract_index_ivf(index).nprobe = 16
        found[name] = index.search(queries, 10)
        print(name, f"{seconds[name]:.1f} s", flush=True)
    (a_scores, a_ids), (b_scores, b_ids) = found.values()
    same = f"{np.mean(a_ids == b_ids):.4f} of the hits equal, scores within {np.abs(a_scores - b_scores).max():.1e}"
    slow, fast = seconds.values()
    rows = [[name, f"{s:.1f}"] for name, s in seconds.items()] + [["ratio", f"{slow / fast:.1f}x"], ["hits", same]]
    append_report(args.output, "IVF-PQ training without the polysemous step",
                  f"python bench/pq_training.py --vectors {args.vectors} --dim {args.dim} --factory {args.factory}",
                  f"{machine()}; {faiss.omp_get_max_threads()} FAISS threads",
                  markdown_table(["training", "seconds"], rows))


if __name__ == "__main__":
    main()
