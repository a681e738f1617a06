"""A store folder opened for search (and, by one process at a time, for writing).

Dense search embeds the question and asks the vector index; BM25 asks SQLite's FTS5;
hybrid fuses the two candidate lists by reciprocal rank. Every mode returns ``SearchHit``s
carrying the passage text, ready to be references for a decoder.

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

from .embedder import DEFAULT_EMBEDDER, Embedder
from .fusion import reciprocal_rank_fusion
from .index import IndexFileError, IndexSpec, VectorIndex, choose_spec
from .persistence import (
    FORMAT,
    Manifest,
    Settings,
    StoreError,
    WriterLock,
    check_embedder,
    read_manifest,
    rebuild_hint,
    remove_stale_files,
    utc_now,
    write_manifest,
)
from .store import DocumentStore, Passage, StoreFileError, content_hash

MODES = ("dense", "bm25", "hybrid")
HYBRID_CANDIDATES = 50  # taken from each of dense and BM25 before fusing
RETRAIN_GROWTH = 4  # retrain IVF cells once the index holds 4x what they were trained on


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

    def __init__(self, folder: Path, embedder: Embedder, index: VectorIndex, documents: DocumentStore,
                 manifest: Manifest | None, settings: Settings, lock: WriterLock | None = None):
        self.folder = folder
        self.embedder = embedder
        self.index = index
        self.documents = documents
        self.manifest = manifest  # the last committed generation; None before the first save
        self.settings = settings
        self._lock = lock  # held while writable
        self.write_lock = threading.RLock()  # one writer thread at a time: ids are handed out in order

    # --- opening ---------------------------------------------------------------------

    @classmethod
    def open(cls, folder: str | Path, embedder: str | Embedder | None = None, nprobe: int | None = None) -> "Retriever":
        """Open a built store for search.

        Args:
            embedder: a model name or an ``Embedder``; default: the one the store was built with.
            nprobe: IVF cells read per query, overriding the stored value.

        Raises:
            FileNotFoundError: no store in ``folder``.
            StoreError: damaged files or another embedder (the message says how to fix it).
        """
        folder = Path(folder).expanduser()
        manifest = read_manifest(folder) if folder.is_dir() else None
        if manifest is None:
            raise FileNotFoundError(f"no index in {folder}: build one with ragdec index build PATH... --store {folder}")
        embedder = _embedder(embedder, manifest)
        check_embedder(folder, manifest, embedder.info)
        for _ in range(3):  # a writer may commit, and delete our generation, while we load it
            try:
                index, documents = _load_generation(folder, manifest, readonly=True)
                break
            except StoreError:
                latest = read_manifest(folder)
                if latest is None or latest.generation == manifest.generation:
                    raise
                manifest = latest
        else:
            raise StoreError(f"store {folder} changed three times while being opened; try again")
        retriever = cls(folder, embedder, index, documents, manifest, Settings(**manifest.settings))
        if nprobe:
            index.set_nprobe(nprobe)
        return retriever

    @classmethod
    def open_for_writing(
        cls,
        folder: str | Path,
        embedder: str | Embedder | None = None,
        settings: Settings | None = None,
        rebuild: bool = False,
    ) -> "Retriever":
        """Open (or create) a store to add to; nothing is visible to readers until ``save``.

        Args:
            settings: index kind and chunking; default: the stored ones (or the defaults).
            rebuild: start from an empty store; the current one stays readable until save.

        Raises:
            StoreError: another process is writing, damaged files, another embedder.
        """
        folder = Path(folder).expanduser()
        folder.mkdir(parents=True, exist_ok=True)
        lock = WriterLock(folder)
        lock.acquire()
        try:
            manifest = read_manifest(folder)
            remove_stale_files(folder, manifest)
            if manifest is not None and not rebuild:
                embedder = _embedder(embedder, manifest)
                check_embedder(folder, manifest, embedder.info)
                index, documents = _load_generation(folder, manifest, readonly=True)
                settings = settings or Settings(**manifest.settings)
            else:
                embedder = _embedder(embedder, None)
                index, documents = VectorIndex.empty(embedder.info.dimension), None
                settings = settings or Settings()
            working = folder / f".documents.{_next_generation(manifest)}.sqlite.partial"
            working.unlink(missing_ok=True)
            if documents is not None:
                documents.backup_to(working)
                documents.close()
            documents = DocumentStore.open(working)
        except BaseException:
            lock.release()
            raise
        return cls(folder, embedder, index, documents, manifest, settings, lock)

    @property
    def writable(self) -> bool:
        return self._lock is not None

    def close(self) -> None:
        """Close files and let another writer in; unsaved changes are dropped."""
        working = self.documents.path if self.writable else None
        self.documents.close()
        if working is not None:
            working.unlink(missing_ok=True)
            self._lock.release()
            self._lock = None

    def __enter__(self) -> "Retriever":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __len__(self) -> int:
        return len(self.index)

    # --- search ------------------------------------------------------------------------

    def search(self, query: str, k: int = 5, mode: str = "dense") -> list[SearchHit]:
        """The k passages that best answer ``query``, best first."""
        return self.search_batch([query], k, mode)[0]

    def search_batch(self, queries: Sequence[str], k: int = 5, mode: str = "dense",
                     candidates: int = HYBRID_CANDIDATES) -> list[list[SearchHit]]:
        """``search`` for many queries, embedding them in one batch.

        Args:
            mode: "dense" (E5 vectors), "bm25" (FTS5 keywords) or "hybrid" (both, fused by
                reciprocal rank over ``candidates`` from each).
        """
        if mode not in MODES:
            raise ValueError(f"unknown search mode {mode!r}: choose one of {', '.join(MODES)}")
        rankings: list[list[tuple[int, float]]] = []
        if mode == "bm25":
            rankings = [self.documents.bm25(q, k) for q in queries]
        else:
            depth = k if mode == "dense" else max(k, candidates)
            scores, ids = self.index.search(self.embedder.embed_queries(list(queries)), depth)
            dense = [[(int(i), float(s)) for s, i in zip(row_s, row_i) if i >= 0] for row_s, row_i in zip(scores, ids)]
            if mode == "dense":
                rankings = dense
            else:
                for q, dense_ranking in zip(queries, dense):
                    keyword = self.documents.bm25(q, depth)
                    rankings.append(reciprocal_rank_fusion(
                        [[i for i, _ in dense_ranking], [i for i, _ in keyword]], k
                    ))
        passages = self.documents.get(sorted({i for ranking in rankings for i, _ in ranking}))
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
        self.index.add([p.id for p in passages], vectors)

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
            self.index.remove(orphans)
        return len(orphans)

    def _settle_index(self) -> None:
        """Switch index kind when the size calls for it (or the settings ask), retrain IVF
        cells that the corpus has outgrown, apply nprobe."""
        n = len(self.index)
        wanted = choose_spec(n, self.settings.index_kind, self.settings.nprobe)
        current = self.index.spec
        outgrown = current.kind == "ivf" and n > RETRAIN_GROWTH * max(current.trained_on, 1)
        if n and (wanted.kind != current.kind or outgrown):
            self.index = self.index.convert(wanted)
        elif current.kind == "ivf" and self.settings.nprobe:
            self.index.set_nprobe(self.settings.nprobe)

    def save(self) -> Manifest:
        """Publish what was added and deleted as the next generation (see persistence)."""
        self._require_writable()
        with self.write_lock:
            return self._save()

    def _save(self) -> Manifest:
        self._settle_index()
        if len(self.index) != len(self.documents):
            raise StoreError(
                f"index holds {len(self.index)} vectors but the documents {len(self.documents)} passages; "
                "nothing was saved"
            )
        generation = _next_generation(self.manifest)
        manifest = Manifest(
            format=FORMAT,
            generation=generation,
            embedder=self.embedder.info.as_dict(),
            index=self.index.spec.as_dict(),
            settings=asdict(self.settings),
            passages=len(self.index),
            updated_at=utc_now(),
        )
        working = self.documents.path
        self.documents.close()
        # 1. the new generation's files, under names no manifest points to yet
        self.index.save(self.folder / manifest.index_file)
        durable_rename(working, self.folder / manifest.documents_file)
        # 2. read back from disk and checked, while the previous generation is still current
        try:
            _check_generation(self.folder, manifest)
        except StoreError:  # nothing committed: back to writing, as before the save
            (self.folder / manifest.index_file).unlink(missing_ok=True)
            os.replace(self.folder / manifest.documents_file, working)
            self.documents = DocumentStore.open(working)
            raise
        # 3. the commit
        write_manifest(self.folder, manifest)
        # 4. only now the previous generation goes; then a working copy for further writes
        remove_stale_files(self.folder, manifest)
        self.manifest = manifest
        next_working = self.folder / f".documents.{generation + 1}.sqlite.partial"
        shutil.copyfile(self.folder / manifest.documents_file, next_working)
        self.documents = DocumentStore.open(next_working)
        return manifest


def _embedder(embedder: str | Embedder | None, manifest: Manifest | None) -> Embedder:
    if isinstance(embedder, Embedder):
        return embedder
    if embedder is None:
        embedder = manifest.embedder["name"] if manifest else DEFAULT_EMBEDDER
    return Embedder(embedder)


def _next_generation(manifest: Manifest | None) -> int:
    return manifest.generation + 1 if manifest else 1


def _check_generation(folder: Path, manifest: Manifest) -> None:
    """Open a generation's files as a reader will and check that the index holds a vector
    for exactly the passages the documents hold (ids, not only counts).

    Raises:
        StoreError: saying what differs; the caller does not commit.
    """
    index, documents = _load_generation(folder, manifest, readonly=True)
    try:
        vector_ids = sorted(int(i) for i in index.ids_and_vectors()[0])
        passage_ids = documents.all_ids()
    finally:
        documents.close()
    if vector_ids != passage_ids:
        missing = sorted(set(passage_ids) - set(vector_ids))[:5]
        extra = sorted(set(vector_ids) - set(passage_ids))[:5]
        raise StoreError(
            f"the new generation of {folder} read back inconsistent (passages without a vector: {missing}, "
            f"vectors without a passage: {extra}); nothing was committed, generation "
            f"{manifest.generation - 1} stays current"
        )


def _load_generation(folder: Path, manifest: Manifest, readonly: bool) -> tuple[VectorIndex, DocumentStore]:
    """The index and documents of the manifest's generation, checked against each other."""
    spec = IndexSpec(**manifest.index)
    dimension = manifest.embedder["dimension"]
    try:
        index = VectorIndex.load(folder / manifest.index_file, spec, dimension)
        documents = DocumentStore.open(folder / manifest.documents_file, readonly=readonly)
    except (IndexFileError, StoreFileError, FileNotFoundError) as error:
        raise StoreError(f"{error}; {rebuild_hint(folder)}") from None
    if not (len(index) == len(documents) == manifest.passages):
        documents.close()
        raise StoreError(
            f"store {folder} is inconsistent: manifest says {manifest.passages} passages, index holds "
            f"{len(index)}, documents {len(documents)}; {rebuild_hint(folder)}"
        )
    return index, documents
