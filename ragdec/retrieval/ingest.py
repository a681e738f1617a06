"""Ingestion: files -> documents -> passages -> vectors, incrementally, with a progress bar.

1. discover: the supported files under the given paths;
2. compare: a file whose SHA-256 matches the one recorded at its last ingestion is skipped;
   a changed file first has its old passages removed;
3. read and chunk: each document cut into windows of embedder tokens (``chunking``); a file
   that cannot be read (gone, unreadable, over the size cap, not text, failing to parse) is
   skipped with a warning naming it and why, and the run goes on;
4. de-duplicate: a passage whose normalized text is stored already (from any file, or
   earlier in this run) is linked to the file, not embedded again;
5. embed and add, in batches, the progress bar counting passages per second;
6. record each file (size, mtime, SHA-256) once its passages are in.

Nothing is visible to readers until the caller's ``Retriever.save()``.
"""

from __future__ import annotations

import hashlib
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

from .chunking import Chunk, chunk_text
from .readers import Document, ReadOptions, SkippedFile, check_file, discover, read_documents
from .retriever import Retriever
from .store import Passage, SourceFile, content_hash

EMBED_BATCH = 256  # passages embedded and stored per step: one transaction, one progress tick


@dataclass(frozen=True)
class IngestReport:
    files_indexed: int  # new or changed files read
    files_unchanged: int  # skipped: same SHA-256 as when last ingested
    files_skipped: tuple[tuple[str, str], ...]  # (path, reason) of files that yielded nothing
    files_removed: int  # vanished files forgotten (with prune)
    passages_added: int  # new passages embedded
    passages_removed: int  # passages deleted because their file changed or vanished
    duplicates: int  # chunks found stored already, linked instead of embedded
    embed_seconds: float  # time spent embedding and adding
    seconds: float  # whole run

    @property
    def changed(self) -> bool:
        """Whether the store differs from before the run (else saving is pointless)."""
        return bool(self.files_indexed or self.files_removed or self.passages_added or self.passages_removed)

    @property
    def passages_per_s(self) -> float:
        return self.passages_added / self.embed_seconds if self.embed_seconds > 0 else 0.0

    def summary(self) -> str:
        parts = [
            f"{self.passages_added} passages added from {self.files_indexed} files "
            f"in {self.seconds:.1f} s ({self.passages_per_s:.1f} passages/s embedding)",
        ]
        if self.files_unchanged:
            parts.append(f"{self.files_unchanged} files unchanged")
        if self.duplicates:
            parts.append(f"{self.duplicates} duplicate chunks linked, not re-embedded")
        if self.passages_removed:
            parts.append(f"{self.passages_removed} stale passages removed")
        if self.files_removed:
            parts.append(f"{self.files_removed} vanished files forgotten")
        if self.files_skipped:
            parts.append(f"{len(self.files_skipped)} files skipped")
        return "; ".join(parts)


@dataclass
class _Pending:
    """Chunks read but not yet embedded, the ids they take, and the files waiting on them."""

    next_id: int  # the id the next new passage takes
    passages: list[Passage] = field(default_factory=list)
    links: list[tuple[str, int]] = field(default_factory=list)  # (file path, passage id)
    files: list[SourceFile] = field(default_factory=list)
    ids_by_hash: dict[str, int] = field(default_factory=dict)  # content hash -> id, this run's new passages


@dataclass
class _Tally:
    """What a run counts as it goes, for its report."""

    warn: Callable[[str], None]  # one line per skipped file or part of a file
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    unchanged: int = 0  # files with the SHA-256 recorded at their last ingestion
    duplicates: int = 0  # chunks stored already, linked instead of embedded
    passages_removed: int = 0  # of changed or vanished files
    files_removed: int = 0  # vanished files forgotten

    def skip(self, path, reason) -> None:
        self.skipped.append((str(path), str(reason)))
        self.warn(f"skipped {path}: {reason}")


@dataclass(frozen=True)
class _ReadFile:
    """A new or changed file, read and cut into chunks."""

    source: SourceFile  # its record (size, mtime, SHA-256, chunk count), kept once its passages are in
    chunks: list[tuple[Document, Chunk]]  # each chunk with the document it was cut from
    hashes: list[str]  # content_hash of each chunk's text
    notes: list[str]  # what went wrong in parts of the file (a bad JSONL line, ...)


