"""The QA cache: answers kept in SQLite (or PostgreSQL, shared), found again by question.

One module per idea:

- ``normalize``: the exact-hit key (a question's normalized form and its hash).
- ``guard``: the checks that keep near-duplicates that differ in meaning from being served.
- ``store``: entries in a database (one transaction per write) mirrored in FAISS (``mirror``).
- ``backends``: what differs between SQLite (a file) and PostgreSQL (``postgres``, shared).
- ``errors``: the errors the user fixes, and URLs with their password masked.
- ``lookup``: ``QACache.lookup`` -> ``Lookup`` (exact | semantic | near | miss) under a ``Policy``.
- ``calibration``: thresholds from labelled pairs and FAQ paraphrases; the plot.
- ``faq``: importing FAQ files and answering from them, generating with near-hit references.
- ``langchain``: LangChain's ``BaseCache`` in the same database (exact, prompt + llm string).

Nothing heavy is imported here; each name loads its module on first use::

    from ragdec.cache import QACache
    cache = QACache.open("qa-cache.sqlite")        # or "postgresql://app@db.internal/qa_cache"
    cache.lookup("How do I rotate the logs?", model="qwen2.5-coder-0.5b-instruct")
"""

from __future__ import annotations

from ragdec import lazy_exports

_EXPORTS = {
    "QACache": "lookup",
    "Lookup": "lookup",
    "Policy": "lookup",
    "QAStore": "store",
    "NewEntry": "store",
    "Entry": "store",
    "CacheFileError": "errors",
    "CacheUnreachableError": "errors",
    "FaqService": "faq",
    "import_faq": "faq",
    "paraphrase_guard": "guard",
    "specifics_guard": "guard",
}

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
