"""The pgvector backend: passages, their vectors and a full-text index in one PostgreSQL table.

    ragdec index build docs/ --store docs.store --pgvector postgresql://app@db/ragdec
    ragdec index search "..." --store docs.store     # on any machine with the folder's manifest

Each passage is a row of table ``ragdec_passages.<table>``: its id, its fields, an ``embedding vector(d)`` (the embedder's unit
vector) under an HNSW index over inner product (``vector_ip_ops``: FAISS's inner product),
and a ``words tsvector`` generated from title and text with the ``english`` text-search
configuration, under a GIN index. Dense search orders by ``embedding <#> query`` (pgvector's
negated inner product) through the HNSW index, or, with ``exact``, by a scan of every row;
keyword search is PostgreSQL's full-text search, ranked by ``ts_rank`` (term frequency and
length, no idf: it is not BM25, see ``keywords``). A reader needs nothing but the manifest
and the server: replicas of ``ragdec serve`` share the corpus through the table, and the
same database may hold the QA cache (``ragdec.cache.postgres``), whose tables have other names.

Every save is one transaction, so readers see the old corpus or the new one, never half:

- the first build and every ``--rebuild`` fill a new table ``<table>_g<N>_<tag>``, index
  it, check its ids, then drop the old table and rename the new one to ``<table>``;
- a later build inserts the new passages, deletes the rows the documents file no longer
  holds and checks the ids, in place.

The URL is libpq's (``postgresql://USER@HOST[:PORT]/DATABASE``, or ``?host=/socket/folder``).
The manifest records it without its password: a password given in the URL serves this
process; other processes take it from ``$PGPASSWORD`` or ``~/.pgpass``, as libpq does.
"""

from __future__ import annotations

import contextlib
import re
import secrets
import threading
from dataclasses import astuple, dataclass, field
from pathlib import Path
from typing import ClassVar, Sequence
from urllib.parse import parse_qsl, unquote, urlsplit

from ragdec.urls import mask_url, without_password

from .backends import ServerTarget, check_read_back, passage_vectors
from .persistence import FORMAT, Manifest, Settings, StoreError, rebuild_hint
from .store import Passage, query_words

TEXT_SEARCH = "english"  # PostgreSQL's Snowball stemmer and stopwords, as FTS5's Porter stems
HNSW_M = 16  # pgvector's defaults: links per node, and candidates kept while building
HNSW_EF_CONSTRUCTION = 64
# candidates kept while searching: at least the k asked for (hybrid asks 50), else an HNSW
# scan returns fewer rows than k
HNSW_EF_SEARCH = 100
CONNECT_TIMEOUT_S = 10  # libpq waits for ever by default; the URL's connect_timeout wins
# the stores' tables live in a schema of their own, so that a database's public schema can
# hold the QA cache (ragdec.cache.postgres), which refuses tables it does not know
SCHEMA = "ragdec_passages"
MAX_TABLE = 40  # characters: PostgreSQL names have 63, and builds add "_g<N>_<tag>_hnsw"
_FIELDS = ("text", "title", "source", "record", "position", "content_hash")  # Passage's fields but the id
_COLUMNS = {"id", *_FIELDS, "embedding", "words"}
_URL = re.compile(r"^postgres(ql)?://")
_TABLE = re.compile(r"[a-z_][a-z0-9_]*")

# public URL -> password given on this process's command line (never written anywhere)
_passwords: dict[str, str] = {}


def import_psycopg():
    """psycopg, imported on first use.

    Raises:
        StoreError: it is not installed.
    """
    try:
        import psycopg
    except ImportError:
        raise StoreError("psycopg is not installed, and this store keeps its passages in PostgreSQL: "
                         "pip install 'ragdec[postgres]' (or pip install 'psycopg[binary]==3.3.9')") from None
    return psycopg


def _password(url: str) -> str | None:
    parts = urlsplit(url)
    if parts.password:
        return unquote(parts.password)
    return dict(parse_qsl(parts.query)).get("password")


