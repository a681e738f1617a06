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

from .chunking import chunk_text
from .readers import ReadOptions, SkippedFile, check_file, discover, read_documents
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
    """Chunks read but not yet embedded, and the files waiting on them."""

    passages: list[Passage] = field(default_factory=list)
    links: list[tuple[str, int]] = field(default_factory=list)
    files: list[SourceFile] = field(default_factory=list)


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
    from tqdm import tqdm

    started = time.perf_counter()
    paths = [Path(p).expanduser() for p in paths]
    files, left_out = discover(paths)
    skipped: list[tuple[str, str]] = []

    def skip(path, reason) -> None:
        skipped.append((str(path), str(reason)))
        warn(f"skipped {path}: {reason}")

    for path, reason in left_out:
        skip(path, reason)
    store = retriever.documents
    removed_passages = files_removed = 0
    if prune:
        roots = [p.resolve() for p in paths if p.is_dir()]
        for source in store.sources():
            under = any(Path(source.path).is_relative_to(root) for root in roots)
            if under and not Path(source.path).exists():
                removed_passages += retriever.remove_source(source.path)
                files_removed += 1

    # 2-4: compare, read, chunk, de-duplicate
    pending = _Pending()
    unchanged = 0
    chunk_tokens = _chunk_budget(retriever)
    overlap = min(retriever.settings.overlap_tokens, chunk_tokens // 2)
    tokenizer = retriever.embedder.tokenizer
    next_id = store.next_id()
    hashes_this_run: dict[str, int] = {}
    duplicates = 0
    for path in tqdm(files, desc="reading", unit="file", disable=not progress or len(files) < 2, leave=False):
        known = store.source(str(path))
        try:
            stat = check_file(path, read_options)
            digest = file_sha256(path)
            if known is not None and known.sha256 == digest:
                unchanged += 1
                continue
            documents, notes = read_documents(path, read_options)
            chunks = [
                (document, chunk)
                for document in documents
                for chunk in chunk_text(document.text, tokenizer, chunk_tokens, overlap)
            ]
            chunk_hashes = [content_hash(chunk.text) for _, chunk in chunks]
        except SkippedFile as reason:
            skip(path, reason)
            continue
        except OSError as error:  # gone or locked between the listing and the read
            skip(path, f"cannot read ({error.strerror or error})")
            continue
        except Exception as error:  # whatever one file's content does, the run goes on without it
            skip(path, f"cannot be read ({type(error).__name__}: {str(error)[:200]})")
            continue
        for note in notes:
            warn(f"{path}: {note}")
        if known is not None:  # changed: drop what it no longer holds, keep what it still does
            removed_passages += retriever.remove_source(str(path), frozenset(chunk_hashes))
        stored = store.ids_by_hash(chunk_hashes)
        stored_links: dict[int, None] = {}  # linked now, so a later changed file cannot orphan them
        for (document, chunk), digest_text in zip(chunks, chunk_hashes):
            passage_id = stored.get(digest_text) or hashes_this_run.get(digest_text)
            if passage_id is None:
                passage_id = next_id
                next_id += 1
                hashes_this_run[digest_text] = passage_id
                pending.passages.append(Passage(
                    passage_id, chunk.text, document.title, str(path), document.record, chunk.position, digest_text
                ))
                pending.links.append((str(path), passage_id))
            else:
                duplicates += 1
                if digest_text in stored:
                    stored_links[passage_id] = None
                else:
                    pending.links.append((str(path), passage_id))
        store.add([], [(str(path), pid) for pid in stored_links])
        pending.files.append(SourceFile(str(path), stat.st_size, stat.st_mtime_ns, digest, len(chunks)))

    # 5: embed and add, one transaction per batch
    embed_started = time.perf_counter()
    bar = tqdm(total=len(pending.passages), desc="embedding", unit="passage", disable=not progress, smoothing=0.1)
    try:
        for start in range(0, len(pending.passages), EMBED_BATCH):
            batch = pending.passages[start : start + EMBED_BATCH]
            vectors = retriever.embed_passages([p.title for p in batch], [p.text for p in batch])
            retriever.add_passages(batch, vectors)
            bar.update(len(batch))
    finally:
        bar.close()
    embed_seconds = time.perf_counter() - embed_started
    # 6: links and file records, once every passage they point to is in
    store.add([], pending.links)
    for source in pending.files:
        store.record_source(source)
    return IngestReport(
        files_indexed=len(pending.files),
        files_unchanged=unchanged,
        files_skipped=tuple(skipped),
        files_removed=files_removed,
        passages_added=len(pending.passages),
        passages_removed=removed_passages,
        duplicates=duplicates,
        embed_seconds=embed_seconds,
        seconds=time.perf_counter() - started,
    )


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
