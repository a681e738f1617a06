"""The QA cache on PostgreSQL, where it is more than the SQLite cache: bad URLs, connections
lost and opened again, passwords never shown, processes sharing one cache under a size cap
and a clear, a failed write while the answer goes out, and two `ragdec serve` processes
answering, at the same time, from each other's answers.

What the cache does on both backends (exact, semantic and near hits, TTL, LRU, FAQ import,
calibration and the commands, the LangChain cache, four processes writing and reading at
once) is tested once for both: tests/test_cache_store.py, test_cache_lookup.py,
test_cache_faq.py and test_cache_langchain.py take ``qa_location`` (tests/conftest.py).
"""

from __future__ import annotations

import http.client
import json
import multiprocessing
import sys
from pathlib import Path
from urllib.parse import urlsplit

import psycopg
import pytest
from postgres_server import PASSWORD, PASSWORD_USER
from test_cache_store import IDENTITY, put, vectors_for

from ragdec.app.cli import main
from ragdec.cache.backends import cache_location
from ragdec.cache.errors import CacheFileError, CacheUnreachableError, mask_url
from ragdec.cache.store import QAStore

SMOLLM = "smollm2-135m-instruct"


def database_name(url: str) -> str:
    return urlsplit(url).path.lstrip("/")


def test_url_masking_and_locations_as_documented():
    assert mask_url("postgresql://app:s3cret@db:5432/cache?password=x&sslmode=require") == (
        "postgresql://app:***@db:5432/cache?password=***&sslmode=require"
    )
    assert mask_url("postgresql://app@/cache?host=/run/postgresql") == "postgresql://app@/cache?host=/run/postgresql"
    assert cache_location("postgresql://db/cache") == "postgresql://db/cache"  # not a Path: "//" would become "/"
    assert cache_location("~/qa.sqlite") == Path.home() / "qa.sqlite"
    for other in ("sqlite:///qa.sqlite", "postgresql+psycopg://app:s3cret@db/cache"):
        with pytest.raises(ValueError, match="is not a PostgreSQL URL") as caught:
            QAStore.open(other, IDENTITY)
        assert "s3cret" not in str(caught.value)


def test_unreachable_databases_are_named_with_what_to_check(postgres, postgres_url, capsys):
    database = database_name(postgres_url)
    secret = "wrong-s3cret"
    cases = [
        ("postgresql://app:wrong-s3cret@127.0.0.1:1/cache", "Connection refused", "runs at that host and port"),
        (f"postgresql://app:wrong-s3cret@/cache?host={postgres.folder}/absent", "No such file", "runs at that host and port"),
        (postgres.url(database, PASSWORD_USER, secret), "password authentication failed", "password (in the URL, $PGPASSWORD"),
        (postgres.url("absent_database", PASSWORD_USER, PASSWORD), 'database "absent_database" does not exist', "createdb"),
        (postgres.url(database, "absent_role"), 'role "absent_role" does not exist', "no such role"),
    ]
    for url, reason, check in cases:
        with pytest.raises(CacheUnreachableError) as caught:
            QAStore.open(url, IDENTITY)
        message = str(caught.value)
        assert mask_url(url) in message and reason in message and check in message, message
        assert secret not in message and PASSWORD not in message
        # the command line says the same, without a traceback
        assert main(["cache", "stats", "--db", url]) == 2
        out, err = capsys.readouterr()
        assert err.startswith(f"ragdec: error: cannot use the QA cache database {mask_url(url)}") and "Traceback" not in err
        assert secret not in out + err and PASSWORD not in out + err


def test_without_psycopg_the_error_says_what_to_install(postgres_url, monkeypatch):
    monkeypatch.setitem(sys.modules, "psycopg", None)  # as where the extra is not installed: import fails
    with pytest.raises(CacheUnreachableError, match=r"pip install 'ragdec\[postgres\]'"):
        QAStore.open(postgres_url, IDENTITY)


def test_an_empty_or_foreign_database(postgres, postgres_url):
    with pytest.raises(FileNotFoundError, match="no QA cache at postgresql://"):
        QAStore.open(postgres_url, IDENTITY, create=False)
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE passages (id INTEGER PRIMARY KEY, text TEXT)")
    with pytest.raises(CacheFileError, match=r"not a ragdec QA cache \(tables: passages\)"):
        QAStore.open(postgres_url, IDENTITY)