@dataclass(frozen=True)
class PgvectorTarget(ServerTarget):
    """Where a store's table lives."""

    url: str  # the URL as given (it may hold a password: shown only through mask_url)
    table: str  # the table readers search; from the store folder's name by default
    backend: ClassVar[str] = "pgvector"
    place: ClassVar[str] = "table"

    def __post_init__(self) -> None:
        if not _URL.match(self.url):
            raise StoreError(f"--pgvector {mask_url(self.url)!r} is not a PostgreSQL URL: give "
                             "postgresql://USER@HOST[:PORT]/DATABASE (or postgresql://USER@/DATABASE?host=/socket/folder)")
        if not _TABLE.fullmatch(self.table) or len(self.table) > MAX_TABLE:
            raise StoreError(f"--table {self.table!r} is not a usable table name: use lower-case letters, digits "
                             f"and '_', not starting with a digit ({MAX_TABLE} characters at most)")
        password = _password(self.url)
        if password:  # this process may reach the server again from the manifest's URL
            _passwords[self.public_url] = password

    @property
    def public_url(self) -> str:
        """The URL as the manifest keeps it: no password, ever."""
        return without_password(self.url)

    @staticmethod
    def place_for(folder_name: str) -> str:
        """Example: ``PgvectorTarget.for_store(url, "~/My docs.store")`` -> table ``"my_docs_store"``;
        a folder named ``2024`` gives ``"s_2024"``."""
        table = re.sub(r"\W", "_", folder_name.lower(), flags=re.ASCII) or "ragdec"
        return ("s_" + table if table[0].isdigit() else table)[:MAX_TABLE]

    def __str__(self) -> str:
        return f"PostgreSQL table {SCHEMA}.{self.table} at {mask_url(self.url)}"


def location(record: dict) -> str:
    return str(PgvectorTarget.from_record(record))


def _one_line(error, url: str) -> str:
    text = " ".join(str(error).split())
    password = _password(url) or _passwords.get(without_password(url))
    return text.replace(password, "***") if password else text


def _connect(target: PgvectorTarget):
    """A connection in autocommit mode (each save is an explicit transaction).

    Raises:
        StoreError: the server cannot be reached or refused the user.
    """
    psycopg = import_psycopg()
    options = {} if "connect_timeout=" in target.url else {"connect_timeout": CONNECT_TIMEOUT_S}
    password = _password(target.url) or _passwords.get(target.public_url)
    if password:
        options["password"] = password
    try:
        conn = psycopg.connect(target.url, autocommit=True, **options)
    except psycopg.Error as error:
        reason = _one_line(error, target.url)
        if "password" in reason:
            check = ("the user name and password ($PGPASSWORD or ~/.pgpass: the store's manifest keeps the URL "
                     "without its password)")
        elif "does not exist" in reason:
            check = "the database and user names (the database is the administrator's to create: createdb NAME)"
        else:
            check = "that PostgreSQL runs at that host and port (or socket folder) and accepts connections from here"
        raise StoreError(f"cannot reach PostgreSQL at {mask_url(target.url)} ({reason}): check {check}") from None
    conn.add_notice_handler(lambda notice: None)  # "word is a stopword", "extension exists": not the user's concern
    return conn


@contextlib.contextmanager
def _reaching(target: PgvectorTarget):
    """Turn PostgreSQL's errors into a ``StoreError`` naming the server (password masked)."""
    psycopg = import_psycopg()
    try:
        yield
    except psycopg.Error as error:
        reason = _one_line(error, target.url)
        if error.sqlstate == "42501":  # insufficient privilege
            hint = f"grant the user CREATE on the database's schema and ownership of table {target.table!r}, or use another user"
        elif isinstance(error, psycopg.OperationalError):
            hint = "check that the server is running, then run the command again"
        else:
            hint = "see the server's log"
        raise StoreError(f"PostgreSQL at {mask_url(target.url)} refused a request on table {target.table!r} "
                         f"({reason}): {hint}") from None


def _vector_text(vector) -> str:
    """pgvector's text form of a float32 vector; ``repr`` of each float round-trips exactly."""
    return "[" + ",".join(repr(float(x)) for x in vector) + "]"


