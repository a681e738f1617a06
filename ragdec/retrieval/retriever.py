"""A store folder opened for search (and, by one process at a time, for writing).

Dense search embeds the question and asks the backend's vectors; BM25 asks its keyword
index (SQLite's FTS5 for FAISS stores, sparse vectors for Qdrant stores); hybrid fuses the
two candidate lists by reciprocal rank, here, alike for both. Every mode returns
``SearchHit``s carrying the passage text, ready to be references for a decoder. Where the
passages are searched is the backend's business (``backends``: FAISS in the folder, or a
Qdrant collection); the manifest says which.

Example::

    retriever = Retriever.open("~/notes.store")            # read only
    for hit in retriever.search("when was Tesla born?", k=3, mode="hybrid"):
        print(f"{hit.score:.3f}  {hit.title}: {hit.text[:80]}")
"""

from __future__ import annotations

import os
import shutil
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

from ragdec.files import durable_rename

from . import backends
from .embedder import DEFAULT_EMBEDDER, Embedder
from .fusion import reciprocal_rank_fusion
from .persistence import (
    FAISS_RECORD,
    Manifest,
    Settings,
    StoreError,
    WriterLock,
    check_embedder,
    open_documents,
    read_manifest,
    rebuild_hint,
    remove_stale_files,
    utc_now,
    write_manifest,
)
from .store import DocumentStore, Passage, content_hash

MODES = ("dense", "bm25", "hybrid")
HYBRID_CANDIDATES = 50  # taken from each of dense and BM25 before fusing


@dataclass(frozen=True)
class SearchHit:
    rank: int  # 1 for the best hit
    score: float  # cosine (dense), BM25 (bm25) or fused reciprocal-rank score (hybrid)
    passage: Passage  # the passage, text exactly as in its source

    @property
    def id(self) -> int:
        return self.passage.id

    @property
    def text(self) -> str:
        return self.passage.text

    @property
    def title(self) -> str:
        return self.passage.title


def embedding_text(title: str, text: str, embed_titles: bool) -> str:
    """What the embedder reads for a passage: its title on a line above it, when asked."""
    return f"{title}\n{text}" if embed_titles and title else text


