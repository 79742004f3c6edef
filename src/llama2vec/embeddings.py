"""Embedding folders, written shard by shard from a stream and read memory-mapped.

A folder holds `shards/shard-NNNNN.npy` (the embeddings of `shard_size` consecutive texts of the
source) each with `shard-NNNNN.json` (their ids, written after the array: it marks the shard done),
`ids.txt` (every id, in shard order) and `meta.json`, the manifest (count, dim, dtype, shard names,
fingerprint), written last: it marks the folder complete.

The work is split by shard: process i of n encodes the shards s with s % n == i. n and i come from
`--num-shards/--shard-index` (scheduler jobs), from torchrun's or accelerate's RANK and WORLD_SIZE, or
from Ray actors taking shards from a Ray Data dataset (`encode_with_ray`). Every process plans the
shards alike (one validating pass over the source: ids, fields, duplicates), encodes its own, and
whoever finishes the last shard writes the manifest (or `llama2vec encode --merge`). Peak memory is the
model plus one shard; a killed process loses at most the shard it was writing.

The processes must compute alike: the first records its compute dtype and device type in
`shards/compute.json`, each shard records its own, and a process (or a Ray actor) that computes
otherwise is refused, so a folder never mixes bfloat16 GPU shards with float32 CPU ones.
"""

from __future__ import annotations

import hashlib
import logging
import os
from array import array
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from . import __version__
from .data import jsonl_documents, parquet_documents
from .errors import Llama2VecError
from .formats import passage_text
from .prompts import text_rule
from .store import (
    TMP_TAG,
    atomic_file,
    differences,
    ensure_folder,
    file_identity,
    fingerprint,
    model_identity,
    read_json,
    read_json_or_none,
    remove,
    texts_identity,
    write_json,
    write_lines,
)

log = logging.getLogger(__name__)

FORMAT = "llama2vec-embeddings/2"


# --------------------------------------------------------------------------------------------
# Sources: where the texts come from, read from any shard's start


class Source:
    """Texts to encode, each with an id. `scan` validates and locates every text in order;
    `read(start, count)` returns `count` (id, text) pairs from a location `scan` gave."""

    def identity(self) -> str:
        raise NotImplementedError

    def scan(self) -> Iterator[tuple[object, str, str]]:  # (location, 'where', id)
        raise NotImplementedError

    def read(self, start, count: int) -> list[tuple[str, str]]:
        raise NotImplementedError


class ListSource(Source):
    """Texts in memory (the Python API, queries)."""

    def __init__(self, ids: list[str], texts: list[str]):
        if len(ids) != len(texts):
            raise Llama2VecError(f"{len(ids)} ids for {len(texts)} texts")
        self.ids, self.texts = list(ids), list(texts)

    def identity(self) -> str:
        return "texts:" + texts_identity(self.ids, self.texts)

    def scan(self):
        for i, doc_id in enumerate(self.ids):
            yield i, f"text {i + 1}", doc_id

    def read(self, start, count):
        return list(zip(self.ids[start: start + count], self.texts[start: start + count]))


class FileSource(Source):
    """A JSONL file ({_id|id, text[, title]} per line; a BEIR corpus needs `_id`) or a Parquet file
    (columns text[, title, id]), read from a byte offset or a row. Empty texts are skipped."""

    def __init__(self, path: str | Path, require_id: bool = False):
        self.path, self.require_id = Path(path), require_id
        self.parquet = self.path.suffix.lower() == ".parquet"
        if not self.path.is_file():
            raise Llama2VecError(f"{self.path}: file not found")

    def identity(self) -> str:
        return f"file:{file_identity(self.path)}"

    def _documents(self, start=None):
        if self.parquet:
            for row, doc in parquet_documents(self.path, start=start or 0):
                yield row, f"{self.path}: row {row + 1}", doc
        else:
            offset, number = start or (0, 0)
            for at, doc in jsonl_documents(self.path, offset=offset, number=number, require_id=self.require_id):
                yield at, f"{self.path}:{at[1] + 1}", doc

    def scan(self):
        for at, where, doc in self._documents():
            yield at, where, doc.id

    def read(self, start, count):
        out = []
        for _, _, doc in self._documents(tuple(start) if isinstance(start, list) else start):
            if len(out) == count:
                break
            out.append((doc.id, passage_text({"title": doc.title, "text": doc.text})))
        return out


