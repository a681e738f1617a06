"""Shared parts of the app tests: a small real store (all-minilm-l6-v2 over a few SQuAD
paragraphs of the shipped sample) and the smollm2 pipeline over it."""

from __future__ import annotations

from pathlib import Path

from test_retrieval_fixtures import minilm, sample_records, write_jsonl

STORE_QUESTION = "In what year was Nikola Tesla born?"


def build_store(folder: Path) -> Path:
    """A store of 14 paragraphs (2 per article) in ``folder``/docs.store."""
    from ragdec.retrieval.ingest import build

    source = write_jsonl(folder / "sample.jsonl", sample_records(per_article=2))
    build([source], folder / "docs.store", embedder=minilm(), progress=False)
    return folder / "docs.store"
