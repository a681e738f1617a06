"""Pipelines: Request/Chunk types, the Pipeline protocol, RAG and chat, the router.

Nothing heavy is imported here; each name loads its module on first use::

    from ragdec.pipelines import RagPipeline, Request, collect
"""

from __future__ import annotations

import importlib

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


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'ragdec.pipelines' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
