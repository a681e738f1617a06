"""Fixtures shared by the QA cache's tests that embed with a real model.

Imported by those modules (``from cache_fixtures import cache, embedder``); pytest finds a
fixture by the name it has in the test module. ``qa_location`` (conftest) gives each test
a SQLite file and, where a PostgreSQL server runs, a database.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from ragdec.cache.lookup import QACache
from ragdec.cache.store import EmbedderIdentity, QAStore

DATA = Path(__file__).parent / "data"  # small samples of the benchmark data


@pytest.fixture(scope="module")
def embedder(minilm):
    """The fallback embedder from the zoo (all-minilm-l6-v2): real vectors, loaded once."""
    return minilm


@pytest.fixture
def cache(qa_location, embedder):
    """An empty cache on each backend: SQLite, PostgreSQL."""
    info = embedder.info
    store = QAStore.open(qa_location, EmbedderIdentity(info.name, info.version, info.dimension))
    yield QACache(store, embedder)
    store.close()
