"""Data files shipped with ragdec: the quick-start sample corpus (see ATTRIBUTION.md)."""

from __future__ import annotations

from pathlib import Path


def sample_corpus_path() -> Path:
    """The 350 SQuAD v1.1 dev paragraphs of the quick start (JSON Lines, a ``text`` field)."""
    return Path(__file__).resolve().parent / "squad_sample.jsonl"
