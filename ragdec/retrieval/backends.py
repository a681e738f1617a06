"""The seam between a store and where its passages are searched.

Three backends fill it:

- ``faiss``  (``faiss_store``): a FAISS index and the SQLite documents in the store folder;
  one machine, or copies of the folder.
- ``qdrant`` (``qdrant_store``): a Qdrant collection holding the vectors, the BM25 sparse
  vectors and the passages; every replica that can reach the server searches it.
- ``pgvector`` (``pgvector_store``): a PostgreSQL table holding the passages, their vectors
  under an HNSW index and a full-text index; the same database may hold the QA cache.

``Retriever`` does the rest alike for all: embedding, fusing dense and BM25 rankings,
the writer's lock, the documents file that records which files gave which passages, and
the manifest that commits a generation. The manifest's ``backend`` record names the backend
(``{"name": "qdrant", ...}``); ``backend_module`` finds the module that opens it.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import ClassVar, Protocol, Sequence

from .persistence import Manifest, Settings, StoreError, rebuild_hint
from .store import DocumentStore, Passage

Ranking = list[tuple[int, float]]  # (passage id, score), best first

_MODULES = {"faiss": "ragdec.retrieval.faiss_store", "qdrant": "ragdec.retrieval.qdrant_store",
            "pgvector": "ragdec.retrieval.pgvector_store"}
# the command-line flags that name a place, by backend: (flag, record key) pairs
_FLAGS = {"qdrant": (("--qdrant", "url"), ("--collection", "collection")),
          "pgvector": (("--pgvector", "url"), ("--table", "table"))}


class SearchBackend(Protocol):
    """Search a store's passages: what readers (and writers) ask of a backend."""

    # the documents file of the generation (readers of a FAISS store) or the writer's
    # working copy of it; None where searching needs no local file (a Qdrant reader)
    documents: DocumentStore | None

    def __len__(self) -> int:
        """Passages searchable (a writer: passages it will publish)."""

    def dense(self, vectors, k: int) -> list[Ranking]:
        """The k passages of highest inner product with each unit vector (float32 [q, d])."""

    def keywords(self, questions: Sequence[str], k: int) -> list[Ranking]:
        """The k passages of highest keyword score for each question (BM25; pgvector:
        PostgreSQL's ``ts_rank``)."""

    def passages(self, ids: Sequence[int]) -> dict[int, Passage]:
        """Passages by id; ids not stored are left out."""

    def close(self) -> None:
        """Close files and connections (the documents file included)."""


class BackendWriter(Protocol):
    """Publish a writer's changes: what ``Retriever.save`` asks of a backend."""

    manifest_format: int  # the manifest's ``format``: the oldest layout that reads this backend

    def add(self, passages: Sequence[Passage], vectors) -> None:
        """Take new passages and their vectors (float32 [n, d]); published by ``publish``."""

    def remove(self, ids: Sequence[int]) -> None:
        """Drop passages the documents file no longer holds."""

    def describe(self, settings: Settings) -> tuple[dict, dict]:
        """The manifest's ``index`` and ``backend`` records for the next generation (a
        FAISS index settles its kind here)."""

    def publish(self, folder: Path, manifest: Manifest, passage_ids: Sequence[int]) -> None:
        """Make the generation searchable and check that it holds exactly ``passage_ids``.

        Raises:
            StoreError: what differs; the caller does not commit the manifest.
        """


class StoreBackend(SearchBackend, BackendWriter, Protocol):
    """Both sides: what a backend module's ``open_reader`` and ``open_writer`` return."""


def passage_vectors(passages: Sequence[Passage], vectors, dimension: int):
    """``vectors`` as float32 [len(passages), dimension]: row i is passage i's, as ``add`` takes them.

    Raises:
        ValueError: they are not one ``dimension``-long vector a passage.
    """
    import numpy as np

    vectors = np.asarray(vectors, dtype=np.float32).reshape(len(passages), -1)
    if vectors.shape[1] != dimension:
        raise ValueError(f"vectors must be [n, {dimension}], got {list(vectors.shape)}")
    return vectors