def _id_hash(doc_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(doc_id.encode("utf-8", "surrogatepass"), digest_size=8).digest(),
                          "little", signed=True)


def plan_shards(source: Source, shard_size: int) -> dict:
    """The shards of a source: {'count', 'shards': [[start location, count], ...]}, after checking
    every text (fields, encoding) and that no id repeats. Memory: 8 bytes per text."""
    if shard_size < 1:
        raise Llama2VecError(f"--shard-size must be positive, got {shard_size}")
    shards, hashes, count = [], array("q"), 0
    for at, _, doc_id in source.scan():
        if count % shard_size == 0:
            shards.append([at, 0])
        shards[-1][1] += 1
        hashes.append(_id_hash(doc_id))
        count += 1
    if not count:
        raise Llama2VecError("nothing to encode (no texts)")
    ordered = np.sort(np.frombuffer(hashes, dtype=np.int64))
    if (ordered[1:] == ordered[:-1]).any():
        _report_duplicate(source)
    return {"count": count, "shard_size": shard_size, "shards": shards}


def _report_duplicate(source: Source) -> None:
    seen: dict[str, str] = {}
    for _, where, doc_id in source.scan():
        if doc_id in seen:
            raise Llama2VecError(f"{where}: duplicate id {doc_id!r} (also at {seen[doc_id]})")
        seen[doc_id] = where


# --------------------------------------------------------------------------------------------
# Which process does what


def workers(num_shards: int | None = None, shard_index: int | None = None) -> tuple[int, int]:
    """(how many processes share the work, which one this is): from --num-shards/--shard-index, else
    from torchrun's or accelerate's WORLD_SIZE and RANK, else (1, 0)."""
    if num_shards is None and shard_index is None:
        num_shards, shard_index = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    elif num_shards is None or shard_index is None:
        raise Llama2VecError("--num-shards and --shard-index go together")
    if num_shards < 1 or not 0 <= shard_index < num_shards:
        raise Llama2VecError(f"--shard-index must be in 0..{num_shards - 1} (--num-shards {num_shards}), "
                             f"got {shard_index}")
    return num_shards, shard_index


# --------------------------------------------------------------------------------------------
# Writing a folder


def encode_fingerprint(source_model: str | None, spec, backend: str, source: Source, kind: str, shard_size: int,
                       dtype: str) -> dict:
    """What an embeddings folder is made from: the model, the texts, the prompt, the options and the package
    version (not how many processes shared the work: that does not change the result; the compute dtype
    and device are checked shard by shard, see `claim_compute`)."""
    max_length, task = text_rule(spec, kind)
    return fingerprint(model=model_identity(source_model) if source_model else "unknown", texts=source.identity(),
                       kind=kind, task=task, prompt=asdict(spec), max_length=max_length, backend=backend,
                       shard_size=shard_size, dtype=dtype, version=__version__)


def compute_of(encoder) -> dict:
    """How an encoder computes: the dtype and device type of its weights (or ONNX Runtime's, on the CPU).
    The same model gives other embeddings in bfloat16 on a GPU than in float32 on a CPU."""
    if encoder.onnx is not None:
        return {"dtype": "int8" if encoder.backend == "onnx-int8" else "float32", "device": "cpu"}
    weight = next(encoder.model.parameters())
    return {"dtype": str(weight.dtype).removeprefix("torch."), "device": weight.device.type}


def _compute_text(compute: dict) -> str:
    return f"{compute.get('dtype')} on {compute.get('device')}"


def _check_same(folder: Path, old: dict | None, new: dict) -> None:
    diff = differences(old, new)
    if diff:
        raise Llama2VecError(f"{folder}: holds embeddings made with another {', '.join(diff)}: pass --overwrite to "
                             f"encode again, or choose another --output")


def shard_name(s: int) -> str:
    return f"shard-{s:05d}"


