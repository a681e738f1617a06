"""The QA cache's storage: entries in SQLite (via sqlite-utils), mirrored in a FAISS index.

SQLite is the truth; the FAISS index is rebuilt from it on open and kept in step with
what other processes commit (``mirror.py``). Tables:

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
  retrain (k-means over 100k vectors takes seconds).

Every write is one ``BEGIN IMMEDIATE`` transaction (the write lock is taken up front, so
two writers wait for each other instead of failing on upgrade); the file is in WAL mode so
readers never block the writer; a busy timeout makes waits, not errors. A process killed
mid-write leaves the last committed state: SQLite rolls the rest back on the next open.
The file is plain SQLite: ``sqlite3 qa-cache.sqlite 'select question, hits from entries'``.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from contextlib import contextmanager
from functools import wraps
from pathlib import Path
from typing import Iterator, Sequence

from .mirror import IndexMirror
from .normalize import answer_hash, question_hash
from .records import HUMAN, CacheStats, EmbedderIdentity, Entry, NewEntry  # noqa: F401 (HUMAN, Entry: re-exported)

FORMAT = "ragdec-qa-cache"
SCHEMA_VERSION = 1  # bump when an older reader would misread the tables
BUSY_TIMEOUT_S = 30.0  # writers queue behind each other; a hit's counter update is ~1 ms
DELETIONS_KEPT = 10_000  # past this, the log is cut and every process rebuilds its index

_SCHEMA = """
CREATE TABLE IF NOT EXISTS settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS entries (
    id INTEGER PRIMARY KEY AUTOINCREMENT,   -- the FAISS id; never reused
    question TEXT NOT NULL,                 -- as asked
    question_hash TEXT NOT NULL,            -- sha256 of the normalized question
    answer TEXT NOT NULL,
    answer_hash TEXT NOT NULL,              -- sha256 of the whitespace-normalized answer
    model TEXT NOT NULL,                    -- the answering model; 'human' for curated answers
    store_version TEXT NOT NULL DEFAULT '', -- retrieval store version it was grounded on; '' none
    source TEXT NOT NULL DEFAULT '',        -- 'faq:FILE#ID' for imported entries
    created_at REAL NOT NULL,               -- unix seconds
    last_used_at REAL NOT NULL,             -- the LRU order
    hits INTEGER NOT NULL DEFAULT 0,
    expires_at REAL,                        -- unix seconds; NULL: never
    vector BLOB NOT NULL                    -- float32 little-endian, unit length
);
CREATE UNIQUE INDEX IF NOT EXISTS entries_key ON entries (question_hash, model, store_version);
CREATE INDEX IF NOT EXISTS entries_lru ON entries (last_used_at, id);
CREATE INDEX IF NOT EXISTS entries_expiry ON entries (expires_at) WHERE expires_at IS NOT NULL;
CREATE TABLE IF NOT EXISTS deletions (seq INTEGER PRIMARY KEY AUTOINCREMENT, entry_id INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS llm_cache (
    key TEXT PRIMARY KEY,                   -- sha256 of the prompt and the llm string, exactly as given
    prompt TEXT NOT NULL,
    llm_string TEXT NOT NULL,               -- LangChain's description of the model and its settings
    generations TEXT NOT NULL,              -- langchain_core.load.dumps of the generations (JSON)
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS centroids (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    trained_on INTEGER NOT NULL,            -- vectors the cells were trained on
    nlist INTEGER NOT NULL,
    data BLOB NOT NULL                      -- float32 [nlist, dimension]
);
"""
_TABLES = {"settings", "entries", "deletions", "centroids", "llm_cache"}
_ENTRY_COLUMNS = "id, question, answer, model, store_version, source, created_at, last_used_at, hits, expires_at, answer_hash"


class CacheFileError(ValueError):
    """The file cannot be used as a QA cache: damaged, foreign, or made by another embedder."""


def _now() -> float:
    return time.time()


def _damage_is_a_file_error(method):
    """A page found damaged after opening raises CacheFileError with advice, like a damaged
    file found at open; locks and full disks stay OperationalError."""

    @wraps(method)
    def checked(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except sqlite3.OperationalError:
            raise
        except sqlite3.DatabaseError as error:
            raise CacheFileError(
                f"{self.path} is damaged ({error}); move it away or delete it, and the cache starts empty"
            ) from error

    return checked


def vector_bytes(vector) -> bytes:
    import numpy as np

    return np.ascontiguousarray(vector, dtype="<f4").tobytes()


class QAStore:
    """Cached answers in one SQLite file and their question vectors in FAISS; thread-safe,
    and safe to share between processes (each keeps its own index in step).

    Example::

        store = QAStore.open("qa.sqlite", EmbedderIdentity("all-minilm-l6-v2", "sha256:53aa...", 384))
        [entry_id] = store.put([NewEntry("What is WAL?", "Write-ahead logging ...", "qwen")], vectors)
        store.search(vectors[0], k=1)          # [(entry_id, 1.0)]
    """

    def __init__(self, conn: sqlite3.Connection, path: Path, clock=_now):
        import sqlite_utils

        self.db = sqlite_utils.Database(conn, execute_plugins=False)
        self.conn = conn
        self.path = path
        self.clock = clock  # unix seconds; tests pass their own
        self._lock = threading.RLock()
        self._dimension = 0  # vector length; 0 until an embedder is recorded
        self._mirror = IndexMirror()  # the FAISS index, built on first search

    # ---- opening -------------------------------------------------------------------------

    @classmethod
    def open(cls, path: str | Path, embedder: EmbedderIdentity | None = None, create: bool = True, clock=_now) -> "QAStore":
        """Open (creating when ``create``) the cache in ``path``.

        ``embedder`` is checked against the one that made the stored vectors (and recorded
        in a new or cleared cache); None skips the check (stats, clear).

        Raises:
            FileNotFoundError: no file and not ``create``.
            CacheFileError: a damaged file, another program's database, a newer format, or
                vectors from another embedder; the message says what to do.
        """
        path = Path(path).expanduser()
        if not path.exists() and not create:
            raise FileNotFoundError(f"no QA cache at {path}: create it with `ragdec faq import FILE --db {path}` or by caching answers")
        if path.exists() and path.is_dir():
            raise CacheFileError(f"{path} is a folder; pass the path of a cache file, e.g. {path / 'qa-cache.sqlite'}")
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(str(path), timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False)
        try:
            store = cls(conn, path, clock)
            store._prepare(embedder)
        except sqlite3.OperationalError:  # locked, disk full, ...: not the file's fault
            conn.close()
            raise
        except sqlite3.DatabaseError as error:
            conn.close()
            raise CacheFileError(
                f"{path} is damaged or not a SQLite database ({error}); move it away or delete it, "
                "and the cache starts empty"
            ) from error
        except BaseException:
            conn.close()
            raise
        return store

    def _prepare(self, embedder: EmbedderIdentity | None) -> None:
        tables = set(self.db.table_names())  # the first read: a file that is not SQLite fails here
        foreign = tables - _TABLES - {"sqlite_sequence"}
        if tables and (foreign or not {"settings", "entries"} <= tables):
            raise CacheFileError(
                f"{self.path} is a SQLite database but not a ragdec QA cache (tables: {', '.join(sorted(tables))}); "
                "pass another --db path"
            )
        if self.db.journal_mode != "wal":
            self.db.enable_wal()  # outside any transaction; the mode persists in the file
        self.conn.execute("PRAGMA synchronous = NORMAL")  # with WAL: durable across process crashes
        self._create_schema(embedder)

    def _create_schema(self, embedder: EmbedderIdentity | None) -> None:
        with self.write():
            for statement in _SCHEMA.split(";\n"):  # comments hold semicolons; statements end a line with one
                if statement.strip():
                    self.conn.execute(statement)
            settings = dict(self.conn.execute("SELECT key, value FROM settings"))
            if not settings:
                self._set("format", FORMAT)
                self._set("schema_version", str(SCHEMA_VERSION))
                self._set("epoch", "1")
                settings = {"format": FORMAT, "schema_version": str(SCHEMA_VERSION)}
            if settings.get("format") != FORMAT:
                raise CacheFileError(f"{self.path} is a SQLite database but not a ragdec QA cache; pass another --db path")
            if int(settings.get("schema_version", "0")) > SCHEMA_VERSION:
                raise CacheFileError(
                    f"{self.path} was written by a newer ragdec (cache schema {settings['schema_version']}, "
                    f"this one reads {SCHEMA_VERSION}); upgrade ragdec"
                )
            recorded = json.loads(settings["embedder"]) if "embedder" in settings else None
            if embedder is not None:
                if recorded is None:
                    self._set("embedder", json.dumps(embedder.as_dict()))
                elif recorded["version"] != embedder.version or recorded["dimension"] != embedder.dimension:
                    raise CacheFileError(
                        f"{self.path} holds vectors of embedder {recorded['name']} ({recorded['version'][:19]}), "
                        f"not {embedder.name} ({embedder.version[:19]}): open it with --embedder {recorded['name']}, "
                        f"or empty it with `ragdec cache clear --db {self.path}`"
                    )
                self._dimension = embedder.dimension
            elif recorded is not None:
                self._dimension = int(recorded["dimension"])

    # ---- transactions and settings --------------------------------------------------------

    @contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, the write lock taken up front; rolled back on any error."""
        with self._lock:
            self.conn.execute("BEGIN IMMEDIATE")
            try:
                yield self.conn
            except BaseException:
                self.conn.execute("ROLLBACK")
                raise
            self.conn.execute("COMMIT")
            self._mirror.dirty = True

    @contextmanager
    def read(self) -> Iterator[sqlite3.Connection]:
        """A consistent snapshot for several reads."""
        with self._lock:
            self.conn.execute("BEGIN")
            try:
                yield self.conn
            finally:
                self.conn.execute("COMMIT")

    def _set(self, key: str, value: str) -> None:
        self.conn.execute("INSERT OR REPLACE INTO settings (key, value) VALUES (?, ?)", [key, value])

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

    @_damage_is_a_file_error
    def put(self, entries: Sequence[NewEntry], vectors) -> list[int]:
        """Store entries with their question vectors [n, dimension], in one transaction.

        An entry with the key of a stored one (same normalized question, model and store
        version) replaces it under a new id (its hit count carries over). Expired entries
        are purged and the size cap applied in the same transaction.
        """
        import numpy as np

        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if not self._dimension:
            raise CacheFileError(f"{self.path} has no embedder recorded; open it with an embedder before adding entries")
        if vectors.ndim != 2 or vectors.shape != (len(entries), self._dimension):
            raise ValueError(f"vectors must be [{len(entries)}, {self._dimension}], got {list(vectors.shape)}")
        now = self.clock()
        ids: list[int] = []
        with self.write() as conn:
            self._purge_expired(now)
            for entry, vector in zip(entries, vectors):
                key = question_hash(entry.question)
                old = conn.execute(
                    "SELECT id, hits FROM entries WHERE question_hash = ? AND model = ? AND store_version = ?",
                    [key, entry.model, entry.store_version],
                ).fetchone()
                if old:
                    self._delete_ids([old[0]])
                expires_at = None if entry.ttl_s is None else now + entry.ttl_s
                cursor = conn.execute(
                    "INSERT INTO entries (question, question_hash, answer, answer_hash, model, store_version, source, "
                    "created_at, last_used_at, hits, expires_at, vector) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [
                        entry.question, key, entry.answer, answer_hash(entry.answer), entry.model, entry.store_version,
                        entry.source, now, now, old[1] if old else 0, expires_at, vector_bytes(vector),
                    ],
                )
                ids.append(int(cursor.lastrowid))
            cap = self.setting("max_entries")
            if cap:
                self._evict(int(cap))
        return ids

    @_damage_is_a_file_error
    def touch(self, entry_id: int) -> None:
        """Count a hit: one more serve, used now (the LRU order)."""
        with self.write() as conn:
            conn.execute("UPDATE entries SET hits = hits + 1, last_used_at = ? WHERE id = ?", [self.clock(), int(entry_id)])

    @_damage_is_a_file_error
    def delete(self, ids: Sequence[int]) -> int:
        """Delete entries by id; returns how many existed."""
        with self.write():
            return self._delete_ids([int(i) for i in ids])

    @_damage_is_a_file_error
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

    @_damage_is_a_file_error
    def llm_get(self, prompt: str, llm_string: str) -> str | None:
        """The stored generations (JSON) for exactly this prompt and llm string, or None."""
        with self._lock:
            row = self.conn.execute("SELECT generations FROM llm_cache WHERE key = ?", [self._llm_key(prompt, llm_string)]).fetchone()
        return row[0] if row else None

    @_damage_is_a_file_error
    def llm_put(self, prompt: str, llm_string: str, generations: str) -> None:
        with self.write() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO llm_cache (key, prompt, llm_string, generations, created_at) VALUES (?, ?, ?, ?, ?)",
                [self._llm_key(prompt, llm_string), prompt, llm_string, generations, self.clock()],
            )

    @_damage_is_a_file_error
    def llm_clear(self) -> int:
        with self.write() as conn:
            return conn.execute("DELETE FROM llm_cache").rowcount

    # ---- reads ----------------------------------------------------------------------------

    @_damage_is_a_file_error
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

    @_damage_is_a_file_error
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

    @_damage_is_a_file_error
    def search(self, vector, k: int) -> list[tuple[int, float]]:
        """The ``k`` entries whose question vectors are nearest ``vector`` (any model, any
        store version: the caller filters), as (id, cosine), best first."""
        with self._lock:
            scores, ids = self._mirror.sync(self).search(vector, k)
        return [(int(i), float(s)) for i, s in zip(ids[0], scores[0]) if i >= 0]

    @_damage_is_a_file_error
    def stats(self) -> CacheStats:
        now = self.clock()
        with self.read() as conn:
            entries, hits = conn.execute("SELECT count(*), coalesce(sum(hits), 0) FROM entries").fetchone()
            expired = conn.execute("SELECT count(*) FROM entries WHERE expires_at IS NOT NULL AND expires_at <= ?", [now]).fetchone()[0]
            by_model = dict(conn.execute("SELECT model, count(*) FROM entries GROUP BY model ORDER BY count(*) DESC"))
            by_version = dict(conn.execute("SELECT store_version, count(*) FROM entries GROUP BY store_version"))
        size = sum(p.stat().st_size for p in (self.path, Path(f"{self.path}-wal"), Path(f"{self.path}-shm")) if p.exists())
        return CacheStats(str(self.path), entries, expired, hits, by_model, by_version, self.embedder, self.max_entries, size)

    @property
    def index(self):
        """The VectorIndex in step with SQLite (built on first use)."""
        with self._lock:
            return self._mirror.sync(self)

    @property
    def dimension(self) -> int:
        """Vector length: the recorded embedder's (0 when none is recorded)."""
        if not self._dimension:
            recorded = self.embedder
            self._dimension = int(recorded["dimension"]) if recorded else 0
        return self._dimension
