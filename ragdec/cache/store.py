"""The QA cache's storage: entries in a database, mirrored in a FAISS index.

The database is a SQLite file, or PostgreSQL when several processes share the cache
(``backends.py``, ``postgres.py``: what differs between them; the logic here is one). It
is the truth; the FAISS index is rebuilt from it on open and kept in step with what other
processes commit (``mirror.py``). Tables:

- ``entries``: one cached answer each: the question as asked, the SHA-256 of its normalized
  form (the exact-hit key, unique per model and store version), the answer, the answering
  model, the retrieval store's version, created / last-used times, hit count, expiry, and
  the question's embedding (float32 little-endian bytes; no pickle).
- ``deletions``: ids deleted, in order, so that other processes drop them from their index.
- ``settings``: the format marker, the embedder that made the vectors, calibrated policies,
  the size cap, an epoch bumped when every index must be rebuilt (``clear``).
- ``llm_cache``: LangChain's exact cache (prompt + llm string -> generations), for
  ``ragdec.cache.langchain``; no embeddings, no semantic hits, as LangChain's contract says.
- ``centroids``: the trained IVF cells of a large cache, so that reopening it does not
  retrain (k-means is most of a large cache's first open: bench/results/cache.json,
  ``latency_ms``).

Every write is one transaction that takes the writers' lock up front, so writes are
serialized (two writers wait for each other; a hit's counter update is a short
transaction) and read-then-write steps (replace by key, evict the least recently used) need
no more locking. A process killed mid-write leaves the last committed state. The tables are
plain SQL: ``sqlite3 qa-cache.sqlite 'select question, hits from entries'``, or ``psql``.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from contextlib import contextmanager
from functools import wraps
from pathlib import Path
from typing import Iterator, Sequence

from .backends import Backend, open_backend
from .errors import CacheFileError, missing_cache
from .mirror import IndexMirror
from .normalize import answer_hash, question_hash
from .records import HUMAN, CacheStats, EmbedderIdentity, Entry, NewEntry  # noqa: F401 (HUMAN, Entry: re-exported)

FORMAT = "ragdec-qa-cache"
SCHEMA_VERSION = 1  # bump when an older reader would misread the tables
DELETIONS_KEPT = 10_000  # past this, the log is cut and every process rebuilds its index

# {serial}, {real} and {blob}: the backend's names for them (``Backend.column_types``)
_SCHEMA = """
CREATE TABLE IF NOT EXISTS settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS entries (
    id {serial},                            -- the FAISS id; never reused
    question TEXT NOT NULL,                 -- as asked
    question_hash TEXT NOT NULL,            -- sha256 of the normalized question
    answer TEXT NOT NULL,
    answer_hash TEXT NOT NULL,              -- sha256 of the whitespace-normalized answer
    model TEXT NOT NULL,                    -- the answering model; 'human' for curated answers
    store_version TEXT NOT NULL DEFAULT '', -- retrieval store version it was grounded on; '' none
    source TEXT NOT NULL DEFAULT '',        -- 'faq:FILE#ID' for imported entries
    created_at {real} NOT NULL,             -- unix seconds
    last_used_at {real} NOT NULL,           -- the LRU order
    hits INTEGER NOT NULL DEFAULT 0,
    expires_at {real},                      -- unix seconds; NULL: never
    vector {blob} NOT NULL                  -- float32 little-endian, unit length
);
CREATE UNIQUE INDEX IF NOT EXISTS entries_key ON entries (question_hash, model, store_version);
CREATE INDEX IF NOT EXISTS entries_lru ON entries (last_used_at, id);
CREATE INDEX IF NOT EXISTS entries_expiry ON entries (expires_at) WHERE expires_at IS NOT NULL;
CREATE TABLE IF NOT EXISTS deletions (seq {serial}, entry_id INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS llm_cache (
    key TEXT PRIMARY KEY,                   -- sha256 of the prompt and the llm string, exactly as given
    prompt TEXT NOT NULL,
    llm_string TEXT NOT NULL,               -- LangChain's description of the model and its settings
    generations TEXT NOT NULL,              -- langchain_core.load.dumps of the generations (JSON)
    created_at {real} NOT NULL
);
CREATE TABLE IF NOT EXISTS centroids (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    trained_on INTEGER NOT NULL,            -- vectors the cells were trained on
    nlist INTEGER NOT NULL,
    data {blob} NOT NULL                    -- float32 [nlist, dimension]
);
"""
_TABLES = {"settings", "entries", "deletions", "centroids", "llm_cache"}
_ENTRY_COLUMNS = "id, question, answer, model, store_version, source, created_at, last_used_at, hits, expires_at, answer_hash"


def _now() -> float:
    return time.time()


def _user_errors(method):
    """Errors the user fixes, found after opening, raised as at open: a damaged SQLite page
    as CacheFileError, a lost PostgreSQL server as CacheUnreachableError (both with advice);
    locks and full disks stay what they are."""

    @wraps(method)
    def checked(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except Exception as error:
            translated = self.backend.user_error(error)
            if translated is None:
                raise
            raise translated from error

    return checked


def vector_bytes(vector) -> bytes:
    import numpy as np

    return np.ascontiguousarray(vector, dtype="<f4").tobytes()


class QAStore:
    """Cached answers in a SQLite file or a PostgreSQL database and their question vectors
    in FAISS; thread-safe, and safe to share between processes (each keeps its own index in
    step).

    Example::

        store = QAStore.open("qa.sqlite", EmbedderIdentity("all-minilm-l6-v2", "sha256:53aa...", 384))
        [entry_id] = store.put([NewEntry("What is WAL?", "Write-ahead logging ...", "qwen")], vectors)
        store.search(vectors[0], k=1)          # [(entry_id, 1.0)]
        QAStore.open("postgresql://app@db.internal/qa_cache", identity)   # the same, shared
    """

    def __init__(self, conn, backend: Backend, clock=_now):
        self.conn = conn  # the backend's connection; SQL with ``?`` placeholders
        self.backend = backend
        self.location = backend.location  # the file, or the URL with its password masked
        self.clock = clock  # unix seconds; tests pass their own
        self._lock = threading.RLock()
        self._dimension = 0  # vector length; 0 until an embedder is recorded
        self._mirror = IndexMirror()  # the FAISS index, built on first search

    # ---- opening -------------------------------------------------------------------------

    @classmethod
    def open(cls, location: str | Path, embedder: EmbedderIdentity | None = None, create: bool = True, clock=_now) -> "QAStore":
        """Open (creating when ``create``) the cache at ``location``: a file path, or a
        ``postgresql://`` URL of an existing database.

        ``embedder`` is checked against the one that made the stored vectors (and recorded
        in a new or cleared cache); None skips the check (stats, clear).

        Raises:
            FileNotFoundError: no cache there and not ``create``.
            CacheFileError: a damaged file, another program's database, a newer format, or
                vectors from another embedder; the message says what to do.
            CacheUnreachableError: the database cannot be reached; the message names the URL
                (password masked) and what to check.
        """
        backend = open_backend(location)
        conn = backend.connect(create)
        try:
            store = cls(conn, backend, clock)
            store._prepare(create)
            if embedder is not None:
                store.use_embedder(embedder)
        except BaseException as error:
            conn.close()
            translated = backend.user_error(error) if isinstance(error, Exception) else None
            if translated is None:
                raise
            raise translated from error
        return store

    def _prepare(self, create: bool) -> None:
        tables = self.backend.table_names(self.conn)  # the first read: a file that is not SQLite fails here
        foreign = tables - _TABLES
        if tables and (foreign or not {"settings", "entries"} <= tables):
            raise CacheFileError(
                f"{self.location} is a database but not a ragdec QA cache (tables: {', '.join(sorted(tables))}); "
                "pass another --db (a new file, or a database of its own)"
            )
        if not tables and not create:
            raise missing_cache(self.location)
        with self.write():
            for statement in _SCHEMA.format(**self.backend.column_types).split(";\n"):  # comments hold semicolons; statements end a line with one
                if statement.strip():
                    self.conn.execute(statement)
            settings = dict(self.conn.execute("SELECT key, value FROM settings"))
            if not settings:
                self._set("format", FORMAT)
                self._set("schema_version", str(SCHEMA_VERSION))
                self._set("epoch", "1")
                settings = {"format": FORMAT, "schema_version": str(SCHEMA_VERSION)}
            if settings.get("format") != FORMAT:
                raise CacheFileError(f"{self.location} is a database but not a ragdec QA cache; pass another --db")
            if int(settings.get("schema_version", "0")) > SCHEMA_VERSION:
                raise CacheFileError(
                    f"{self.location} was written by a newer ragdec (cache schema {settings['schema_version']}, "
                    f"this one reads {SCHEMA_VERSION}); upgrade ragdec"
                )
        recorded = self.embedder
        self._dimension = int(recorded["dimension"]) if recorded else 0

    def use_embedder(self, embedder: EmbedderIdentity) -> None:
        """Record ``embedder`` as the one that makes this cache's vectors, or check that it is.

        Raises:
            CacheFileError: the vectors are another embedder's; the message says what to do.
        """
        with self.write():
            value = self.setting("embedder")
            recorded = json.loads(value) if value else None
            if recorded is None:
                self._set("embedder", json.dumps(embedder.as_dict()))
            elif recorded["version"] != embedder.version or recorded["dimension"] != embedder.dimension:
                raise CacheFileError(
                    f"{self.location} holds vectors of embedder {recorded['name']} ({recorded['version'][:19]}), "
                    f"not {embedder.name} ({embedder.version[:19]}): open it with --embedder {recorded['name']}, "
                    f"or empty it with `ragdec cache clear --db {self.location}`"
                )
        self._dimension = embedder.dimension

    # ---- transactions and settings --------------------------------------------------------

    @contextmanager
    def write(self) -> Iterator:
        """One write transaction, the writers' lock taken up front; rolled back on any error."""
        with self._lock:
            self.backend.begin(self.conn, write=True)
            try:
                yield self.conn
            except BaseException:
                self.conn.execute("ROLLBACK")
                raise
            self.conn.execute("COMMIT")
            self._mirror.dirty = True

    @contextmanager
    def read(self) -> Iterator:
        """A consistent snapshot for several reads."""
        with self._lock:
            self.backend.begin(self.conn, write=False)
            try:
                yield self.conn
            finally:
                self.conn.execute("COMMIT")

    def _set(self, key: str, value: str) -> None:
        self.conn.execute("INSERT INTO settings (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value", [key, value])

    def setting(self, key: str) -> str | None:
        with self._lock:
            row = self.conn.execute("SELECT value FROM settings WHERE key = ?", [key]).fetchone()
        return row[0] if row else None

    def set_setting(self, key: str, value: str) -> None:
        with self.write():
            self._set(key, value)

    @property
    def embedder(self) -> dict | None:
        value = self.setting("embedder")
        return json.loads(value) if value else None

    @property
    def max_entries(self) -> int | None:
        value = self.setting("max_entries")
        return int(value) if value else None

    def set_max_entries(self, max_entries: int | None) -> None:
        """Cap the cache at ``max_entries`` (least recently used go first); None: no cap."""
        if max_entries is not None and max_entries < 1:
            raise ValueError(f"max_entries must be at least 1, got {max_entries}")
        with self.write():
            if max_entries is None:
                self.conn.execute("DELETE FROM settings WHERE key = 'max_entries'")
            else:
                self._set("max_entries", str(max_entries))
                self._evict(max_entries)

    def close(self) -> None:
        with self._lock:
            self.conn.close()

    def __len__(self) -> int:
        with self._lock:
            return self.conn.execute("SELECT count(*) FROM entries").fetchone()[0]

    # ---- writes ---------------------------------------------------------------------------

    @_user_errors
    def put(self, entries: Sequence[NewEntry], vectors) -> list[int]:
        """Store entries with their question vectors [n, dimension], in one transaction.

        An entry with the key of a stored one (same normalized question, model and store
        version) replaces it under a new id (its hit count carries over). Expired entries
        are purged and the size cap applied in the same transaction.
        """
        import numpy as np

        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if not self._dimension:
            raise CacheFileError(f"{self.location} has no embedder recorded; open it with an embedder before adding entries")
        if vectors.ndim != 2 or vectors.shape != (len(entries), self._dimension):
            raise ValueError(f"vectors must be [{len(entries)}, {self._dimension}], got {list(vectors.shape)}")
        now = self.clock()
        ids: list[int] = []
        keys = [(question_hash(e.question), e.model, e.store_version) for e in entries]
        with self.write() as conn:
            self._purge_expired(now)
            # a replacement takes a new id, as its vector is new to every index; the writers'
            # lock keeps another process from putting the same key meanwhile
            stored = self._ids_and_hits(keys)
            for entry, vector, key in zip(entries, vectors, keys):
                old = stored.get(key)
                if old:
                    self._delete_ids([old[0]])
                expires_at = None if entry.ttl_s is None else now + entry.ttl_s
                hits = old[1] if old else 0
                row = conn.execute(
                    "INSERT INTO entries (question, question_hash, answer, answer_hash, model, store_version, source, "
                    "created_at, last_used_at, hits, expires_at, vector) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
                    [
                        entry.question, key[0], entry.answer, answer_hash(entry.answer), entry.model, entry.store_version,
                        entry.source, now, now, hits, expires_at, vector_bytes(vector),
                    ],
                ).fetchone()
                ids.append(int(row[0]))
                stored[key] = (ids[-1], hits)  # a later entry of this batch with the same key replaces this one
            cap = self.setting("max_entries")
            if cap:
                self._evict(int(cap))
        return ids

    @_user_errors
    def touch(self, entry_id: int) -> None:
        """Count a hit: one more serve, used now (the LRU order)."""
        with self.write() as conn:
            conn.execute("UPDATE entries SET hits = hits + 1, last_used_at = ? WHERE id = ?", [self.clock(), int(entry_id)])

    @_user_errors
    def delete(self, ids: Sequence[int]) -> int:
        """Delete entries by id; returns how many existed."""
        with self.write():
            return self._delete_ids([int(i) for i in ids])

    @_user_errors
    def clear(self, model: str | None = None, expired_only: bool = False) -> int:
        """Delete every entry (forgetting the embedder and the IVF cells too, so that a new
        embedder may be used), or only ``model``'s entries, or only expired ones. Returns how
        many were deleted."""
        with self.write() as conn:
            if expired_only:
                return self._purge_expired(self.clock())
            if model is not None:
                ids = [row[0] for row in conn.execute("SELECT id FROM entries WHERE model = ?", [model])]
                return self._delete_ids(ids)
            count = conn.execute("SELECT count(*) FROM entries").fetchone()[0]
            conn.execute("DELETE FROM entries")
            conn.execute("DELETE FROM llm_cache")
            conn.execute("DELETE FROM deletions")
            conn.execute("DELETE FROM centroids")
            conn.execute("DELETE FROM settings WHERE key = 'embedder'")  # policies name their embedder: kept
            self._bump_epoch()
        self._dimension = 0
        return count

    def _delete_ids(self, ids: list[int]) -> int:
        """Inside a write: delete and log the deletions for other processes' indexes."""
        if not ids:
            return 0
        conn = self.conn
        deleted = 0
        for start in range(0, len(ids), 500):  # SQLite caps bound parameters
            part = ids[start : start + 500]
            marks = ",".join("?" * len(part))
            present = [row[0] for row in conn.execute(f"SELECT id FROM entries WHERE id IN ({marks})", part)]
            conn.execute(f"DELETE FROM entries WHERE id IN ({marks})", part)
            conn.executemany("INSERT INTO deletions (entry_id) VALUES (?)", [(i,) for i in present])
            deleted += len(present)
        logged = conn.execute("SELECT count(*) FROM deletions").fetchone()[0]
        if logged > DELETIONS_KEPT:
            conn.execute("DELETE FROM deletions")
            self._bump_epoch()
        return deleted

    def _ids_and_hits(self, keys: Sequence[tuple[str, str, str]]) -> dict[tuple[str, str, str], tuple[int, int]]:
        """Inside a write: (id, hits) of the stored entries with these (question hash, model,
        store version) keys; one query per 500 keys rather than one per entry."""
        wanted = set(keys)
        hashes = sorted({key[0] for key in wanted})
        found = {}
        for start in range(0, len(hashes), 500):  # SQLite caps bound parameters
            part = hashes[start : start + 500]
            for entry_id, hits, *key in self.conn.execute(
                f"SELECT id, hits, question_hash, model, store_version FROM entries WHERE question_hash IN ({','.join('?' * len(part))})", part
            ):
                if tuple(key) in wanted:
                    found[tuple(key)] = (entry_id, hits)
        return found

    def _bump_epoch(self) -> None:
        epoch = int(self.conn.execute("SELECT value FROM settings WHERE key = 'epoch'").fetchone()[0])
        self._set("epoch", str(epoch + 1))

    def _purge_expired(self, now: float) -> int:
        ids = [row[0] for row in self.conn.execute("SELECT id FROM entries WHERE expires_at IS NOT NULL AND expires_at <= ?", [now])]
        return self._delete_ids(ids)

    def _evict(self, max_entries: int) -> int:
        """Inside a write: delete the least recently used entries beyond ``max_entries``."""
        excess = self.conn.execute("SELECT count(*) FROM entries").fetchone()[0] - max_entries
        if excess <= 0:
            return 0
        ids = [row[0] for row in self.conn.execute("SELECT id FROM entries ORDER BY last_used_at, id LIMIT ?", [excess])]
        return self._delete_ids(ids)

    # ---- LangChain's exact cache -----------------------------------------------------------

    @staticmethod
    def _llm_key(prompt: str, llm_string: str) -> str:
        return hashlib.sha256(json.dumps([prompt, llm_string]).encode("utf-8")).hexdigest()

    @_user_errors
    def llm_get(self, prompt: str, llm_string: str) -> str | None:
        """The stored generations (JSON) for exactly this prompt and llm string, or None."""
        with self._lock:
            row = self.conn.execute("SELECT generations FROM llm_cache WHERE key = ?", [self._llm_key(prompt, llm_string)]).fetchone()
        return row[0] if row else None

    @_user_errors
    def llm_put(self, prompt: str, llm_string: str, generations: str) -> None:
        with self.write() as conn:
            conn.execute(
                "INSERT INTO llm_cache (key, prompt, llm_string, generations, created_at) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT (key) DO UPDATE SET generations = excluded.generations, created_at = excluded.created_at",
                [self._llm_key(prompt, llm_string), prompt, llm_string, generations, self.clock()],
            )

    @_user_errors
    def llm_clear(self) -> int:
        with self.write() as conn:
            return conn.execute("DELETE FROM llm_cache").rowcount

    # ---- reads ----------------------------------------------------------------------------

    @_user_errors
    def exact(self, question: str, model: str, store_version: str = "") -> Entry | None:
        """The valid entry whose normalized question equals ``question``'s, if any; this
        model's own answer before a curated one."""
        now = self.clock()
        with self._lock:
            rows = self.conn.execute(
                f"SELECT {_ENTRY_COLUMNS} FROM entries WHERE question_hash = ? AND model IN (?, ?) "
                "AND store_version IN (?, '') AND (expires_at IS NULL OR expires_at > ?) "
                "ORDER BY model = ? DESC, store_version = ? DESC LIMIT 1",
                [question_hash(question), model, HUMAN, store_version, now, model, store_version],
            ).fetchall()
        return Entry(*rows[0]) if rows else None

    @_user_errors
    def entries(self, ids: Sequence[int]) -> dict[int, Entry]:
        """Entries by id; ids deleted meanwhile are left out."""
        ids = [int(i) for i in ids]
        if not ids:
            return {}
        with self._lock:
            rows = self.conn.execute(
                f"SELECT {_ENTRY_COLUMNS} FROM entries WHERE id IN ({','.join('?' * len(ids))})", ids
            ).fetchall()
        return {row[0]: Entry(*row) for row in rows}

    @_user_errors
    def search(self, vector, k: int) -> list[tuple[int, float]]:
        """The ``k`` entries whose question vectors are nearest ``vector`` (any model, any
        store version: the caller filters), as (id, cosine), best first."""
        with self._lock:
            scores, ids = self._mirror.sync(self).search(vector, k)
        return [(int(i), float(s)) for i, s in zip(ids[0], scores[0]) if i >= 0]

    @_user_errors
    def stats(self) -> CacheStats:
        now = self.clock()
        with self.read() as conn:
            entries, hits = conn.execute("SELECT count(*), coalesce(sum(hits), 0) FROM entries").fetchone()
            expired = conn.execute("SELECT count(*) FROM entries WHERE expires_at IS NOT NULL AND expires_at <= ?", [now]).fetchone()[0]
            by_model = dict(conn.execute("SELECT model, count(*) FROM entries GROUP BY model ORDER BY count(*) DESC"))
            by_version = dict(conn.execute("SELECT store_version, count(*) FROM entries GROUP BY store_version"))
            size = self.backend.size_bytes(conn)
        return CacheStats(self.location, entries, expired, hits, by_model, by_version, self.embedder, self.max_entries, size)

    @property
    def index(self):
        """The VectorIndex in step with the database (built on first use)."""
        with self._lock:
            return self._mirror.sync(self)

    @property
    def dimension(self) -> int:
        """Vector length: the recorded embedder's (0 when none is recorded)."""
        if not self._dimension:
            recorded = self.embedder
            self._dimension = int(recorded["dimension"]) if recorded else 0
        return self._dimension
