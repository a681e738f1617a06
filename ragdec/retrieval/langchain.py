"""LangChain ``Embeddings`` over ragdec's embedder (E5 prefixes included).

Imported on its own (``from ragdec.retrieval.langchain import RagdecEmbeddings``) so that
the rest of ragdec never loads langchain-core.

Example::

    from langchain_core.vectorstores import InMemoryVectorStore
    embeddings = RagdecEmbeddings()                    # multilingual-e5-small from the zoo
    store = InMemoryVectorStore.from_texts(["The Rhine begins in the Alps."], embeddings)
    store.similarity_search("where does the Rhine start?", k=1)
"""

from __future__ import annotations

try:
    from langchain_core.embeddings import Embeddings
except ImportError as error:  # pragma: no cover - a dependency of ragdec
    raise ImportError("langchain-core is not installed: pip install langchain-core==1.7.2") from error

from .embedder import DEFAULT_EMBEDDER, Embedder


class RagdecEmbeddings(Embeddings):
    """Documents embedded with the passage prefix, queries with the query prefix.

    Args:
        model: a zoo name, folder or hub id; or an ``Embedder`` to share one loaded model.
    """

    def __init__(self, model: str | Embedder = DEFAULT_EMBEDDER, batch_size: int = 32):
        self.embedder = model if isinstance(model, Embedder) else Embedder(model, batch_size=batch_size)

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        return self.embedder.embed_passages(texts).tolist()

    def embed_query(self, text: str) -> list[float]:
        return self.embedder.embed_queries([text])[0].tolist()