@dataclass
class PgvectorBackend:
    """A store's table: searched by readers, filled by one writer (``publish``)."""

    conn: object  # psycopg.Connection, autocommit
    target: PgvectorTarget
    dimension: int  # of the embedding column
    documents: object = None  # the writer's working DocumentStore; None for readers
    new_table: bool = False  # the next publish fills a new table and swaps it in
    exists: bool = True  # whether the table exists yet (a new store's does after its first save)
    exact: bool = False  # dense search scans every row instead of walking the HNSW graph
    # passage id -> (passage, vector float32 [d]), waiting for publish
    _pending: dict = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)  # one statement at a time
    _ef_search: int = 0  # hnsw.ef_search as last set on this connection
    manifest_format: ClassVar[int] = FORMAT

    @contextlib.contextmanager
    def _using(self):
        """The connection and the table's name, one caller at a time; a connection the
        server dropped (a restart) is opened again, so a long-running reader recovers."""
        from psycopg import sql

        with self._lock, _reaching(self.target):
            if self.conn.closed:
                self.conn = _connect(self.target)
                self._ef_search = 0
            yield self.conn, sql.Identifier(SCHEMA, self.target.table)

    def __len__(self) -> int:
        if self.documents is not None:
            return len(self.documents)
        if not self.exists:
            return 0
        with self._using() as (conn, table):
            return int(conn.execute(_sql("SELECT count(*) FROM {}", table)).fetchone()[0])

    # --- search -------------------------------------------------------------------------

    def dense(self, vectors, k: int) -> list[list[tuple[int, float]]]:
        import numpy as np

        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.ndim == 1:
            vectors = vectors[None, :]
        if k <= 0 or not self.exists:
            return [[] for _ in vectors]
        # <#> is the negated inner product: ascending order is FAISS's descending score
        query = "SELECT id, -(embedding <#> %s::vector) FROM {} ORDER BY embedding <#> %s::vector, id LIMIT %s"
        rankings = []
        with self._using() as (conn, table):
            ef_search = max(HNSW_EF_SEARCH, k)
            if ef_search != self._ef_search:
                conn.execute("SELECT set_config('hnsw.ef_search', %s, false)", [str(ef_search)])
                self._ef_search = ef_search
            with conn.transaction() if self.exact else contextlib.nullcontext():
                if self.exact:  # the planner then sorts a scan of every row: exact, as FAISS's flat index
                    conn.execute("SET LOCAL enable_indexscan = off")
                for vector in vectors:
                    text = _vector_text(vector)
                    rows = conn.execute(_sql(query, table), [text, text, k]).fetchall()
                    rankings.append([(int(i), float(score)) for i, score in rows])
        return rankings

    def keywords(self, questions: Sequence[str], k: int) -> list[list[tuple[int, float]]]:
        """PostgreSQL's full-text search: passages holding any of a question's words
        (``query_words``, OR'ed), ranked by ``ts_rank`` normalized by passage length (flag 1).

        Unlike BM25 (FTS5, Qdrant) ``ts_rank`` has no idf: a rare word counts as much as a
        common one. The ``english`` configuration drops stopwords on both sides, so a
        question made only of them ("Who was it?") matches nothing here.
        """
        rankings: list[list[tuple[int, float]]] = [[] for _ in questions]
        if k <= 0 or not self.exists:
            return rankings
        query = ("SELECT id, ts_rank(words, query, 1) AS score FROM {}, to_tsquery(%s::regconfig, %s) query "
                 "WHERE words @@ query ORDER BY score DESC, id LIMIT %s")
        with self._using() as (conn, table):
            for n, question in enumerate(questions):
                words = query_words(question)  # \w+ only: nothing to_tsquery reads as an operator
                if words:
                    rows = conn.execute(_sql(query, table), [TEXT_SEARCH, " | ".join(words), k]).fetchall()
                    rankings[n] = [(int(i), float(score)) for i, score in rows]
        return rankings

    def passages(self, ids: Sequence[int]) -> dict[int, Passage]:
        ids = [int(i) for i in ids]
        if not ids or not self.exists:
            return {}
        columns = ", ".join(("id", *_FIELDS))
        with self._using() as (conn, table):
            rows = conn.execute(_sql(f"SELECT {columns} FROM {{}} WHERE id = ANY(%s)", table), [ids]).fetchall()
        return {int(row[0]): Passage(*row) for row in rows}

    def close(self) -> None:
        if self.documents is not None:
            self.documents.close()
        self.conn.close()

    # --- writing ------------------------------------------------------------------------

    def add(self, passages: Sequence[Passage], vectors) -> None:
        if not passages:
            return
        for passage, vector in zip(passages, passage_vectors(passages, vectors, self.dimension)):
            self._pending[passage.id] = (passage, vector)

    def remove(self, ids: Sequence[int]) -> None:
        # rows already in the table go at publish: it deletes whatever the documents file no longer holds
        for i in ids:
            self._pending.pop(int(i), None)

    def describe(self, settings: Settings) -> tuple[dict, dict]:
        index = {"kind": "hnsw", "distance": "inner product", "m": HNSW_M, "ef_construction": HNSW_EF_CONSTRUCTION,
                 "ef_search": HNSW_EF_SEARCH, "text_search": TEXT_SEARCH}
        return index, self.target.record()

    def publish(self, folder: Path, manifest: Manifest, passage_ids: Sequence[int]) -> None:
        """In one transaction: fill a new table (first build, rebuild) or change the table in
        place, check its ids, and for a new table swap it in (see the module's docstring).

        Raises:
            StoreError: the ids read back differ; the transaction is rolled back.
        """
        wanted = {int(i) for i in passage_ids}
        with self._using() as (conn, table), conn.transaction():
            # two writers of one table (two store folders, one --rebuild) take turns
            conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", [f"ragdec passages {self.target.table}"])
            if self.new_table:
                build = f"{self.target.table}_g{manifest.generation}_{secrets.token_hex(3)}"
                self._create(conn, build)
                self._copy(conn, build)
                self._index(conn, build)
                self._check(folder, conn, build, wanted)
                conn.execute(_sql("DROP TABLE IF EXISTS {}", table))
                conn.execute(_sql("ALTER TABLE {} RENAME TO {}", build, _unqualified(self.target.table)))
            else:
                self._copy(conn, self.target.table)
                conn.execute(_sql("DELETE FROM {} WHERE id <> ALL(%s)", table), [sorted(wanted)])
                self._check(folder, conn, self.target.table, wanted)
        self._pending.clear()
        self.new_table = False
        self.exists = True

    def _create(self, conn, name: str) -> None:
        conn.execute(_sql(
            "CREATE TABLE {} (id BIGINT PRIMARY KEY, text TEXT NOT NULL, title TEXT NOT NULL, source TEXT NOT NULL, "
            f"record TEXT NOT NULL, position INTEGER NOT NULL, content_hash TEXT NOT NULL, embedding vector({self.dimension}) NOT NULL, "
            f"words tsvector GENERATED ALWAYS AS (to_tsvector('{TEXT_SEARCH}', title || ' ' || text)) STORED)", name))

    def _index(self, conn, name: str) -> None:
        """The HNSW and GIN indexes, made after the rows are in (faster than row by row);
        named after the build's table, so that they never clash with another build's."""
        conn.execute(_sql(f"CREATE INDEX {{}} ON {{}} USING hnsw (embedding vector_ip_ops) "
                          f"WITH (m = {HNSW_M}, ef_construction = {HNSW_EF_CONSTRUCTION})", _unqualified(f"{name}_hnsw"), name))
        conn.execute(_sql("CREATE INDEX {} ON {} USING gin (words)", _unqualified(f"{name}_words"), name))

    def _copy(self, conn, name: str) -> None:
        """The pending passages into table ``name`` (new ids: a passage that changed gets a new id)."""
        from psycopg import sql

        if not self._pending:
            return
        columns = sql.SQL(", ").join(sql.Identifier(c) for c in ("id", *_FIELDS, "embedding"))
        with conn.cursor().copy(sql.SQL("COPY {} ({}) FROM STDIN").format(sql.Identifier(SCHEMA, name), columns)) as copy:
            for passage, vector in self._pending.values():
                copy.write_row([*astuple(passage), _vector_text(vector)])  # id, then _FIELDS in order

    def _check(self, folder: Path, conn, name: str, wanted: set[int]) -> None:
        stored = {int(row[0]) for row in conn.execute(_sql("SELECT id FROM {}", name))}
        check_read_back(self.target, "row", stored, wanted, folder, undone="nothing was changed and ")


