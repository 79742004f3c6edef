"""llama2vec: turn a decoder-only LLM into a dense retriever with Llama2Vec adaptation."""

__version__ = "0.1.0"
