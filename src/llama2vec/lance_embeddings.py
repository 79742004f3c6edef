"""A LanceDB embedding function for llama2vec models, registered as `llama2vec` on import:

    import llama2vec.lance_embeddings  # noqa: F401 (registers the function)
    from lancedb.embeddings import get_registry

    func = get_registry().get("llama2vec").create(name="runs/ft")

LanceDB then embeds a table's source column on insert with the passage prompt and a search's text with
the query prompt (`Llama2Vec.encode_corpus` / `encode_queries`: queries and documents kept apart).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from lancedb.embeddings import TextEmbeddingFunction, register


@lru_cache(maxsize=4)
def _model(name: str, device: str, backend: str, batch_size: int):
    from .encoder import Llama2Vec

    return Llama2Vec.from_pretrained(name, device=device, backend=backend, batch_size=batch_size)


@register("llama2vec")
class Llama2VecEmbeddings(TextEmbeddingFunction):
    """name: a llama2vec model folder, a causal LM (hub id or folder) or 'smollm2'; the model is loaded once
    per process."""

    name: str
    device: str = "cpu"
    backend: str = "torch"
    batch_size: int = 16

    @property
    def model(self):
        return _model(self.name, self.device, self.backend, self.batch_size)

    def ndims(self) -> int:
        return self.model.dim

    def compute_query_embeddings(self, query: str, *args, **kwargs) -> list[np.ndarray]:
        return list(self.model.encode_queries([query]))

    def generate_embeddings(self, texts, *args, **kwargs) -> list[np.ndarray]:
        return list(self.model.encode_corpus([str(t) for t in texts]))