def _sql(template: str, *names):
    """``template`` with each ``{}`` a quoted identifier: a table name (a str) in ``SCHEMA``,
    or an ``sql.Identifier`` as it is."""
    from psycopg import sql

    return sql.SQL(template).format(*(n if isinstance(n, sql.Identifier) else sql.Identifier(SCHEMA, n) for n in names))


def _unqualified(name: str):
    """A name PostgreSQL places itself: an index (in its table's schema), a table's new name."""
    from psycopg import sql

    return sql.Identifier(name)


def _layout(conn, table: str) -> tuple[bool, int | None]:
    """(whether ``table`` exists, the dimension of its embedding column); dimension None
    when it is not a table ragdec made (a view, another table's columns)."""
    row = conn.execute("SELECT c.oid, c.relkind FROM pg_class c WHERE c.oid = to_regclass(%s)", [f"{SCHEMA}.{table}"]).fetchone()
    if row is None:
        return False, None
    columns = dict(conn.execute(
        "SELECT attname, format_type(atttypid, atttypmod) FROM pg_attribute WHERE attrelid = %s AND attnum > 0 "
        "AND NOT attisdropped", [row[0]]).fetchall())
    match = re.fullmatch(r"vector\((\d+)\)", columns.get("embedding", ""))
    if row[1] != "r" or set(columns) != _COLUMNS or not match or columns.get("words") != "tsvector":
        return True, None
    return True, int(match.group(1))