@dataclass
class Job:
    """One folder's encoding: what every process agrees on before encoding its shards."""

    output: Path
    source: Source
    kind: str  # query | passage
    dtype: str
    fingerprint: dict
    plan: dict

    @property
    def shards(self) -> Path:
        return self.output / "shards"

    def done(self, s: int) -> bool:
        return (self.shards / f"{shard_name(s)}.json").is_file()

    def pending(self, n: int = 1, i: int = 0) -> list[int]:
        return [s for s in range(i, len(self.plan["shards"]), n) if not self.done(s)]


def prepare(output: str | Path, source: Source, kind: str, dtype: str, fp: dict, shard_size: int,
            overwrite: bool = False, several: bool = False, compute: dict | None = None) -> Job | None:
    """Check (or start) the folder and plan its shards; None when it is already complete.
    A folder or shards made from other inputs or options is an error, unless `overwrite`."""
    output = Path(output)
    if overwrite and several:
        raise Llama2VecError("--overwrite with several processes would remove the others' work: remove "
                             f"{output} first, or run --overwrite in one process")
    if overwrite:
        for name in ("meta.json", "ids.txt", "shards"):
            remove(output / name)
    if (output / "meta.json").is_file():
        meta = read_json(output / "meta.json")
        _check_same(output, meta.get("fingerprint"), fp)
        if compute is not None and meta.get("compute") != compute:
            raise Llama2VecError(f"{output}: holds embeddings computed in {_compute_text(meta.get('compute') or {})}, "
                                 f"this run computes in {_compute_text(compute)}: pass --overwrite to encode again, "
                                 "or choose another --output")
        log.info("%s: already encoded", output)
        return None
    shards = ensure_folder(output / "shards")
    old = read_json_or_none(shards / "fingerprint.json")
    if old is None:
        if any(shards.glob("shard-*")):  # made before fingerprints, or the file was lost
            raise Llama2VecError(f"{shards}: shards of unknown origin: pass --overwrite to encode again")
        write_json(shards / "fingerprint.json", fp)  # several processes write the same file: harmless
    else:
        _check_same(shards, old, fp)
    plan = read_json_or_none(shards / "plan.json")
    if plan is None or plan.get("shard_size") != shard_size:
        plan = plan_shards(source, shard_size)
        write_json(shards / "plan.json", plan)
    job = Job(output, source, kind, dtype, fp, plan)
    if compute is not None:
        claim_compute(job, compute)
    return job


def claim_compute(job: Job, compute: dict) -> None:
    """This process's compute against the folder's: the first process to encode records it in
    `shards/compute.json`; any other must compute alike (a race between two that differ is caught by `merge`,
    which reads every shard's own record)."""
    path = job.shards / "compute.json"
    old = read_json_or_none(path)
    if old is None:
        write_json(path, compute)
    elif old != compute:
        raise Llama2VecError(f"{job.output}: its shards are computed in {_compute_text(old)}, this process computes "
                             f"in {_compute_text(compute)}; the embeddings would not compare: run every process "
                             f"alike (--device, --backend), or pass --overwrite to encode again")


def encode_shard(encoder, job: Job, s: int, batch_size: int | None = None, compute: dict | None = None) -> int:
    """Encode shard `s` and write its array, then its ids and compute (the mark that it is done); returns its
    size."""
    start, count = job.plan["shards"][s]
    records = job.source.read(start, count)
    if len(records) != count:
        raise Llama2VecError(f"{job.output}: shard {s} should hold {count} texts, the source gave {len(records)}: "
                             f"the source changed while being encoded")
    rows = encoder.tokenize([t for _, t in records])
    truncated = sum(len(r) > job.fingerprint["max_length"] for r in rows)
    emb = encoder.encode_ids(*encoder.fit(rows, job.kind), batch_size).astype(job.dtype)
    name = shard_name(s)
    with atomic_file(job.shards / f"{name}.npy") as tmp, tmp.open("wb") as fh:
        np.save(fh, emb)
    write_json(job.shards / f"{name}.json", {"count": count, "truncated": truncated, "ids": [i for i, _ in records],
                                             "compute": compute or compute_of(encoder)})
    return count


