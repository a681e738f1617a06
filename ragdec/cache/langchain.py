"""LangChain ``BaseCache`` over the QA cache's database (its SQLite file or PostgreSQL).

LangChain keys its cache on the full prompt and the ``llm_string`` (the model and its
settings) and expects an exact cache: what it gets back must be what that model said to
that prompt. So this adapter stores exactly that, in the cache's ``llm_cache`` table, with
the same transaction discipline as the QA entries; semantic and near hits stay with
``QACache``, which keys on the user's question instead of the prompt.

Imported on its own so that the rest of ragdec never loads langchain-core.

Example::

    from langchain_core.globals import set_llm_cache
    set_llm_cache(RagdecLLMCache("qa-cache.sqlite"))         # or "postgresql://app@db/qa_cache"
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

try:
    from langchain_core.caches import BaseCache
    from langchain_core.load import dumps, loads
    from langchain_core.outputs import Generation
except ImportError as error:  # pragma: no cover - a dependency of ragdec
    raise ImportError("langchain-core is not installed: pip install langchain-core==1.7.2") from error

from .store import QAStore


class RagdecLLMCache(BaseCache):
    """Exact prompt + llm_string cache in a ragdec QA cache.

    Args:
        path: the cache file (created when missing), a ``postgresql://`` URL, or an open
            ``QAStore`` to share.
    """

    def __init__(self, path: str | Path | QAStore):
        self.store = path if isinstance(path, QAStore) else QAStore.open(path)

    def lookup(self, prompt: str, llm_string: str) -> Sequence[Generation] | None:
        payload = self.store.llm_get(prompt, llm_string)
        return None if payload is None else loads(payload, allowed_objects="core")  # generations and messages only

    def update(self, prompt: str, llm_string: str, return_val: Sequence[Generation]) -> None:
        self.store.llm_put(prompt, llm_string, dumps(list(return_val)))

    def clear(self, **kwargs: Any) -> None:
        """Forget every cached generation (the QA entries stay)."""
        self.store.llm_clear()
