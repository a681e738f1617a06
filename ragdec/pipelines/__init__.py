"""Pipelines: Request/Chunk types, the Pipeline protocol, RAG and chat, the router, the
engines that answer (in process, or on a remote OpenAI-compatible server).

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
    "Pipeline": "types",
    "collect": "types",
    "AUTO": "types",
    "Router": "router",
    "RagPipeline": "rag",
    "RagSettings": "rag",
    "question_request": "rag",
    "ChatSession": "chat",
    "RequestError": "prompts",
    "Engine": "engine",
    "EngineError": "engine",
    "LocalEngine": "engine",
    "RemoteEngine": "remote",
    "RemoteSettings": "remote",
}

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