def merge(output: str | Path) -> Path:
    """Complete a folder whose shards are all written: `ids.txt` then the manifest `meta.json`.
    An error names the shards still missing."""
    output = Path(output)
    shards = output / "shards"
    if (output / "meta.json").is_file():
        return output
    fp, plan = read_json_or_none(shards / "fingerprint.json"), read_json_or_none(shards / "plan.json")
    if fp is None or plan is None:
        raise Llama2VecError(f"{output}: no encoding was started here (no shards/plan.json)")
    n = len(plan["shards"])
    missing = [s for s in range(n) if not (shards / f"{shard_name(s)}.json").is_file()]
    if missing:
        raise Llama2VecError(f"{output}: {len(missing)} of {n} shards are not encoded yet "
                             f"({', '.join(map(str, missing[:10]))}{' ...' if len(missing) > 10 else ''})")
    truncated, computes = 0, {}

    def ids() -> Iterator[str]:
        nonlocal truncated
        for s in range(n):
            part = read_json(shards / f"{shard_name(s)}.json")
            truncated += part["truncated"]
            computes.setdefault(_compute_text(part.get("compute") or {}), []).append(s)
            yield from part["ids"]

    count = write_lines(output / "ids.txt", ids())
    if len(computes) > 1:  # the folder stays incomplete: no meta.json
        raise Llama2VecError(f"{output}: its shards were computed differently ("
                             + "; ".join(f"{how}: shards {', '.join(map(str, ss[:5]))}{' ...' if len(ss) > 5 else ''}"
                                         for how, ss in computes.items())
                             + "): encode the odd ones again alike (remove their shard-NNNNN.json), or --overwrite")
    if count != plan["count"]:
        raise Llama2VecError(f"{output}: the shards hold {count} ids, the plan {plan['count']}")
    first = np.load(shards / f"{shard_name(0)}.npy", mmap_mode="r")
    write_json(output / "meta.json", {
        "format": FORMAT, "count": count, "dim": int(first.shape[1]), "dtype": str(first.dtype),
        "shards": [shard_name(s) for s in range(n)], "kind": fp["kind"], "task": fp["task"],
        "compute": read_json(shards / f"{shard_name(0)}.json").get("compute"), "model_prompt": fp["prompt"]["preset"],
        "texts": count, "truncated": truncated, "truncated_share": round(truncated / count, 4),
        "max_length": fp["max_length"], "fingerprint": fp})
    for leftover in shards.glob(f".*{TMP_TAG}*"):  # of killed processes, on any machine: all are done now
        remove(leftover)
    if truncated:
        log.warning("%d of %d texts (%.1f%%) were longer than %d tokens and were cut", truncated, count,
                    100 * truncated / count, fp["max_length"])
    return output


def finish_if_complete(job: Job) -> bool:
    """Write the manifest when every shard is done (the last process to finish does it)."""
    if job.pending():
        return False
    merge(job.output)
    return True


def encode_to_folder(encoder, source: Source, output: str | Path, kind: str, shard_size: int = 1024,
                     dtype: str = "float32", batch_size: int | None = None, overwrite: bool = False,
                     num_shards: int | None = None, shard_index: int | None = None) -> Path:
    """Encode `source` into an embeddings folder: this process's shards (see `workers`), then the
    manifest if every shard is done. `kind`: 'passage' or 'query' (`prompts.text_rule`). Shards are
    written atomically; a killed run resumes at its first missing shard."""
    from tqdm.auto import tqdm

    n, i = workers(num_shards, shard_index)
    fp = encode_fingerprint(encoder.source, encoder.spec, encoder.backend, source, kind, shard_size, dtype)
    compute = compute_of(encoder)
    job = prepare(output, source, kind, dtype, fp, shard_size, overwrite, several=n > 1, compute=compute)
    if job is None:
        return Path(output)
    todo = job.pending(n, i)
    for s in tqdm(todo, desc=f"encoding {job.output.name}" + (f" [{i + 1}/{n}]" if n > 1 else ""), unit="shard"):
        encode_shard(encoder, job, s, batch_size, compute)
    if not finish_if_complete(job):
        log.info("%s: this process's shards are done; %d shards remain for the others (then the last one to "
                 "finish, or `llama2vec encode --merge`, completes the folder)", job.output, len(job.pending()))
    return job.output