class Retriever:
    """Search a store folder; ``open_for_writing`` also adds, deletes and saves."""

    def __init__(self, folder: Path, embedder: Embedder, backend: backends.StoreBackend,
                 manifest: Manifest | None, settings: Settings, lock: WriterLock | None = None):
        self.folder = folder
        self.embedder = embedder
        self.backend = backend  # where passages are searched (and, for a writer, published)
        self.manifest = manifest  # the last committed generation; None before the first save
        self.settings = settings
        self._lock = lock  # held while writable
        self.write_lock = threading.RLock()  # one writer thread at a time: ids are handed out in order

    @property
    def documents(self) -> DocumentStore | None:
        """The documents file: the writer's working copy (passages, the files they came
        from), or a FAISS reader's generation; None for a Qdrant reader."""
        return self.backend.documents

    # --- opening ---------------------------------------------------------------------

    @classmethod
    def open(cls, folder: str | Path, embedder: str | Embedder | None = None, nprobe: int | None = None) -> "Retriever":
        """Open a built store for search.

        Args:
            embedder: a model name or an ``Embedder``; default: the one the store was built with.
            nprobe: IVF cells read per query, overriding the stored value (FAISS IVF stores;
                others have no cells).

        Raises:
            FileNotFoundError: no store in ``folder``.
            StoreError: damaged files, another embedder, an unreachable Qdrant (the message
                says how to fix it).
        """
        folder = Path(folder).expanduser()
        manifest = read_manifest(folder) if folder.is_dir() else None
        if manifest is None:
            raise FileNotFoundError(f"no index in {folder}: build one with ragdec index build PATH... --store {folder}")
        # the backend before the embedder: an unreachable server is said at once, not after
        # a model has loaded
        for _ in range(3):  # a writer may commit, and delete our generation, while we load it
            try:
                backend = backends.open_reader(folder, manifest, nprobe)
                break
            except StoreError:
                latest = read_manifest(folder)
                if latest is None or latest.generation == manifest.generation:
                    raise
                manifest = latest
        else:
            raise StoreError(f"store {folder} changed three times while being opened; try again")
        try:
            embedder = _embedder(embedder, manifest)
            check_embedder(folder, manifest, embedder.info)
        except BaseException:
            backend.close()
            raise
        return cls(folder, embedder, backend, manifest, Settings(**manifest.settings))

    @classmethod
    def open_for_writing(
        cls,
        folder: str | Path,
        embedder: str | Embedder | None = None,
        settings: Settings | None = None,
        rebuild: bool = False,
        qdrant=None,
    ) -> "Retriever":
        """Open (or create) a store to add to; nothing is visible to readers until ``save``.

        Args:
            settings: index kind and chunking; default: the stored ones (or the defaults).
            rebuild: start from an empty store; the current one stays readable until save.
            qdrant: a ``QdrantTarget`` (or ``pgvector_store.PgvectorTarget``): keep the vectors and passages in its
                collection (a new store, or with ``rebuild``); default: where the store is
                (FAISS for a new one).

        Raises:
            StoreError: another process is writing, damaged files, another embedder, a
                backend that cannot be reached or changed without ``rebuild``.
        """
        folder = Path(folder).expanduser()
        folder.mkdir(parents=True, exist_ok=True)
        lock = WriterLock(folder)
        lock.acquire()
        try:
            manifest = read_manifest(folder)
            remove_stale_files(folder, manifest)
            record = _backend_record(folder, manifest, qdrant, rebuild)
            continuing = manifest is not None and not rebuild
            embedder = _embedder(embedder, manifest if continuing else None)
            if continuing:
                check_embedder(folder, manifest, embedder.info)
                settings = settings or Settings(**manifest.settings)
            settings = settings or Settings()
            backend = backends.open_writer(folder, manifest, record, embedder.info.dimension, rebuild)
            try:
                working = folder / f".documents.{_next_generation(manifest)}.sqlite.partial"
                working.unlink(missing_ok=True)
                if continuing:
                    documents = open_documents(folder, manifest)
                    documents.backup_to(working)
                    documents.close()
                backend.documents = DocumentStore.open(working)
            except BaseException:
                backend.close()
                raise
        except BaseException:
            lock.release()
            raise
        return cls(folder, embedder, backend, manifest, settings, lock)

    @property
    def writable(self) -> bool:
        return self._lock is not None

    def close(self) -> None:
        """Close files and let another writer in; unsaved changes are dropped."""
        working = self.documents.path if self.writable else None
        self.backend.close()
        if working is not None:
            working.unlink(missing_ok=True)
            self._lock.release()
            self._lock = None

    def __enter__(self) -> "Retriever":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __len__(self) -> int:
        return len(self.backend)

    # --- search ------------------------------------------------------------------------

    def search(self, query: str, k: int = 5, mode: str = "dense") -> list[SearchHit]:
        """The k passages that best answer ``query``, best first."""
        return self.search_batch([query], k, mode)[0]

    def search_batch(self, queries: Sequence[str], k: int = 5, mode: str = "dense",
                     candidates: int = HYBRID_CANDIDATES) -> list[list[SearchHit]]:
        """``search`` for many queries, embedding them in one batch.

        A writer on Qdrant searches what was saved; a writer on FAISS also what it added since.

        Args:
            mode: "dense" (E5 vectors), "bm25" (keywords) or "hybrid" (both, fused by
                reciprocal rank over ``candidates`` from each).
        """
        if mode not in MODES:
            raise ValueError(f"unknown search mode {mode!r}: choose one of {', '.join(MODES)}")
        if mode == "bm25":
            rankings = self.backend.keywords(queries, k)
        else:
            depth = k if mode == "dense" else max(k, candidates)
            dense = self.backend.dense(self.embedder.embed_queries(list(queries)), depth)
            if mode == "dense":
                rankings = dense
            else:
                rankings = [
                    reciprocal_rank_fusion([[i for i, _ in dense_ranking], [i for i, _ in keyword]], k)
                    for dense_ranking, keyword in zip(dense, self.backend.keywords(queries, depth))
                ]
        passages = self.backend.passages(sorted({i for ranking in rankings for i, _ in ranking}))
        return [
            [SearchHit(rank, score, passages[i]) for rank, (i, score) in enumerate(
                ((i, s) for i, s in ranking if i in passages), start=1)]
            for ranking in rankings
        ]

    # --- writing ------------------------------------------------------------------------

    def _require_writable(self) -> None:
        if not self.writable:
            raise StoreError(f"store {self.folder} is open for search only: use Retriever.open_for_writing")

    def embed_passages(self, titles: Sequence[str], texts: Sequence[str]):
        return self.embedder.embed_passages(
            [embedding_text(title, text, self.settings.embed_titles) for title, text in zip(titles, texts)]
        )

    def add_passages(self, passages: Sequence[Passage], vectors, links: Sequence[tuple[str, int]] = ()) -> None:
        """Store passages whose ids came from ``documents.next_id()`` with their vectors."""
        self._require_writable()
        self.documents.add(passages, links)
        self.backend.add(passages, vectors)

    def add_texts(self, texts: Sequence[str], titles: Sequence[str] | None = None, source: str = "api") -> list[int]:
        """Embed and add texts as passages (no chunking); a text already stored keeps its id.
        Returns the id of each text. Call ``save`` to publish."""
        self._require_writable()
        with self.write_lock:
            return self._add_texts(texts, titles, source)

    def _add_texts(self, texts: Sequence[str], titles: Sequence[str] | None, source: str) -> list[int]:
        titles = list(titles) if titles is not None else [""] * len(texts)
        hashes = [content_hash(t) for t in texts]
        known = self.documents.ids_by_hash(hashes)
        new: dict[str, Passage] = {}
        next_id = self.documents.next_id()
        for text, title, digest in zip(texts, titles, hashes):
            if digest not in known and digest not in new:
                new[digest] = Passage(next_id, text, title, source, "", 0, digest)
                next_id += 1
        fresh = list(new.values())
        ids = [known.get(h) or new[h].id for h in hashes]
        vectors = self.embed_passages([p.title for p in fresh], [p.text for p in fresh])
        self.add_passages(fresh, vectors, [(source, i) for i in dict.fromkeys(ids)])
        return ids

    def remove_source(self, path: str, keep_hashes: frozenset[str] = frozenset()) -> int:
        """Delete what one file (or ``add_texts`` source) contributed, except passages whose
        content hash is in ``keep_hashes``; returns how many passages were deleted."""
        self._require_writable()
        with self.write_lock:
            orphans = self.documents.forget_source(path, keep_hashes)
            self.backend.remove(orphans)
        return len(orphans)

    def save(self) -> Manifest:
        """Publish what was added and deleted as the next generation (see persistence)."""
        self._require_writable()
        with self.write_lock:
            return self._save()

    def _save(self) -> Manifest:
        index_record, backend_record = self.backend.describe(self.settings)
        passage_ids = self.documents.all_ids()
        generation = _next_generation(self.manifest)
        manifest = Manifest(
            format=self.backend.manifest_format,
            generation=generation,
            embedder=self.embedder.info.as_dict(),
            index=index_record,
            settings=asdict(self.settings),
            passages=len(passage_ids),
            updated_at=utc_now(),
            backend=backend_record,
        )
        working = self.documents.path
        self.documents.close()
        # 1. the new generation's documents file, under a name no manifest points to yet;
        # 2. the backend's part (FAISS: the index file; Qdrant: the collection), read back and
        #    checked, while the previous generation is still current
        durable_rename(working, self.folder / manifest.documents_file)
        try:
            self.backend.publish(self.folder, manifest, passage_ids)
        except StoreError:  # nothing committed: back to writing, as before the save
            os.replace(self.folder / manifest.documents_file, working)
            self.backend.documents = DocumentStore.open(working)
            raise
        # 3. the commit
        write_manifest(self.folder, manifest)
        # 4. only now the previous generation goes; then a working copy for further writes
        remove_stale_files(self.folder, manifest)
        self.manifest = manifest
        next_working = self.folder / f".documents.{generation + 1}.sqlite.partial"
        shutil.copyfile(self.folder / manifest.documents_file, next_working)
        self.backend.documents = DocumentStore.open(next_working)
        return manifest


