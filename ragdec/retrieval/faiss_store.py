"""The FAISS backend: vectors in ``index.<N>.faiss``, passages and BM25 in ``documents.<N>.sqlite``.

Everything a search needs is in the store folder: a reader opens both files of the
manifest's generation; a writer holds the index in memory and publishes it as the next
generation's index file beside the documents file (see ``persistence``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Sequence

from .index import IndexFileError, IndexSpec, VectorIndex, choose_spec
from .persistence import (
    FAISS_FORMAT,
    FAISS_RECORD,
    Manifest,
    Settings,
    StoreError,
    check_counts,
    open_documents,
    rebuild_hint,
)
from .store import DocumentStore, Passage

RETRAIN_GROWTH = 4  # retrain IVF cells once the index holds 4x what they were trained on


@dataclass
class FaissBackend:
    """A FAISS index searched with the documents file beside it."""

    index: VectorIndex
    documents: DocumentStore | None
    manifest_format: ClassVar[int] = FAISS_FORMAT

    def __len__(self) -> int:
        return len(self.index)

    def dense(self, vectors, k: int) -> list[list[tuple[int, float]]]:
        scores, ids = self.index.search(vectors, k)
        return [[(int(i), float(s)) for s, i in zip(row_s, row_i) if i >= 0] for row_s, row_i in zip(scores, ids)]

    def keywords(self, questions: Sequence[str], k: int) -> list[list[tuple[int, float]]]:
        return [self.documents.bm25(question, k) for question in questions]

    def passages(self, ids: Sequence[int]) -> dict[int, Passage]:
        return self.documents.get(ids)

    def close(self) -> None:
        if self.documents is not None:
            self.documents.close()

    # --- writing ----------------------------------------------------------------------

    def add(self, passages: Sequence[Passage], vectors) -> None:
        self.index.add([p.id for p in passages], vectors)

    def remove(self, ids: Sequence[int]) -> None:
        self.index.remove(ids)

    def describe(self, settings: Settings) -> tuple[dict, dict]:
        self._settle_index(settings)
        return self.index.spec.as_dict(), dict(FAISS_RECORD)

    def _settle_index(self, settings: Settings) -> None:
        """Switch index kind when the size calls for it (or the settings ask), retrain IVF
        cells that the corpus has outgrown, apply nprobe."""
        n = len(self.index)
        wanted = choose_spec(n, settings.index_kind, settings.nprobe)
        current = self.index.spec
        outgrown = current.kind == "ivf" and n > RETRAIN_GROWTH * max(current.trained_on, 1)
        if n and (wanted.kind != current.kind or outgrown):
            self.index = self.index.convert(wanted)
        elif current.kind == "ivf" and settings.nprobe:
            self.index.set_nprobe(settings.nprobe)

    def publish(self, folder: Path, manifest: Manifest, passage_ids: Sequence[int]) -> None:
        """Write the index file of the generation and read it back with the documents file."""
        if len(self.index) != len(passage_ids):
            raise StoreError(
                f"index holds {len(self.index)} vectors but the documents {len(passage_ids)} passages; "
                "nothing was saved"
            )
        self.index.save(folder / manifest.index_file)
        try:
            _check_generation(folder, manifest)
        except StoreError:
            (folder / manifest.index_file).unlink(missing_ok=True)
            raise


def location(record: dict) -> str:
    return "FAISS index in the store folder"


def open_reader(folder: Path, manifest: Manifest, nprobe: int | None = None) -> FaissBackend:
    """Both files of the manifest's generation, checked against each other; ``nprobe``
    overrides the stored one of an IVF index."""
    backend = _load_generation(folder, manifest)
    if nprobe:
        backend.index.set_nprobe(nprobe)
    return backend


def open_writer(folder: Path, manifest: Manifest | None, record: dict, dimension: int, rebuild: bool) -> FaissBackend:
    """The generation's index in memory (an empty one for a new store or a rebuild); the
    writer's documents are attached by the caller."""
    if manifest is None or rebuild:
        return FaissBackend(VectorIndex.empty(dimension), None)
    index = _load_index(folder, manifest)
    check_counts(folder, manifest, index=len(index))
    return FaissBackend(index, None)


def _load_index(folder: Path, manifest: Manifest) -> VectorIndex:
    try:
        return VectorIndex.load(folder / manifest.index_file, IndexSpec(**manifest.index), manifest.embedder["dimension"])
    except (IndexFileError, FileNotFoundError) as error:
        raise StoreError(f"{error}; {rebuild_hint(folder)}") from None


def _load_generation(folder: Path, manifest: Manifest) -> FaissBackend:
    """The index and documents of the manifest's generation, checked against each other."""
    index = _load_index(folder, manifest)
    check_counts(folder, manifest, index=len(index))
    return FaissBackend(index, open_documents(folder, manifest))


def _check_generation(folder: Path, manifest: Manifest) -> None:
    """Open a generation's files as a reader will and check that the index holds a vector
    for exactly the passages the documents hold (ids, not only counts).

    Raises:
        StoreError: saying what differs; the caller does not commit.
    """
    backend = _load_generation(folder, manifest)
    try:
        vector_ids = sorted(int(i) for i in backend.index.ids_and_vectors()[0])
        passage_ids = backend.documents.all_ids()
    finally:
        backend.close()
    if vector_ids != passage_ids:
        missing = sorted(set(passage_ids) - set(vector_ids))[:5]
        extra = sorted(set(vector_ids) - set(passage_ids))[:5]
        raise StoreError(
            f"the new generation of {folder} read back inconsistent (passages without a vector: {missing}, "
            f"vectors without a passage: {extra}); nothing was committed, generation "
            f"{manifest.generation - 1} stays current"
        )