def _warn(message: str) -> None:
    from tqdm import tqdm

    tqdm.write(f"warning: {message}", file=sys.stderr)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _chunk_budget(retriever: Retriever) -> int:
    """Chunk length in tokens: the setting, capped at what the model reads after its prefix
    and special tokens (and the title line, when titles are embedded: ~16 tokens kept free)."""
    room = retriever.embedder.info.max_tokens - retriever.embedder.prefix_tokens()
    if retriever.settings.embed_titles:
        room -= 16
    return max(16, min(retriever.settings.chunk_tokens, room))


def ingest(
    retriever: Retriever,
    paths: Iterable[str | Path],
    read_options: ReadOptions = ReadOptions(),
    progress: bool = True,
    prune: bool = False,
    warn: Callable[[str], None] = _warn,
) -> IngestReport:
    """Add the files under ``paths`` to a writable retriever (see the module's steps).

    Args:
        prune: forget files recorded earlier under these folders that no longer exist.
        warn: receives one line per skipped file or part of a file.

    Raises:
        FileNotFoundError: a path does not exist (before anything is changed).
    """
    with retriever.write_lock:
        return _ingest(retriever, paths, read_options, progress, prune, warn)


def _ingest(retriever, paths, read_options, progress, prune, warn) -> IngestReport:
    started = time.perf_counter()
    paths = [Path(p).expanduser() for p in paths]
    tally = _Tally(warn)
    # 1: discover
    files, left_out = discover(paths)
    for path, reason in left_out:
        tally.skip(path, reason)
    if prune:
        _prune(retriever, paths, tally)
    # 2-4: compare, read, chunk, de-duplicate
    pending = _read_files(retriever, files, read_options, progress, tally)
    # 5: embed and add
    embed_started = time.perf_counter()
    _embed_and_add(retriever, pending.passages, progress)
    embed_seconds = time.perf_counter() - embed_started
    # 6: links and file records, once every passage they point to is in
    store = retriever.documents
    store.add([], pending.links)
    for source in pending.files:
        store.record_source(source)
    return IngestReport(
        files_indexed=len(pending.files),
        files_unchanged=tally.unchanged,
        files_skipped=tuple(tally.skipped),
        files_removed=tally.files_removed,
        passages_added=len(pending.passages),
        passages_removed=tally.passages_removed,
        duplicates=tally.duplicates,
        embed_seconds=embed_seconds,
        seconds=time.perf_counter() - started,
    )


def _prune(retriever: Retriever, paths: list[Path], tally: _Tally) -> None:
    """Forget the files recorded under the folders among ``paths`` that no longer exist."""
    roots = [p.resolve() for p in paths if p.is_dir()]
    for source in retriever.documents.sources():
        under = any(Path(source.path).is_relative_to(root) for root in roots)
        if under and not Path(source.path).exists():
            tally.passages_removed += retriever.remove_source(source.path)
            tally.files_removed += 1