def test_commands_name_the_database_without_its_password(postgres, tmp_path, capsys):
    url = postgres.create_database("owned_by_password_user", owner=PASSWORD_USER)
    try:
        store = QAStore.open(url, IDENTITY)
        put(store, "What is WAL?")
        put(store, "What is MVCC?")
        store.close()
        assert PASSWORD in url and main(["cache", "stats", "--db", url, "--json", str(tmp_path / "stats.json")]) == 0
        out = capsys.readouterr().out
        assert f"cache      postgresql://{PASSWORD_USER}:***@/owned_by_password_user" in out and "entries    2 (0 expired)" in out
        assert json.loads((tmp_path / "stats.json").read_text())["path"] == mask_url(url)
        assert main(["cache", "clear", "--db", url]) == 0
        out = capsys.readouterr().out
        assert out.strip() == f"deleted 2 entries (all) from {mask_url(url)}"
        assert PASSWORD not in out + (tmp_path / "stats.json").read_text()
    finally:
        postgres.drop_database("owned_by_password_user")


def test_a_dropped_connection_is_opened_again_but_never_inside_a_write(postgres, postgres_url):
    store = QAStore.open(postgres_url, IDENTITY)
    first = put(store, "before")
    postgres.sql(f"SELECT pg_terminate_backend({store.conn.raw.info.backend_pid})")  # a restart, an idle timeout
    second = put(store, "after")  # a new connection, at the next transaction
    assert store.exact("after", "m1").id == second and [i for i, _ in store.search(vectors_for(["before"])[0], 1)] == [first]
    # lost inside a write: the write fails, and its COMMIT is not sent on a new connection
    with pytest.raises(psycopg.OperationalError):
        with store.write() as conn:
            conn.execute("INSERT INTO settings (key, value) VALUES (?, ?)", ["half-written", "yes"])
            postgres.sql(f"SELECT pg_terminate_backend({store.conn.raw.info.backend_pid})")
    assert store.setting("half-written") is None and len(store) == 2
    store.close()


# ---- several processes --------------------------------------------------------------------


def _capped_writer(url: str, worker: int, barrier, results) -> None:
    """Puts 120 entries of model m<worker> with hits in between (the cap evicts as it goes);
    worker 0 then clears model m1 while worker 1 keeps putting; after each phase, reports
    the ids its own FAISS index holds and the ids in the table."""
    import random

    rng = random.Random(worker)
    store = QAStore.open(url, IDENTITY)
    mine: list[int] = []

    def report(phase: str) -> None:
        barrier.wait()  # both have written: nothing more changes until both have reported
        store.search(vectors_for(["anything"])[0], k=1)  # brings the index in step
        indexed = sorted(int(i) for i in store.index.ids_and_vectors()[0])
        table = sorted(row[0] for row in store.conn.execute("SELECT id FROM entries"))
        results.put((phase, worker, indexed, table))
        barrier.wait()

    for op in range(120):
        mine.append(put(store, f"worker {worker} question {op}", model=f"m{worker}"))
        if op % 3 == 0:
            store.touch(rng.choice(mine))
    report("capped")
    if worker == 0:
        store.clear(model="m1")
    else:
        for op in range(120, 140):
            put(store, f"worker {worker} question {op}", model="m1")
    report("cleared")
    store.close()


def test_two_processes_under_a_size_cap_and_a_clear_keep_their_indexes_in_step(postgres_url):
    store = QAStore.open(postgres_url, IDENTITY)
    store.set_max_entries(50)
    context = multiprocessing.get_context("spawn")  # no fork of a process with OpenMP threads
    barrier, results = context.Barrier(2), context.Queue()
    workers = [context.Process(target=_capped_writer, args=(postgres_url, w, barrier, results)) for w in range(2)]
    for process in workers:
        process.start()
    reports = [results.get(timeout=300) for _ in range(4)]
    for process in workers:
        process.join(timeout=60)
        assert process.exitcode == 0
    by_phase: dict[str, list] = {}
    for phase, _, indexed, table in reports:
        assert indexed == table  # each process's index holds exactly the table's entries
        by_phase.setdefault(phase, []).append(table)
    capped, cleared = by_phase["capped"], by_phase["cleared"]
    assert capped[0] == capped[1] and len(capped[0]) == 50  # 240 written, the cap kept
    assert cleared[0] == cleared[1] and len(store) == len(cleared[0]) <= 50
    assert store.stats().by_model.keys() <= {"m0", "m1"}
    store.close()


# ---- the pipeline and the server ------------------------------------------------------------


