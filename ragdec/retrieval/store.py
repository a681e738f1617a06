"""The document store: passages in SQLite (via sqlite-utils), keyed by their FAISS id.

Tables:

- ``passages``: id (the FAISS int64 id), text, title, source file, record (the record's id
  in a JSON Lines file, the page of a PDF), position (chunk number in the record), and the
  SHA-256 of the whitespace-normalized text, unique, which is how duplicates are found.
- ``passages_fts``: FTS5 over title and text with the Porter stemmer, kept in step by
  triggers; its ``bm25()`` ranks passages for keyword search.
- ``sources`` and ``source_passages``: each ingested file (size, mtime, SHA-256) and the
  passages it yields. A passage found in two files is stored once and linked to both; it
  is deleted when no file links to it any more.

Every change runs in one transaction. The file is a plain SQLite database: ``sqlite3
documents.N.sqlite 'select title, text from passages limit 3'`` reads it.
"""

from __future__ import annotations

import hashlib
import re
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

_SCHEMA = """
CREATE TABLE IF NOT EXISTS passages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,  -- the FAISS id; never reused after a delete
    text TEXT NOT NULL,
    title TEXT NOT NULL DEFAULT '',
    source TEXT NOT NULL,
    record TEXT NOT NULL DEFAULT '',
    position INTEGER NOT NULL DEFAULT 0,
    content_hash TEXT NOT NULL UNIQUE
);
CREATE TABLE IF NOT EXISTS sources (
    path TEXT PRIMARY KEY,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    passages INTEGER NOT NULL,
    indexed_at TEXT NOT NULL DEFAULT (datetime('now'))
);
CREATE TABLE IF NOT EXISTS source_passages (
    path TEXT NOT NULL,
    passage_id INTEGER NOT NULL,
    PRIMARY KEY (path, passage_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS source_passages_by_passage ON source_passages (passage_id);
"""

# Words too common to help a keyword search; dropping them keeps BM25 from scoring most
# of the corpus for every question. A query made only of these keeps them.
_STOPWORDS = frozenset(
    "a an and are as at be by did do does for from has have how in is it its of on or that the "
    "their there this to was were what when where which who whom whose why will with".split()
)


# FTS5's Porter stemmer over its unicode61 tokenizer; Qdrant's sparse vectors (sparse.py)
# cut words with the same tokenizer, so that both BM25 paths see the same terms
FTS_TOKENIZER = "porter"


class StoreFileError(ValueError):
    """The SQLite file cannot be read as a document store."""


