"""Where the QA store keeps its rows: a SQLite file, or a PostgreSQL database shared by
several processes (``postgres.py``).

``QAStore`` (store.py) holds the cache's logic once and speaks SQL that both run (``?``
placeholders, ``ON CONFLICT`` upserts, ``RETURNING``). A backend is what differs between
them: how to connect, how a write transaction takes the one writers' lock, what tells an
index that another process committed, the names of three column types, the size on disk,
and which errors are the user's to fix.

Example::

    open_backend("qa-cache.sqlite").location                    # "qa-cache.sqlite"
    open_backend("postgresql://app:s3cret@db/cache").location  # "postgresql://app:***@db/cache"
"""

from __future__ import annotations

import re
import sqlite3
from pathlib import Path
from typing import Protocol

from .errors import CacheFileError, mask_url, missing_cache

DATABASE_SCHEMES = ("postgresql://", "postgres://")  # libpq's two spellings
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
BUSY_TIMEOUT_S = 30.0  # writers queue behind each other; every write transaction is short


class Backend(Protocol):
    location: str  # what messages name: the file, or the URL with its password masked
    column_types: dict[str, str]  # the schema's {serial} (ids never reused), {real}, {blob}

    def connect(self, create: bool):
        """A connection whose ``execute(sql, params)`` takes ``?`` placeholders.

        Raises:
            FileNotFoundError: nothing there and not ``create``.
        """

    def begin(self, conn, write: bool) -> None:
        """Start a transaction: a write takes the writers' lock up front, so that writes are
        serialized and entry ids become visible in the order they were given."""

    def data_version(self, conn) -> object:
        """A value that changes whenever another connection commits (cheap)."""

    def table_names(self, conn) -> set[str]: ...

    def size_bytes(self, conn) -> int: ...

    def user_error(self, error: Exception) -> Exception | None:
        """The error to raise instead of ``error`` when it is the user's to fix, else None."""


def is_database_url(location) -> bool:
    """Whether ``location`` is a URL (``scheme://...``) rather than a file path."""
    return isinstance(location, str) and _URL.match(location) is not None


def cache_location(text: str) -> str | Path:
    """``--db``'s value: a URL as given, else a file path, ``~`` expanded.

    Example: ``cache_location("~/qa.sqlite")`` -> ``Path("/home/me/qa.sqlite")``;
    ``cache_location("postgresql://db/cache")`` -> ``"postgresql://db/cache"`` (as a Path,
    its "//" would become "/").
    """
    return text if is_database_url(text) else Path(text).expanduser()


def open_backend(location: str | Path) -> Backend:
    """The backend of a file path or a ``postgresql://`` URL.

    Raises:
        ValueError: a URL of another kind (``sqlite:///qa.db``, ``postgresql+psycopg://``).
    """
    if not is_database_url(location):
        return SQLiteBackend(Path(location).expanduser())
    if not location.startswith(DATABASE_SCHEMES):
        raise ValueError(
            f"{mask_url(location)} is not a PostgreSQL URL: pass postgresql://USER@HOST/DATABASE, "
            "or the path of a SQLite file (without a scheme)"
        )
    from .postgres import PostgresBackend

    return PostgresBackend(location)


class SQLiteBackend:
    """One SQLite file: WAL (readers never block the writer), ``BEGIN IMMEDIATE`` (two writers
    wait for each other instead of failing on upgrade), a busy timeout (waits, not errors).
    A process killed mid-write leaves the last committed state."""

    column_types = {"serial": "INTEGER PRIMARY KEY AUTOINCREMENT", "real": "REAL", "blob": "BLOB"}

    def __init__(self, path: Path):
        self.path = path
        self.location = str(path)
        self._configured = False  # WAL and synchronous set on this connection

    def connect(self, create: bool) -> sqlite3.Connection:
        if not self.path.exists() and not create:
            raise missing_cache(self.location)
        if self.path.is_dir():
            raise CacheFileError(f"{self.path} is a folder; pass the path of a cache file, e.g. {self.path / 'qa-cache.sqlite'}")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        return sqlite3.connect(str(self.path), timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False)

    def begin(self, conn, write: bool) -> None:
        if write and not self._configured:
            # outside any transaction, and only once the store has found the file to be a
            # cache (its first write): a foreign database is never switched; the mode persists
            if conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")  # with WAL: durable across process crashes
            self._configured = True
        conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")

    def data_version(self, conn) -> int:
        return conn.execute("PRAGMA data_version").fetchone()[0]

    def table_names(self, conn) -> set[str]:
        return {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table' AND name != 'sqlite_sequence'")}

    def size_bytes(self, conn) -> int:
        files = (self.path, Path(f"{self.path}-wal"), Path(f"{self.path}-shm"))
        return sum(p.stat().st_size for p in files if p.exists())

    def user_error(self, error: Exception) -> Exception | None:
        if isinstance(error, sqlite3.OperationalError):  # locked, disk full, ...: not the file's fault
            return None
        if isinstance(error, sqlite3.DatabaseError):
            return CacheFileError(
                f"{self.path} is damaged or not a SQLite database ({error}); move it away or delete it, "
                "and the cache starts empty"
            )
        return None
