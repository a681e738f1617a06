"""Retrieval: E5 embedder, FAISS index or Qdrant collection, SQLite document store, ingestion.

Nothing heavy is imported here; each name loads its module on first use::

    from ragdec.retrieval import Retriever, build
    build(["docs/"], "docs.store")                       # ragdec index build docs/ --store docs.store
    Retriever.open("docs.store").search("how do I ...?", k=5, mode="hybrid")
    build(["docs/"], "shared.store", qdrant=QdrantTarget("http://qdrant:6333", "docs"))  # --qdrant URL
"""

from __future__ import annotations

from ragdec import lazy_exports

_EXPORTS = {
    "Embedder": "embedder",
    "EmbedderInfo": "embedder",
    "DEFAULT_EMBEDDER": "embedder",
    "VectorIndex": "index",
    "IndexSpec": "index",
    "DocumentStore": "store",
    "Passage": "store",
    "reciprocal_rank_fusion": "fusion",
    "chunk_text": "chunking",
    "Settings": "persistence",
    "StoreError": "persistence",
    "EmbedderMismatch": "persistence",
    "QdrantTarget": "qdrant_store",
    "PgvectorTarget": "pgvector_store",
    "Retriever": "retriever",
    "SearchHit": "retriever",
    "ingest": "ingest",
    "build": "ingest",
    "IngestReport": "ingest",
    "RagdecEmbeddings": "langchain",
}

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
