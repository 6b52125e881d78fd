"""Sentence embeddings with EmbeddingGemma (and EmbeddingGemma 2): `load_embedder(dir).embed(texts)`.

model.py runs EmbeddingGemma's encoder (gemmakit's Gemma 3 backbone with a bidirectional mask, then the
sentence-transformers pooling and dense head); gemma2.py runs EmbeddingGemma 2's; embedder.py wraps either with
tokenisation, task prompts, batching, Matryoshka truncation and normalisation; command.py is `gemmakit embed`,
and serve/embeddings.py is `POST /v1/embeddings`.
"""

from gemmakit.embeddings.embedder import (
    Embedder,
    EmbeddingError,
    InputTooLong,
    is_embedding_model,
    load_embedder,
)

__all__ = ["Embedder", "EmbeddingError", "InputTooLong", "is_embedding_model", "load_embedder"]