def save_embeddings(folder: str | Path, ids: list[str], emb: np.ndarray, meta: dict | None = None) -> Path:
    """Write embeddings held in memory as a one-shard folder."""
    folder = Path(folder)
    remove(folder / "meta.json")
    shards = ensure_folder(folder / "shards")
    with atomic_file(shards / "shard-00000.npy") as tmp, tmp.open("wb") as fh:
        np.save(fh, emb)
    write_json(shards / "shard-00000.json", {"count": len(ids), "truncated": 0, "ids": list(ids)})
    write_lines(folder / "ids.txt", ids)
    write_json(folder / "meta.json", {"format": FORMAT, "count": len(ids), "dim": int(emb.shape[1]),
                                      "dtype": str(emb.dtype), "shards": ["shard-00000"], **(meta or {})})
    return folder


# --------------------------------------------------------------------------------------------
# Reading a folder


class Embeddings:
    """A complete embeddings folder, read shard by shard, each shard memory-mapped."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        meta = read_json_or_none(self.folder / "meta.json")
        if meta is None:
            raise Llama2VecError(f"{self.folder}: not a finished embeddings folder (no meta.json)")
        if meta.get("format") != FORMAT:
            raise Llama2VecError(f"{self.folder}: an embeddings folder of another format "
                                 f"({meta.get('format', 'the first')}): encode it again")
        self.meta = meta
        self.count, self.dim, self.dtype = meta["count"], meta["dim"], meta["dtype"]
        self.names: list[str] = meta["shards"]
        self._sizes: list[int] | None = None

    def ids(self) -> list[str]:
        ids = (self.folder / "ids.txt").read_text(encoding="utf-8").splitlines()
        if len(ids) != self.count:
            raise Llama2VecError(f"{self.folder}/ids.txt: {len(ids)} ids, meta.json says {self.count}")
        return ids

    def shard(self, s: int) -> np.ndarray:
        path = self.folder / "shards" / f"{self.names[s]}.npy"
        try:
            emb = np.load(path, mmap_mode="r")
        except (OSError, ValueError) as e:
            raise Llama2VecError(f"{path}: cannot read: {e}") from None
        if emb.ndim != 2 or emb.shape[1] != self.dim:
            raise Llama2VecError(f"{path}: shape {emb.shape}, meta.json says {self.dim} dimensions")
        return emb

    def sizes(self) -> list[int]:
        if self._sizes is None:
            self._sizes = [len(self.shard(s)) for s in range(len(self.names))]
            if sum(self._sizes) != self.count:
                raise Llama2VecError(f"{self.folder}: the shards hold {sum(self._sizes)} rows, meta.json {self.count}")
        return self._sizes

    def batches(self, size: int) -> Iterator[np.ndarray]:
        """float32 batches of at most `size` rows, in order."""
        for s in range(len(self.names)):
            emb = self.shard(s)
            for start in range(0, len(emb), size):
                yield np.ascontiguousarray(emb[start: start + size], dtype=np.float32)

    def sample(self, n: int, seed: int = 0) -> np.ndarray:
        """n rows (all when n >= count) drawn without replacement by a seeded generator, float32."""
        if n >= self.count:
            return self.array()
        rows = np.sort(np.random.default_rng(seed).choice(self.count, size=n, replace=False))
        out, first = [], 0
        for s, size in enumerate(self.sizes()):
            mine = rows[(rows >= first) & (rows < first + size)] - first
            if len(mine):
                out.append(np.asarray(self.shard(s)[mine], dtype=np.float32))
            first += size
        return np.concatenate(out)

    def array(self) -> np.ndarray:
        """Every row in one array in memory, in the stored dtype."""
        return np.concatenate([np.asarray(self.shard(s)) for s in range(len(self.names))])


def load_embeddings(folder: str | Path) -> tuple[list[str], np.ndarray]:
    """(ids, (N, H) array in memory) of a complete folder."""
    emb = Embeddings(folder)
    ids, array = emb.ids(), emb.array()
    if len(ids) != len(array):
        raise Llama2VecError(f"{folder}: {len(ids)} ids for {len(array)} embeddings")
    return ids, array