def check_read_back(target, item: str, stored: set[int], wanted: set[int], folder: Path, undone: str = "") -> None:
    """Refuse a publish whose server read back other ids (``stored``) than the passages' (``wanted``).

    ``item`` is what holds a passage there ("row", "point"); ``undone`` says first what the
    refusal rolled back ("nothing was changed and ").

    Raises:
        StoreError: the counts and a few ids of each side, and how to rebuild the store.
    """
    if stored == wanted:
        return
    missing, extra = sorted(wanted - stored)[:5], sorted(stored - wanted)[:5]
    raise StoreError(
        f"{target} read back {len(stored)} {item}s for {len(wanted)} passages (passages without a {item}: "
        f"{missing}, {item}s without a passage: {extra}); {undone}the manifest of {folder} was not updated: "
        f"{rebuild_hint(folder)}"
    )


class ServerTarget:
    """Where a server backend keeps a store: the server's URL and the store's place there.

    A subclass is a frozen dataclass of two fields, ``url`` and the place (a Qdrant
    collection, a PostgreSQL table: the field ``place`` names), that says how a folder's name
    becomes a place's name (``place_for``) and the target in words (``__str__``).
    """

    backend: ClassVar[str]  # the name of the manifest's ``backend`` record: "qdrant", "pgvector"
    place: ClassVar[str]  # the field, and the record's key, that holds the place: "collection", "table"

    @classmethod
    def for_store(cls, url: str, folder: str | Path, name: str | None = None):
        """The target of ``--<backend> URL [--<place> NAME]`` for a store folder: the place
        ``name``, or by default one made of the folder's name (``place_for``)."""
        if name is None:
            name = cls.place_for(Path(folder).expanduser().resolve().name)
        return cls(url, name)

    @staticmethod
    def place_for(folder_name: str) -> str:
        """The place's default name for a store folder named ``folder_name``."""
        raise NotImplementedError

    @classmethod
    def from_record(cls, record: dict):
        return cls(record["url"], record[cls.place])

    @property
    def public_url(self) -> str:
        """The URL as the manifest keeps it (``url`` where it holds no secret)."""
        return self.url

    def record(self) -> dict:
        """The manifest's ``backend`` record (a writer may add its own keys)."""
        return {"name": self.backend, "url": self.public_url, self.place: getattr(self, self.place)}


def backend_module(record: dict):
    """The module of the backend a manifest's ``backend`` record names (imported now: FAISS
    or qdrant-client load only for the stores that use them)."""
    name = record.get("name")
    if name not in _MODULES:
        raise StoreError(f"unknown store backend {name!r}: this ragdec knows {', '.join(_MODULES)}; upgrade ragdec")
    return importlib.import_module(_MODULES[name])


def open_reader(folder: Path, manifest: Manifest, nprobe: int | None = None) -> StoreBackend:
    """The backend of a committed generation, for search (``nprobe``: IVF cells read per
    query, for a FAISS IVF index; no other backend has cells)."""
    return backend_module(manifest.backend).open_reader(folder, manifest, nprobe)


def open_writer(folder: Path, manifest: Manifest | None, record: dict, dimension: int, rebuild: bool) -> StoreBackend:
    """A backend to add to, at the place ``record`` names: continuing the committed
    generation of ``manifest``, or empty (a new store, ``manifest`` None, or a rebuild)."""
    return backend_module(record).open_writer(folder, manifest, record, dimension, rebuild)


def location(record: dict) -> str:
    """Where a store's vectors are, in words: "FAISS index in the folder", "Qdrant collection 'docs' at http://..."."""
    return backend_module(record).location(record)


def flags(record: dict) -> str:
    """The ``index build`` flags that put a store where ``record`` says ("" for FAISS).

    Example: ``flags({"name": "pgvector", "url": "postgresql://app@db/rag", "table": "docs"})``
    -> ``"--pgvector postgresql://app@db/rag --table docs"``.
    """
    return " ".join(f"{flag} {record[key]}" for flag, key in _FLAGS.get(record.get("name"), ()))
