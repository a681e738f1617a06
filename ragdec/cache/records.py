"""What crosses the store's seam: entries going in, entries coming out, statistics."""

from __future__ import annotations

from dataclasses import dataclass

HUMAN = "human"  # the model of curated answers (FAQ): valid whatever model answers now


@dataclass(frozen=True)
class EmbedderIdentity:
    name: str  # zoo name, folder or hub id
    version: str  # identifies the weights (``EmbedderInfo.version``)
    dimension: int  # vector length

    def as_dict(self) -> dict:
        return {"name": self.name, "version": self.version, "dimension": self.dimension}


@dataclass(frozen=True)
class NewEntry:
    question: str  # the user's question, not the assembled prompt
    answer: str
    model: str  # the answering model's id, or HUMAN
    store_version: str = ""  # the retrieval store's version (its generation); "" when none
    source: str = ""  # where a curated entry came from ("faq:stackfaq.jsonl#12")
    ttl_s: float | None = None  # seconds until it expires; None: never


@dataclass(frozen=True)
class Entry:
    id: int  # also the FAISS id
    question: str
    answer: str
    model: str
    store_version: str
    source: str
    created_at: float  # unix seconds
    last_used_at: float  # unix seconds
    hits: int  # times served
    expires_at: float | None  # unix seconds; None: never
    answer_hash: str  # equal answers, equal hashes

    def valid_for(self, model: str, store_version: str, now: float) -> bool:
        """Servable to ``model`` over ``store_version`` at ``now``: same model (or curated),
        same store version (or grounded on none), not expired."""
        return (
            self.model in (model, HUMAN)
            and self.store_version in (store_version, "")
            and (self.expires_at is None or self.expires_at > now)
        )


@dataclass(frozen=True)
class CacheStats:
    path: str
    entries: int
    expired: int  # entries past their TTL, not purged yet
    hits: int  # total times served
    by_model: dict  # model -> entries
    by_store_version: dict  # store version -> entries
    embedder: dict | None  # what made the vectors
    max_entries: int | None  # LRU size cap
    file_bytes: int  # database, WAL and shared-memory files together

    def as_dict(self) -> dict:
        return dict(self.__dict__)