def content_hash(text: str) -> str:
    """SHA-256 of the text with runs of whitespace made one space: the duplicate key."""
    return hashlib.sha256(" ".join(text.split()).encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Passage:
    id: int  # the FAISS id
    text: str  # exactly as in the source document
    title: str  # the document's title, "" when it has none
    source: str  # the file it was first read from
    record: str  # where in the file: a JSON Lines record's id, "page 3" of a PDF, ""
    position: int  # chunk number within that record
    content_hash: str  # sha256 of the whitespace-normalized text


@dataclass(frozen=True)
class SourceFile:
    path: str  # absolute path of an ingested file
    size: int  # bytes, when ingested
    mtime_ns: int  # modification time, when ingested
    sha256: str  # of the file's bytes; "changed" means this differs
    passages: int  # chunks it yielded (duplicates included)


def query_words(question: str) -> list[str]:
    """The words a keyword search looks for: distinct, lower case, stopwords dropped unless
    nothing else is left. Both BM25 paths (FTS5 here, Qdrant's sparse vectors) start from it.

    Example: ``query_words('What is "NOT" in C++?')`` -> ``["not", "c"]``;
    ``query_words("Who was it?")`` -> ``["who", "was", "it"]``.
    """
    words = list(dict.fromkeys(re.findall(r"\w+", question.lower())))
    return [w for w in words if w not in _STOPWORDS] or words


def fts_query(question: str) -> str:
    """An FTS5 query matching any of the question's words, each quoted so that no word is
    read as an operator.

    Example: ``fts_query('What is "NOT" in C++?')`` -> ``'"not" OR "c"'`` ("what", "is",
    "in" are stopwords); ``fts_query("Who was it?")`` keeps them all: ``'"who" OR "was" OR "it"'``.
    """
    return " OR ".join(f'"{w}"' for w in query_words(question))


class DocumentStore:
    """Passages, their sources and a BM25 index in one SQLite file; thread-safe.

    Example::

        store = DocumentStore.open("documents.sqlite")
        store.add([Passage(store.next_id(), "The Rhine begins in the Alps.", "Rhine",
                           "rhine.txt", "", 0, content_hash("The Rhine begins in the Alps."))])
        store.bm25("where does the rhine begin", k=1)     # [(id, score)]
    """

    def __init__(self, db, path: Path, readonly: bool):
        self.db = db  # sqlite_utils.Database
        self.path = path
        self.readonly = readonly
        self._lock = threading.RLock()

    @classmethod
    def open(cls, path: str | Path, readonly: bool = False) -> "DocumentStore":
        """Open (creating unless ``readonly``) the store in ``path``.

        Raises:
            StoreFileError: the file is not a SQLite database or lacks the tables.
        """
        import sqlite_utils

        path = Path(path)
        if readonly:
            conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)
        else:
            conn = sqlite3.connect(str(path), check_same_thread=False)
        try:
            db = sqlite_utils.Database(conn, execute_plugins=False)
            if not readonly:
                db.conn.executescript("BEGIN;" + _SCHEMA + "COMMIT;")
                if not db["passages_fts"].exists():
                    db["passages"].enable_fts(["title", "text"], tokenize=FTS_TOKENIZER, create_triggers=True)
            missing = {"passages", "passages_fts", "sources", "source_passages"} - set(db.table_names())
            if missing:
                raise StoreFileError(f"{path} is not a ragdec document store (no table {', '.join(sorted(missing))})")
        except sqlite3.DatabaseError as error:
            conn.close()
            raise StoreFileError(f"{path} is damaged or not a SQLite database ({error})") from error
        except StoreFileError:
            conn.close()
            raise
        return cls(db, path, readonly)

    def close(self) -> None:
        with self._lock:
            self.db.close()

    def __len__(self) -> int:
        with self._lock:
            return self.db.execute("SELECT count(*) FROM passages").fetchone()[0]

    def next_id(self) -> int:
        """The id the next added passage gets: above every id ever used in this store."""
        with self._lock:
            row = self.db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'passages'").fetchone()
            return (row[0] if row else 0) + 1

    def add(self, passages: Sequence[Passage], links: Iterable[tuple[str, int]] = ()) -> None:
        """Insert passages (ids assigned by the caller from ``next_id``) and (path, passage
        id) links in one transaction."""
        with self._lock, self.db.atomic():
            self.db.conn.executemany(
                "INSERT INTO passages (id, text, title, source, record, position, content_hash) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                [(p.id, p.text, p.title, p.source, p.record, p.position, p.content_hash) for p in passages],
            )
            self.db.conn.executemany(
                "INSERT OR IGNORE INTO source_passages (path, passage_id) VALUES (?, ?)", list(links)
            )

    def get(self, ids: Sequence[int]) -> dict[int, Passage]:
        """Passages by id; ids not in the store are left out."""
        ids = [int(i) for i in ids]
        if not ids:
            return {}
        with self._lock:
            rows = self.db.execute(
                "SELECT id, text, title, source, record, position, content_hash FROM passages "
                f"WHERE id IN ({','.join('?' * len(ids))})",
                ids,
            ).fetchall()
        return {row[0]: Passage(*row) for row in rows}

    def ids_by_hash(self, hashes: Sequence[str]) -> dict[str, int]:
        """Which of these content hashes are stored already, and under which id."""
        found: dict[str, int] = {}
        with self._lock:
            for start in range(0, len(hashes), 500):  # SQLite caps bound parameters
                part = list(hashes[start : start + 500])
                rows = self.db.execute(
                    f"SELECT content_hash, id FROM passages WHERE content_hash IN ({','.join('?' * len(part))})", part
                ).fetchall()
                found.update(rows)
        return found

    def source(self, path: str) -> SourceFile | None:
        with self._lock:
            row = self.db.execute(
                "SELECT path, size, mtime_ns, sha256, passages FROM sources WHERE path = ?", [path]
            ).fetchone()
        return SourceFile(*row) if row else None

    def sources(self) -> list[SourceFile]:
        with self._lock:
            rows = self.db.execute("SELECT path, size, mtime_ns, sha256, passages FROM sources ORDER BY path").fetchall()
        return [SourceFile(*row) for row in rows]

    def record_source(self, source: SourceFile) -> None:
        with self._lock, self.db.atomic():
            self.db.conn.execute(
                "INSERT OR REPLACE INTO sources (path, size, mtime_ns, sha256, passages) VALUES (?, ?, ?, ?, ?)",
                [source.path, source.size, source.mtime_ns, source.sha256, source.passages],
            )

    def forget_source(self, path: str, keep_hashes: frozenset[str] = frozenset()) -> list[int]:
        """Unlink a file from its passages and delete the passages no other file links to,
        in one transaction; returns the deleted ids (to delete from the vector index).

        Passages whose content hash is in ``keep_hashes`` survive unlinked: a changed file
        that still holds them links them again instead of embedding them anew.
        """
        with self._lock, self.db.atomic():
            linked = [
                row[0] for row in self.db.execute(
                    "SELECT passage_id FROM source_passages WHERE path = ?", [path]
                )
            ]
            self.db.conn.execute("DELETE FROM source_passages WHERE path = ?", [path])
            self.db.conn.execute("DELETE FROM sources WHERE path = ?", [path])
            orphans = []
            for pid in linked:
                still_linked = self.db.execute(
                    "SELECT 1 FROM source_passages WHERE passage_id = ? LIMIT 1", [pid]
                ).fetchone()
                kept = self.db.execute(
                    "SELECT content_hash FROM passages WHERE id = ?", [pid]
                ).fetchone()
                if still_linked is None and not (kept and kept[0] in keep_hashes):
                    orphans.append(pid)
            self.db.conn.executemany("DELETE FROM passages WHERE id = ?", [(pid,) for pid in orphans])
        return orphans

    def delete(self, ids: Sequence[int]) -> None:
        """Delete passages and their links by id (passages added without a source file)."""
        with self._lock, self.db.atomic():
            self.db.conn.executemany("DELETE FROM source_passages WHERE passage_id = ?", [(int(i),) for i in ids])
            self.db.conn.executemany("DELETE FROM passages WHERE id = ?", [(int(i),) for i in ids])

    def all_ids(self) -> list[int]:
        with self._lock:
            return [row[0] for row in self.db.execute("SELECT id FROM passages ORDER BY id")]

    def bm25(self, question: str, k: int) -> list[tuple[int, float]]:
        """Keyword search: the k best (id, score) by BM25 over title and text, best first.
        Scores are positive, higher is better (FTS5's ``bm25()`` is negated)."""
        query = fts_query(question)
        if not query or k <= 0:
            return []
        with self._lock:
            rows = self.db.execute(
                "SELECT rowid, bm25(passages_fts) AS rank FROM passages_fts WHERE passages_fts MATCH ? "
                "ORDER BY rank LIMIT ?",
                [query, k],
            ).fetchall()
        return [(int(rowid), -float(rank)) for rowid, rank in rows]

    def backup_to(self, path: str | Path) -> None:
        """Copy the whole database into ``path`` (SQLite's online backup: consistent even
        while another connection reads)."""
        with self._lock:
            target = sqlite3.connect(str(path))
            try:
                self.db.conn.backup(target)
            finally:
                target.close()
