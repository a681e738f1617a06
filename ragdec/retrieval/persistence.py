"""The store folder on disk: generations of (index, documents) published by one manifest.

A folder holds::

    manifest.json            which generation is current, the embedder, index kind, settings,
                             and the backend: FAISS in this folder, or a Qdrant collection
    index.<N>.faiss          the vectors of generation N (FAISS stores)
    documents.<N>.sqlite     the passages of generation N and the files they came from
    .lock                    held (flock) by the one process writing

A Qdrant store keeps its vectors and passages in the collection (``qdrant_store``), which
every replica searches; its folder keeps the manifest (all a reader needs) and the
documents file, the writer's record of which files gave which passages.

A writer builds generation N+1 beside N: it copies the documents into a working file, adds
and deletes there and in memory, then writes ``index.<N+1>.faiss`` and renames the working
file to ``documents.<N+1>.sqlite`` (each fsynced, see ``ragdec.files``), and opens them again
from disk to check that the index holds a vector for exactly the stored passages.
Rewriting ``manifest.json`` (a temp file renamed into place) is the commit: before it,
readers and a crashed writer's successor see generation N whole; after it, N+1.
Generation N is removed only after the commit, and files of other generations (a crashed
or refused save's) by the next writer.
"""

from __future__ import annotations

import fcntl
import json
import re
import time
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

from ragdec.files import write_json

from .store import DocumentStore, StoreFileError

MANIFEST = "manifest.json"
FORMAT = 2  # layout of the folder; bump when a reader of the old layout would misread it
FAISS_FORMAT = 1  # a FAISS store's folder is still format 1: older ragdecs read it as before
FAISS_RECORD = {"name": "faiss"}  # the backend of manifests that name none (written before Qdrant)
_GENERATION_FILE = re.compile(r"^(index\.\d+\.faiss|documents\.\d+\.sqlite)$")


class StoreError(ValueError):
    """A store folder that cannot be used as asked; the message says what to do."""


class EmbedderMismatch(StoreError):
    """The store's vectors come from another embedder than the one asked for."""


def rebuild_hint(folder: Path) -> str:
    return f"rebuild it: ragdec index build PATH... --store {folder} --rebuild"


@dataclass(frozen=True)
class Settings:
    index_kind: str = "auto"  # "auto" (flat, IVF from 50k passages), "flat" or "ivf"
    nprobe: int | None = None  # IVF cells read per query; None: nlist // 40
    chunk_tokens: int = 256  # passage length in embedder tokens (clamped to what it reads)
    overlap_tokens: int = 32  # tokens consecutive passages of a document share
    # embed "title\ntext"? On SQuAD (bench/retrieval.py) titles cost dense E5 about as much
    # recall@5 as they gained hybrid: off, so vectors stay those of the text a decoder
    # copies from
    embed_titles: bool = False


@dataclass(frozen=True)
class Manifest:
    format: int  # FORMAT when written
    generation: int  # names the current files; bumped by every save
    embedder: dict  # EmbedderInfo.as_dict() of the model that made the vectors
    index: dict  # IndexSpec.as_dict(): kind, nlist, nprobe, trained_on
    settings: dict  # Settings as a dict: what shaped the passages and vectors
    passages: int  # rows in documents and vectors in the index
    updated_at: str  # UTC, ISO 8601
    # where the vectors live and how to reach them: {"name": "faiss"}, or {"name": "qdrant",
    # "url", "collection", "bm25_avgdl"} (see qdrant_store); never a secret such as an API key
    backend: dict = field(default_factory=lambda: dict(FAISS_RECORD))

    @property
    def index_file(self) -> str:
        return f"index.{self.generation}.faiss"

    @property
    def documents_file(self) -> str:
        return f"documents.{self.generation}.sqlite"