def test_a_failed_cache_write_is_reported_and_the_answer_goes_out(postgres, postgres_url, smollm2, minilm):
    from ragdec.cache.lookup import QACache
    from ragdec.decoding.methods import GenerationParams
    from ragdec.pipelines.rag import RagPipeline
    from ragdec.pipelines.types import Request

    cache = QACache.open(postgres_url, minilm)
    pipeline = RagPipeline(smollm2, None, cache)
    # a database that turned read-only (a failover to a standby, a full disk's remedy): reads
    # go on, writes fail; the cache's connection is dropped so its next session is read-only
    postgres.sql(f'ALTER DATABASE "{database_name(postgres_url)}" SET default_transaction_read_only = on')
    postgres.sql(f"SELECT pg_terminate_backend({cache.store.conn.raw.info.backend_pid})")
    request = Request([{"role": "user", "content": "What is the capital of France?"}], params=GenerationParams(max_new_tokens=48))
    chunks = list(pipeline.stream([request]))
    last = chunks[-1]
    assert "Paris" in "".join(chunk.text for chunk in chunks) and last.finish_reason == "stop"
    assert last.info.cache == "miss" and len(last.info.warnings) == 1
    assert last.info.warnings[0].startswith("the answer was not written to the QA cache (ReadOnlySqlTransaction")
    assert len(cache.store) == 0
    postgres.sql(f'ALTER DATABASE "{database_name(postgres_url)}" RESET default_transaction_read_only')
    postgres.sql(f"SELECT pg_terminate_backend({cache.store.conn.raw.info.backend_pid})")
    cache.put("What is the capital of France?", "Paris.", model=smollm2.name)  # writable again: the cache recovers
    assert cache.lookup("what is the capital of france", model=smollm2.name).outcome == "exact"
    cache.close()


def test_a_cache_that_cannot_be_reached_makes_a_miss_and_the_answer_goes_out(postgres, postgres_url, smollm2, minilm):
    """The shared cache's server gone mid-life (here: it takes no connections, and the
    cache's own was cut): the lookup fails, the request is answered as with no cache, and
    the answer says what happened, for the lookup and for the write-back."""
    from ragdec.cache.lookup import QACache
    from ragdec.decoding.methods import GenerationParams
    from ragdec.pipelines.rag import RagPipeline
    from ragdec.pipelines.types import Request

    cache = QACache.open(postgres_url, minilm)
    pipeline = RagPipeline(smollm2, None, cache)
    name = database_name(postgres_url)
    postgres.sql(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
    postgres.sql(f"SELECT pg_terminate_backend({cache.store.conn.raw.info.backend_pid})")
    try:
        request = Request([{"role": "user", "content": "What is the capital of France?"}], params=GenerationParams(max_new_tokens=48))
        chunks = list(pipeline.stream([request]))
    finally:
        postgres.sql(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
    last = chunks[-1]
    assert "Paris" in "".join(chunk.text for chunk in chunks) and last.finish_reason == "stop"
    assert last.info.cache == "off" and len(last.info.warnings) == 2
    assert last.info.warnings[0].startswith("the QA cache could not be read, answered without it")
    assert last.info.warnings[1].startswith("the answer was not written to the QA cache")
    cache.close()


def ask(port: int, question: str) -> dict:
    """One chat completion (not streamed): the answer's text and the ragdec extras."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    body = {"model": SMOLLM, "messages": [{"role": "user", "content": question}], "max_tokens": 48}
    connection.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    response = connection.getresponse()
    payload = json.loads(response.read())
    assert response.status == 200, payload
    return {"text": payload["choices"][0]["message"]["content"], **payload["ragdec"]}


def test_two_serve_processes_answer_from_each_others_answers(postgres_url, weights):
    """The issue's target: replicas of `ragdec serve` sharing one PostgreSQL cache serve each
    other's answers as exact hits."""
    from concurrent.futures import ThreadPoolExecutor

    from ragdec.bench.server_load import free_port, start_server

    weights(SMOLLM)
    weights("all-minilm-l6-v2")
    ports = [free_port(), free_port()]
    with ThreadPoolExecutor(2) as pool:  # both load their models at once
        servers = list(pool.map(lambda port: start_server(port, SMOLLM, ["--db", postgres_url]), ports))
    try:
        questions = ["What is the capital of France?", "Name a primary colour."]
        with ThreadPoolExecutor(2) as pool:  # each server answers one question, at the same time
            first = list(pool.map(ask, ports, questions))
        assert [answer["cache"] for answer in first] == ["miss", "miss"]
        again = [ask(ports[1], questions[0]), ask(ports[0], questions[1])]  # each asks the other's question
        assert [answer["cache"] for answer in again] == ["exact", "exact"]
        assert [answer["text"] for answer in again] == [answer["text"] for answer in first]
    finally:
        for server in servers:
            server.terminate()
            server.wait(timeout=30)
    store = QAStore.open(postgres_url)
    assert len(store) == 2 and store.stats().hits == 2  # both writes kept, both hits counted
    store.close()