def _check_table(folder: Path, backend: PgvectorBackend) -> None:
    """Refuse a table that is not this store's: another layout or another dimension."""
    _, dimension = _layout(backend.conn, backend.target.table)
    if dimension != backend.dimension:
        made = "was not made by ragdec" if dimension is None else f"holds {dimension}-dimensional vectors"
        raise StoreError(f"{backend.target} {made}, not the {backend.dimension}-dimensional vectors of store {folder}: "
                         f"give another --table, or {rebuild_hint(folder)}")


def _prepare_database(target: PgvectorTarget, conn) -> None:
    """pgvector in the database, created when missing (which takes a superuser: it is not a
    trusted extension); and the stores' schema.

    Raises:
        StoreError: either is refused.
    """
    psycopg = import_psycopg()
    try:
        conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
    except psycopg.Error as error:
        raise StoreError(
            f"PostgreSQL at {mask_url(target.url)} has no pgvector extension and would not create it "
            f"({_one_line(error, target.url)}): install pgvector on the server (Debian: postgresql-NN-pgvector) and "
            "run CREATE EXTENSION vector; in that database as a superuser, or connect as one"
        ) from None
    try:
        conn.execute(f"CREATE SCHEMA IF NOT EXISTS {SCHEMA}")
    except psycopg.Error as error:
        raise StoreError(
            f"PostgreSQL at {mask_url(target.url)} would not create schema {SCHEMA} ({_one_line(error, target.url)}): "
            f"grant the user CREATE on the database, or create the schema for it: CREATE SCHEMA {SCHEMA} AUTHORIZATION USER"
        ) from None


def open_reader(folder: Path, manifest: Manifest, nprobe: int | None = None) -> PgvectorBackend:
    """The store's table, for search; needs nothing in ``folder`` but the manifest
    (``nprobe`` is FAISS's: an HNSW graph has no cells)."""
    target = PgvectorTarget.from_record(manifest.backend)
    backend = PgvectorBackend(_connect(target), target, manifest.embedder["dimension"])
    try:
        with backend._using() as (conn, _):
            exists, _ = _layout(conn, target.table)
            if not exists:
                raise StoreError(f"{target} does not exist (dropped, or another database?): check the URL, "
                                 f"or {rebuild_hint(folder)}")
            _check_table(folder, backend)
    except BaseException:
        backend.close()
        raise
    return backend


def open_writer(folder: Path, manifest: Manifest | None, record: dict, dimension: int, rebuild: bool) -> PgvectorBackend:
    """The table to add to, continuing ``manifest``'s generation; or, for a new store
    (``manifest`` None) or a rebuild, a new table swapped in at the first save.

    Raises:
        StoreError: no pgvector and no right to create it; the table is gone or not this
            store's; a new store folder would take over another store's table (without ``rebuild``).
    """
    target = PgvectorTarget.from_record(record)
    continuing = manifest is not None and not rebuild
    backend = PgvectorBackend(_connect(target), target, dimension, new_table=not continuing)
    try:
        _prepare_database(target, backend.conn)
        with backend._using() as (conn, _):
            backend.exists, layout_dimension = _layout(conn, target.table)
            if continuing:
                if not backend.exists:
                    raise StoreError(f"{target} does not exist (dropped, or another database?): {rebuild_hint(folder)}")
                _check_table(folder, backend)
            elif backend.exists and layout_dimension is None:
                raise StoreError(f"{target} exists and was not made by ragdec: give another --table")
            elif backend.exists and not rebuild:
                raise StoreError(f"{target} already holds a store that {folder} did not build: give another "
                                 "--table, or add --rebuild to replace it")
    except BaseException:
        backend.close()
        raise
    return backend


def drop(target: PgvectorTarget) -> None:
    """Drop a store's table (what a benchmark made for itself). The store folder's manifest
    then points at nothing."""
    conn = _connect(target)
    try:
        with _reaching(target):
            conn.execute(_sql("DROP TABLE IF EXISTS {}", target.table))
    finally:
        conn.close()
