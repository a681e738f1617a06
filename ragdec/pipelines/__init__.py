"""Pipelines: Request/Chunk types, the Pipeline protocol, RAG and chat, the router.

Nothing heavy is imported here; each name loads its module on first use::

    from ragdec.pipelines import RagPipeline, Request, collect
"""

from __future__ import annotations

from ragdec import lazy_exports

_EXPORTS = {
    "Request": "types",
    "Chunk": "types",
    "Source": "types",
    "AnswerInfo": "types",
    "Answer": "types",
    "Pipeline": "types",
    "collect": "types",
    "AUTO": "types",
    "Router": "router",
    "RagPipeline": "rag",
    "RagSettings": "rag",
    "question_request": "rag",
    "ChatSession": "chat",
    "RequestError": "prompts",
}

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
