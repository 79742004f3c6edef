"""`llama2vec encode --engine ray`: the shards of an embeddings folder encoded by actors of a Ray Data
pipeline, on a local Ray instance or a cluster (`--ray-address`), one GPU an actor where there are GPUs.

The dataset is the source's shards: each row names a shard (its start in the source and its size);
an actor loads the model once, reads its shards' texts from the source (a file every node sees, or
texts shipped with the job) and writes them in the folder layout of `embeddings`. The driver plans
the shards and writes the manifest, so the folder equals the one a single process writes.
"""

from __future__ import annotations

import logging
from pathlib import Path

from .embeddings import Job, Source, encode_fingerprint, encode_shard, finish_if_complete, prepare
from .errors import Llama2VecError

log = logging.getLogger(__name__)


class ShardEncoder:
    """A Ray Data actor: one model, many shards."""

    def __init__(self, model: str, backend: str, batch_size: int, job: Job):
        import torch

        from .encoder import Llama2Vec

        torch.set_flush_denormal(True)
        from .embeddings import claim_compute, compute_of

        self.encoder = Llama2Vec.from_pretrained(model, backend=backend, batch_size=batch_size)
        self.job, self.batch_size = job, batch_size
        self.compute = compute_of(self.encoder)
        claim_compute(job, self.compute)  # an actor that computes otherwise than the folder's shards is refused

    def __call__(self, batch: dict) -> dict:
        import numpy as np

        counts = [encode_shard(self.encoder, self.job, int(s), self.batch_size, self.compute) for s in batch["shard"]]
        return {"shard": np.asarray(batch["shard"]), "count": np.asarray(counts)}


def encode_with_ray(model: str, source: Source, output: str | Path, what: str, backend: str = "torch",
                    shard_size: int = 1024, dtype: str = "float32", batch_size: int = 16, overwrite: bool = False,
                    actors: int | None = None, address: str | None = None, num_cpus: int | None = None) -> Path:
    try:
        import ray
    except ImportError:
        raise Llama2VecError("--engine ray needs Ray Data: pip install 'llama2vec[ray]'") from None
    from .encoder import model_spec

    path, spec = model_spec(model)
    kind = "passage" if what == "corpus" else "query"
    fp = encode_fingerprint(path, spec, backend, source, kind, shard_size, dtype)
    job = prepare(output, source, kind, dtype, fp, shard_size, overwrite)
    if job is None:
        return Path(output)
    pending = job.pending()
    if pending:
        started = not ray.is_initialized()
        if started:
            ray.init(address=address, num_cpus=num_cpus if address is None else None, include_dashboard=False,
                     log_to_driver=False, logging_level=logging.WARNING)
        try:
            gpus = int(ray.cluster_resources().get("GPU", 0))
            cpus = int(ray.cluster_resources().get("CPU", 1))
            n = actors or max(gpus, 1)
            per_actor = {"num_gpus": 1} if gpus else {"num_cpus": max(1, cpus // n)}
            log.info("encoding %d shards with %d Ray actors (%s each)", len(pending), n, per_actor)
            rows = ray.data.from_items([{"shard": s} for s in pending], override_num_blocks=len(pending))
            done = rows.map_batches(ShardEncoder, batch_size=1, concurrency=n,
                                    fn_constructor_kwargs={"model": path, "backend": backend,
                                                           "batch_size": batch_size, "job": job},
                                    **per_actor).take_all()
            log.info("Ray actors encoded %d texts", sum(int(r["count"]) for r in done))
        finally:
            if started:
                ray.shutdown()
    if not finish_if_complete(job):
        raise Llama2VecError(f"{job.output}: shards {job.pending()[:10]} were not written by the Ray actors")
    return job.output
