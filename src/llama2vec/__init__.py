"""llama2vec: turn a decoder-only LLM into a dense retriever with Llama2Vec adaptation.

    from llama2vec import Llama2Vec
    model = Llama2Vec.from_pretrained("runs/ft")
"""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"
__all__ = ["Llama2Vec", "__version__"]

if TYPE_CHECKING:
    from .encoder import Llama2Vec


def __getattr__(name: str):
    if name == "Llama2Vec":  # imported on first use: the command line starts without torch
        from .encoder import Llama2Vec

        return Llama2Vec
    raise AttributeError(f"module 'llama2vec' has no attribute {name!r}")