def _read_files(retriever: Retriever, files: list[Path], read_options: ReadOptions, progress: bool,
                tally: _Tally) -> _Pending:
    """Steps 2-4 over every file: the chunks to embed, and the links of those stored already."""
    from tqdm import tqdm

    store = retriever.documents
    chunk_tokens = _chunk_budget(retriever)
    overlap = min(retriever.settings.overlap_tokens, chunk_tokens // 2)
    pending = _Pending(next_id=store.next_id())
    for path in tqdm(files, desc="reading", unit="file", disable=not progress or len(files) < 2, leave=False):
        known = store.source(str(path))
        try:
            read = _read_if_changed(path, known, read_options, retriever.embedder.tokenizer, chunk_tokens, overlap)
        except SkippedFile as reason:
            tally.skip(path, reason)
            continue
        except OSError as error:  # gone or locked between the listing and the read
            tally.skip(path, f"cannot read ({error.strerror or error})")
            continue
        except Exception as error:  # whatever one file's content does, the run goes on without it
            tally.skip(path, f"cannot be read ({type(error).__name__}: {str(error)[:200]})")
            continue
        if read is None:
            tally.unchanged += 1
            continue
        for note in read.notes:
            tally.warn(f"{path}: {note}")
        if known is not None:  # changed: drop what it no longer holds, keep what it still does
            tally.passages_removed += retriever.remove_source(str(path), frozenset(read.hashes))
        tally.duplicates += _queue_or_link(store, read, pending)
    return pending


def _read_if_changed(path: Path, known: SourceFile | None, read_options: ReadOptions, tokenizer, chunk_tokens: int,
                     overlap: int) -> _ReadFile | None:
    """Steps 2-3 for one file: None if its SHA-256 is the one ``known`` recorded, else its chunks.

    Raises:
        SkippedFile, OSError, or whatever parsing the file raises: the caller skips the file.
    """
    stat = check_file(path, read_options)
    digest = file_sha256(path)
    if known is not None and known.sha256 == digest:
        return None
    documents, notes = read_documents(path, read_options)
    chunks = [
        (document, chunk)
        for document in documents
        for chunk in chunk_text(document.text, tokenizer, chunk_tokens, overlap)
    ]
    hashes = [content_hash(chunk.text) for _, chunk in chunks]
    return _ReadFile(SourceFile(str(path), stat.st_size, stat.st_mtime_ns, digest, len(chunks)), chunks, hashes, notes)


def _queue_or_link(store, read: _ReadFile, pending: _Pending) -> int:
    """Step 4 for one file: a chunk new to the store and to this run is queued to be embedded
    under a new id; one seen already is linked to the file. Returns how many were seen.

    Example: chunks with hashes [h1, h2, h1], h2 stored as passage 7, next id 40: h1 is
    queued as 40, 7 is linked now, the second h1 is linked to 40 once 40 is in; 2 seen.
    """
    path = read.source.path
    stored = store.ids_by_hash(read.hashes)
    stored_links: dict[int, None] = {}  # linked now, so a later changed file cannot orphan them
    seen = 0
    for (document, chunk), digest in zip(read.chunks, read.hashes):
        passage_id = stored.get(digest) or pending.ids_by_hash.get(digest)
        if passage_id is None:
            passage_id = pending.next_id
            pending.next_id += 1
            pending.ids_by_hash[digest] = passage_id
            pending.passages.append(Passage(
                passage_id, chunk.text, document.title, path, document.record, chunk.position, digest
            ))
            pending.links.append((path, passage_id))
        else:
            seen += 1
            if digest in stored:
                stored_links[passage_id] = None
            else:
                pending.links.append((path, passage_id))
    store.add([], [(path, pid) for pid in stored_links])
    pending.files.append(read.source)
    return seen


def _embed_and_add(retriever: Retriever, passages: list[Passage], progress: bool) -> None:
    """Step 5: embed and add, one transaction per batch of EMBED_BATCH."""
    from tqdm import tqdm

    bar = tqdm(total=len(passages), desc="embedding", unit="passage", disable=not progress, smoothing=0.1)
    try:
        for start in range(0, len(passages), EMBED_BATCH):
            batch = passages[start : start + EMBED_BATCH]
            vectors = retriever.embed_passages([p.title for p in batch], [p.text for p in batch])
            retriever.add_passages(batch, vectors)
            bar.update(len(batch))
    finally:
        bar.close()


def build(paths: Sequence[str | Path], store: str | Path, embedder=None, settings=None, rebuild: bool = False,
          read_options: ReadOptions = ReadOptions(), progress: bool = True, prune: bool = False,
          qdrant=None) -> IngestReport:
    """Open (or create) the store folder, ingest ``paths``, save: what ``ragdec index build`` does.

    ``qdrant``: a ``qdrant_store.QdrantTarget`` to keep the passages in (see ``Retriever.open_for_writing``).
    """
    with Retriever.open_for_writing(store, embedder, settings, rebuild=rebuild, qdrant=qdrant) as retriever:
        report = ingest(retriever, paths, read_options, progress=progress, prune=prune)
        settings_changed = retriever.manifest is None or asdict(retriever.settings) != retriever.manifest.settings
        if report.changed or rebuild or settings_changed:
            retriever.save()
    return report
