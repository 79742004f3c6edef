"""FAISS indexes built out of core, by parts and after PCA, against the in-memory index and exact search."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from llama2vec.errors import Llama2VecError

pytestmark = pytest.mark.slow  # make test-fast leaves these out


def clustered(n: int, dim: int, seed: int) -> np.ndarray:
    """Unit vectors in 64 clusters of a 24-dimensional subspace, with a little noise outside it (like
    embeddings, whose variance sits in few directions)."""
    basis = np.random.default_rng(99).standard_normal((24, dim))
    centres = np.random.default_rng(98).standard_normal((64, 24))
    rng = np.random.default_rng(seed)
    x = (centres[rng.integers(0, 64, n)] + 0.6 * rng.standard_normal((n, 24))) @ basis
    x += 0.3 * rng.standard_normal((n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def recall_at_10(folder: Path, queries: np.ndarray, exact: np.ndarray, params: str) -> float:
    from llama2vec.index import search_shards

    run = search_shards([folder], [f"q{i}" for i in range(len(queries))], queries, 10, params)
    return float(np.mean([len({int(d[1:]) for d in run[f"q{i}"]} & set(exact[i])) / 10
                          for i in range(len(queries))]))


def test_out_of_core_ivf_pq_equals_the_in_memory_index(tmp_path):
    from llama2vec.embeddings import FORMAT
    from llama2vec.index import build_index, index_folder, save_index, search_index
    from llama2vec.store import write_json

    data, queries = clustered(20_000, 64, 0), clustered(200, 64, 1)
    folder = tmp_path / "emb"
    shards = folder / "shards"
    shards.mkdir(parents=True)
    names = []
    for s, start in enumerate(range(0, len(data), 3000)):  # uneven shards
        np.save(shards / f"shard-{s:05d}.npy", data[start: start + 3000])
        names.append(f"shard-{s:05d}")
    ids = [f"p{i}" for i in range(len(data))]
    (folder / "ids.txt").write_text("\n".join(ids) + "\n")
    write_json(folder / "meta.json", {"format": FORMAT, "count": len(data), "dim": 64, "dtype": "float32",
                                      "shards": names})
    exact = search_index(build_index(data, "Flat"), queries, 10)[1]
    whole = save_index(tmp_path / "whole", build_index(data, "IVF64,PQ16"), ids, "IVF64,PQ16")
    out = index_folder(folder, tmp_path / "ooc", "IVF64,PQ16", train_size=12_000, seed=0, batch=1000)
    a, b = (recall_at_10(f, queries, exact, "nprobe=8") for f in (whole, out))
    assert a > 0.5 and abs(a - b) <= 0.01, (a, b)
    # Parts searched one at a time give what one index over everything gives (exact search: the same).
    flat = index_folder(folder, tmp_path / "flat", "Flat")
    parts = index_folder(folder, tmp_path / "parts", "Flat", parts=3)
    assert sorted(p.name for p in parts.iterdir()) == ["meta.json", "part-000", "part-001", "part-002"]
    assert recall_at_10(flat, queries, exact, None) == recall_at_10(parts, queries, exact, None) == 1.0
    # PCA to 32 dimensions: a smaller index, still a useful one.
    pca = index_folder(folder, tmp_path / "pca", "Flat", pca=32)
    assert 0.7 < recall_at_10(pca, queries, exact, None) < 1.0
    with pytest.raises(Llama2VecError, match="--parts must be in 1..7"):
        index_folder(folder, tmp_path / "x", "Flat", parts=8)


def test_a_rebuild_stopped_half_way_leaves_no_index_that_looks_complete(tmp_path, monkeypatch):
    """`index --parts` over an existing index: the top-level meta.json goes first and comes back last, so that a
    rebuild killed between parts leaves no meta naming a mix of new and old parts (search then refuses it)."""
    import llama2vec.index as index_mod
    from llama2vec.embeddings import FORMAT
    from llama2vec.index import index_folder, search_shards
    from llama2vec.store import write_json

    data = clustered(600, 16, 0)
    folder = tmp_path / "emb"
    (folder / "shards").mkdir(parents=True)
    names = [f"shard-{s:05d}" for s in range(3)]
    for s, name in enumerate(names):
        np.save(folder / "shards" / f"{name}.npy", data[s * 200: (s + 1) * 200])
    (folder / "ids.txt").write_text("".join(f"p{i}\n" for i in range(600)))
    write_json(folder / "meta.json", {"format": FORMAT, "count": 600, "dim": 16, "dtype": "float32", "shards": names})
    out = index_folder(folder, tmp_path / "index", "Flat", parts=3)
    assert (out / "meta.json").is_file()

    real, saved = index_mod.save_index, []

    def killed_after_one(*args, **kwargs):
        if saved:
            raise KeyboardInterrupt  # the process stops here
        saved.append(real(*args, **kwargs))
        return saved[-1]

    monkeypatch.setattr(index_mod, "save_index", killed_after_one)
    with pytest.raises(KeyboardInterrupt):
        index_folder(folder, out, "IVF4,Flat", parts=3)
    assert not (out / "meta.json").exists()
    with pytest.raises(Llama2VecError, match="not an index folder"):
        search_shards([out], ["q"], data[:1], 5)


def test_the_server_searches_parts_as_search_does(tmp_path):
    """The server's searcher, which prepares its parts once at load, ranks as `llama2vec search` over the parts."""
    pytest.importorskip("fastapi")
    from llama2vec.embeddings import FORMAT
    from llama2vec.index import index_folder, search_shards
    from llama2vec.serve import Searcher
    from llama2vec.store import write_json

    data, queries = clustered(900, 16, 0), clustered(7, 16, 1)
    folder = tmp_path / "emb"
    (folder / "shards").mkdir(parents=True)
    names = [f"shard-{s:05d}" for s in range(3)]
    for s, name in enumerate(names):
        np.save(folder / "shards" / f"{name}.npy", data[s * 300: (s + 1) * 300])
    (folder / "ids.txt").write_text("".join(f"p{i}\n" for i in range(900)))
    write_json(folder / "meta.json", {"format": FORMAT, "count": 900, "dim": 16, "dtype": "float32", "shards": names})
    out = index_folder(folder, tmp_path / "index", "Flat", parts=3)
    run = search_shards([out], [f"q{i}" for i in range(7)], queries, 10)
    hits = Searcher(out, None, 16).search(queries, 10)
    for i, row in enumerate(hits):
        assert [h["id"] for h in row] == list(run[f"q{i}"])
        assert [h["score"] for h in row] == pytest.approx(list(run[f"q{i}"].values()), abs=1e-6)
