"""Shared parts of the app tests: a small real store (all-minilm-l6-v2 over a few SQuAD
paragraphs of the shipped sample) and the smollm2 pipeline over it.

The fixtures are module-scoped: a test module imports them (``from app_fixtures import
pipeline, store``) and gets its own store and pipeline, built once for the module.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from retrieval_fixtures import sample_records, write_jsonl

STORE_QUESTION = "In what year was Nikola Tesla born?"


def build_store(folder: Path, embedder) -> Path:
    """A store of 14 paragraphs (2 per article) in ``folder``/docs.store, embedded by
    ``embedder`` (the ``minilm`` fixture)."""
    from ragdec.retrieval.ingest import build

    source = write_jsonl(folder / "sample.jsonl", sample_records(per_article=2))
    build([source], folder / "docs.store", embedder=embedder, progress=False)
    return folder / "docs.store"


@pytest.fixture(scope="module")
def store(tmp_path_factory, minilm):
    """The store of ``build_store``, open for search."""
    from ragdec.retrieval.retriever import Retriever

    with Retriever.open(build_store(tmp_path_factory.mktemp("store"), minilm), minilm) as retriever:
        yield retriever


@pytest.fixture(scope="module")
def pipeline(store, smollm2):
    """smollm2 (float32) answering over ``store``, one passage per question."""
    from ragdec.pipelines.rag import RagPipeline, RagSettings

    return RagPipeline(smollm2, store, settings=RagSettings(k=1))
