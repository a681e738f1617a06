"""The QA store on PostgreSQL: one cache that several processes (``ragdec serve`` replicas
on several machines) share, each keeping its own FAISS index in step (``mirror.py``).

What makes it the same cache as the SQLite file:

- Writers are serialized by a transaction-scoped advisory lock taken right after ``BEGIN``,
  PostgreSQL's counterpart of SQLite's ``BEGIN IMMEDIATE``. So entry ids (an identity
  column) and deletion numbers become visible in the order they were given, which the
  index mirror relies on: were two writers interleaved, 42 could commit before 41, and a
  process that had synced past 42 would never add 41. The same lock makes the store's
  read-then-write steps safe: replacing an entry by its key (its hits carried to a new
  id), counting then evicting the least recently used, cutting the deletion log.
- The mirror reads in a ``REPEATABLE READ`` snapshot, so entries and deletions agree.
- What tells a process that another one committed is (epoch, highest id, highest deletion
  number): one indexed query, where SQLite has ``PRAGMA data_version``.
- A connection the server dropped between transactions (a restart, an idle timeout) is
  opened again on next use, so a long-running server recovers with the database.

The URL is libpq's: ``postgresql://USER[:PASSWORD]@HOST[:PORT]/DATABASE[?sslmode=...]``,
or ``postgresql://USER@/DATABASE?host=/run/postgresql`` for a local socket. The password
is better left to ``$PGPASSWORD`` or ``~/.pgpass`` than put on a command line; wherever
ragdec names the URL, the password is shown as ``***``.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from urllib.parse import unquote, urlsplit

from .errors import CacheUnreachableError, mask_url

CONNECT_TIMEOUT_S = 10  # libpq waits for ever by default; the URL's connect_timeout wins
# the writers' lock: one 64-bit key, the same in every process
WRITE_LOCK = int.from_bytes(hashlib.sha256(b"ragdec-qa-cache writers").digest()[:8], "big", signed=True)


def import_psycopg():
    try:
        import psycopg
    except ImportError as error:
        raise CacheUnreachableError("a QA cache on PostgreSQL needs psycopg: pip install 'ragdec[postgres]'") from error
    return psycopg


class PostgresBackend:
    """One PostgreSQL database (tables in its current schema, ``public`` unless the URL's
    ``options=-csearch_path=...`` says otherwise)."""

    column_types = {"serial": "BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY", "real": "DOUBLE PRECISION", "blob": "BYTEA"}

    def __init__(self, url: str):
        self._url = url  # holds the password: never shown
        self._password = unquote(urlsplit(url).password or "")
        self.location = mask_url(url)

    def connect(self, create: bool) -> "QmarkConnection":
        # ``create`` concerns the tables (the store makes them); the database itself is the
        # administrator's to create, with its owner and rights
        return QmarkConnection(self._open)

    def _open(self):
        psycopg = import_psycopg()
        options = {} if "connect_timeout=" in self._url else {"connect_timeout": CONNECT_TIMEOUT_S}
        try:
            return psycopg.connect(self._url, autocommit=True, **options)  # transactions are the store's BEGIN ... COMMIT
        except psycopg.Error as error:
            raise self._unreachable(error) from error

    def begin(self, conn, write: bool) -> None:
        if write:
            conn.execute("BEGIN")
            conn.execute("SELECT pg_advisory_xact_lock(?)", [WRITE_LOCK])  # released at COMMIT or ROLLBACK
        else:
            conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")

    def data_version(self, conn) -> tuple:
        return conn.execute(
            "SELECT (SELECT value FROM settings WHERE key = 'epoch'), (SELECT max(id) FROM entries), "
            "(SELECT max(seq) FROM deletions)"
        ).fetchone()

    def table_names(self, conn) -> set[str]:
        return {row[0] for row in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = current_schema()")}

    def size_bytes(self, conn) -> int:
        row = conn.execute(
            "SELECT coalesce(sum(pg_total_relation_size((quote_ident(schemaname) || '.' || quote_ident(tablename))::regclass)), 0) "
            "FROM pg_tables WHERE schemaname = current_schema()"
        ).fetchone()
        return int(row[0])

    def user_error(self, error: Exception) -> Exception | None:
        psycopg = import_psycopg()
        if isinstance(error, psycopg.OperationalError) and _connection_lost(error):
            return self._unreachable(error)
        if isinstance(error, psycopg.Error) and error.sqlstate == "42501":  # insufficient privilege
            return CacheUnreachableError(
                f"the QA cache database {self.location} refused its user: {_one_line(error, self._password)}; "
                "the user must be able to create and write tables in the database's schema "
                "(GRANT CREATE, USAGE ON SCHEMA public TO USER), or use another user"
            )
        return None

    def _unreachable(self, error) -> CacheUnreachableError:
        reason = _one_line(error, self._password)
        if "password" in reason:
            check = "the user name and password (in the URL, $PGPASSWORD or ~/.pgpass)"
        elif "database" in reason and "does not exist" in reason:
            check = "the database name, or create the database: createdb -h HOST -U USER NAME (or CREATE DATABASE NAME)"
        elif "role" in reason and "does not exist" in reason:
            check = "the user name: the server has no such role"
        else:
            check = "that PostgreSQL runs at that host and port (or socket folder) and accepts connections from this machine"
        return CacheUnreachableError(f"cannot use the QA cache database {self.location}: {reason}; check {check}")


def _connection_lost(error) -> bool:
    """Refused, dropped or shut down (libpq's own errors have no SQLSTATE; class 08 is the
    connection's, 57P01-57P03 the server shutting down), not a deadlock or a timeout."""
    return error.sqlstate is None or error.sqlstate.startswith(("08", "57P"))


def _one_line(error, password: str) -> str:
    """libpq's message on one line, and without the password should it ever quote it."""
    text = " ".join(str(error).split())
    return text.replace(password, "***") if password else text


@lru_cache(maxsize=256)
def _pg_sql(sql: str) -> str:
    """The store's ``?`` placeholders as psycopg's ``%s`` (the store's SQL has no ``?`` or
    ``%`` of its own)."""
    return sql.replace("?", "%s")


class QmarkConnection:
    """A psycopg connection that takes the store's ``?`` placeholders, and that opens itself
    again when the server dropped it between transactions: a statement that starts a
    transaction, or reads on its own, is sent once more on a new connection. Inside a
    transaction a lost connection stays an error: a write must never seem to commit on a
    new connection."""

    def __init__(self, open_connection):
        self._open = open_connection
        self.raw = open_connection()  # psycopg.Connection, autocommit
        self._in_transaction = False

    def execute(self, sql: str, params=None):
        if self._in_transaction:
            if sql in ("COMMIT", "ROLLBACK"):
                self._in_transaction = False
                if sql == "ROLLBACK" and self.raw.closed:  # the transaction ended with the connection
                    return None
            return self.raw.execute(_pg_sql(sql), params or None)
        # between transactions: nothing is lost by sending again on a new connection
        self._in_transaction = sql.startswith("BEGIN")
        if self.raw.closed:
            self.raw = self._open()
        try:
            return self.raw.execute(_pg_sql(sql), params or None)
        except import_psycopg().OperationalError:
            if not self.raw.closed:  # the server answered: not a lost connection
                raise
            self.raw = self._open()
            return self.raw.execute(_pg_sql(sql), params or None)

    def executemany(self, sql: str, rows) -> None:
        with self.raw.cursor() as cursor:
            cursor.executemany(_pg_sql(sql), rows)

    def close(self) -> None:
        self.raw.close()