def _embedder(embedder: str | Embedder | None, manifest: Manifest | None) -> Embedder:
    if isinstance(embedder, Embedder):
        return embedder
    if embedder is None:
        embedder = manifest.embedder["name"] if manifest else DEFAULT_EMBEDDER
    return Embedder(embedder)


def _next_generation(manifest: Manifest | None) -> int:
    return manifest.generation + 1 if manifest else 1


def _backend_record(folder: Path, manifest: Manifest | None, qdrant, rebuild: bool) -> dict:
    """Where a writer puts the store: the Qdrant target asked for, else where it is (FAISS
    for a new store). Moving a built store elsewhere takes a rebuild: its vectors stay where
    they are otherwise.

    Raises:
        StoreError: ``qdrant`` names another place than the store's, without ``rebuild``.
    """
    stored = manifest.backend if manifest else None
    if qdrant is None:
        return stored or dict(FAISS_RECORD)
    wanted = qdrant.record()
    if stored is None or rebuild:
        return wanted
    if all(stored.get(key) == value for key, value in wanted.items()):
        return stored  # the same place: keep what the store recorded there (BM25's avgdl)
    raise StoreError(
        f"store {folder} keeps its passages in the {backends.location(stored)}; to move them to the "
        f"{qdrant}, {rebuild_hint(folder)} {backends.flags(wanted)}"
    )