def read_manifest(folder: Path) -> Manifest | None:
    """The folder's manifest, or None when the folder holds no store yet.

    Raises:
        StoreError: the manifest is damaged or from a newer ragdec.
    """
    path = folder / MANIFEST
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        required = [f.name for f in fields(Manifest) if f.default is MISSING and f.default_factory is MISSING]
        manifest = Manifest(**{name: data[name] for name in required},
                            **{f.name: data[f.name] for f in fields(Manifest) if f.name not in required and f.name in data})
    except (ValueError, KeyError, TypeError) as error:
        raise StoreError(f"{path} is damaged ({error}); {rebuild_hint(folder)}") from None
    if manifest.format > FORMAT:
        raise StoreError(f"{folder} was written by a newer ragdec (format {manifest.format}); upgrade ragdec")
    return manifest


def check_counts(folder: Path, manifest: Manifest, **held: int) -> None:
    """Refuse a generation whose files hold another number of passages than its manifest.

    Example: ``check_counts(folder, manifest, index=41, documents=40)`` with 41 passages in
    the manifest raises "store ... is inconsistent: manifest says 41 passages, files hold
    index 41, documents 40; rebuild it: ...".
    """
    if all(count == manifest.passages for count in held.values()):
        return
    counts = ", ".join(f"{name} {count}" for name, count in held.items())
    raise StoreError(f"store {folder} is inconsistent: manifest says {manifest.passages} passages, "
                     f"files hold {counts}; {rebuild_hint(folder)}")


def open_documents(folder: Path, manifest: Manifest) -> DocumentStore:
    """The documents file of the manifest's generation, read only, its count checked.

    Raises:
        StoreError: missing (a folder copied with its manifest alone), damaged, inconsistent.
    """
    path = folder / manifest.documents_file
    if not path.is_file():
        raise StoreError(
            f"{path} is missing (a Qdrant store's folder holding only its manifest can be searched, "
            f"not added to: build from the folder the store was built in); or {rebuild_hint(folder)}"
        )
    try:
        documents = DocumentStore.open(path, readonly=True)
    except StoreFileError as error:
        raise StoreError(f"{error}; {rebuild_hint(folder)}") from None
    try:
        check_counts(folder, manifest, documents=len(documents))
    except StoreError:
        documents.close()
        raise
    return documents


def write_manifest(folder: Path, manifest: Manifest) -> None:
    """Commit a generation: the manifest, written atomically (temp file, fsync, rename)."""
    write_json(asdict(manifest), folder / MANIFEST)


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def check_embedder(folder: Path, manifest: Manifest, info) -> None:
    """Refuse an embedder whose vectors are not comparable with the stored ones.

    The name may differ (a zoo name and its prepared folder are the same weights); the
    weights' version and the dimension may not.
    """
    stored = manifest.embedder
    if stored["version"] == info.version and stored["dimension"] == info.dimension:
        return
    raise EmbedderMismatch(
        f"store {folder} was built with embedder {stored['name']!r} ({stored['dimension']} dimensions, "
        f"{stored['version']}), not {info.name!r} ({info.dimension} dimensions, {info.version}): "
        f"search it with --model {stored['name']} (or leave --model out), or {rebuild_hint(folder)} --model {info.name}"
    )


def remove_stale_files(folder: Path, keep: Manifest | None) -> None:
    """Delete files of generations other than ``keep``'s, and leftovers of crashed writes."""
    current = {keep.index_file, keep.documents_file} if keep else set()
    for path in folder.iterdir():
        stale_generation = _GENERATION_FILE.match(path.name) and path.name not in current
        leftover = path.name.startswith(".") and path.name.endswith((".tmp", ".partial", ".partial-journal"))
        if stale_generation or leftover:
            path.unlink(missing_ok=True)


class WriterLock:
    """An exclusive ``flock`` on ``folder/.lock`` while one process writes the store."""

    def __init__(self, folder: Path):
        self.path = folder / ".lock"
        self._file = None

    def acquire(self) -> None:
        self._file = open(self.path, "a+")
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.close()
            self._file = None
            raise StoreError(
                f"store {self.path.parent} is being written by another process; wait for it to finish"
            ) from None

    def release(self) -> None:
        if self._file is not None:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None
