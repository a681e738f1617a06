"""Shared parts of the app tests: a small real store (all-minilm-l6-v2 over a few SQuAD
paragraphs of the shipped sample) and the smollm2 pipeline over it."""

from __future__ import annotations

from pathlib import Path

from retrieval_fixtures import sample_records, write_jsonl

STORE_QUESTION = "In what year was Nikola Tesla born?"


def build_store(folder: Path, embedder) -> Path:
    """A store of 14 paragraphs (2 per article) in ``folder``/docs.store, embedded by
    ``embedder`` (the ``minilm`` fixture)."""
    from ragdec.retrieval.ingest import build

    source = write_jsonl(folder / "sample.jsonl", sample_records(per_article=2))
    build([source], folder / "docs.store", embedder=embedder, progress=False)
    return folder / "docs.store"
