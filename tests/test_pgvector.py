"""Retrieval on PostgreSQL with pgvector (issue 32), against a real server with the extension
(tests/pgvector_server.py): the backend's scores are inner products and ``ts_rank``; HNSW and
exact search rank as FAISS does on the same vectors; incremental builds, deletes and rebuilds
reach the table, each in one transaction; a folder holding only the manifest searches it; one
database holds the QA cache beside the passages; the command line builds and searches it;
bad URLs, an unreachable server, a missing extension and a table of another kind are one
line naming the URL (password masked) and what to do."""

from __future__ import annotations

import json

import numpy as np
import psycopg
import pytest
from postgres_server import PASSWORD, PASSWORD_USER

from ragdec.app.cli import main
from ragdec.retrieval import pgvector_store
from ragdec.retrieval.ingest import build
from ragdec.retrieval.persistence import Settings, StoreError, read_manifest, write_manifest
from ragdec.retrieval.pgvector_store import PgvectorTarget, without_password
from ragdec.retrieval.retriever import Retriever
from ragdec.retrieval.store import Passage, content_hash

from helpers import (cli_finds_the_gold_and_builds_nothing_again, database_for_test, replica_searches_as_the_store,
                     saves_and_deletes_reach_a_reader, serving)
from retrieval_fixtures import QA_DATA, sample_records, write_jsonl
from test_qdrant import QUESTIONS, manifest_for


@pytest.fixture(scope="module")
def pgvector():
    """A PostgreSQL server with pgvector for this module; skipped only where the wheel that
    ships it is missing, which `make test` installs."""
    from pgvector_server import start

    yield from serving(start)


@pytest.fixture
def pg_url(pgvector, request) -> str:
    """A new empty database (the superuser's: it may create the extension), dropped after."""
    yield from database_for_test(pgvector, request, "v_")


def _tables(url: str, schema: str = "ragdec_passages") -> list[str]:
    with psycopg.connect(url) as conn:
        return sorted(r[0] for r in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = %s", [schema]))


# --- no weights: the backend's scores, transactions and refusals ------------------------------

TEXTS = ["The Rhine begins in the Alps.", "The Danube flows to the Black Sea.", "Alps and Alps again: the Alps."]


def _unit_vectors(n: int, d: int = 4, seed: int = 0) -> np.ndarray:
    vectors = np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def test_scores_are_inner_products_and_full_text_ranks(tmp_path, pg_url):
    passages = [Passage(i, text, "", "rivers.txt", "", 0, content_hash(text)) for i, text in enumerate(TEXTS, start=1)]
    vectors = _unit_vectors(3)
    record = PgvectorTarget(pg_url, "rivers").record()
    writer = pgvector_store.open_writer(tmp_path, None, record, 4, rebuild=False)
    writer.add(passages, vectors)
    index, stored = writer.describe(Settings())
    assert index["kind"] == "hnsw" and stored == {"name": "pgvector", "url": pg_url, "table": "rivers"}
    writer.publish(tmp_path, manifest_for(stored, passages=3), [1, 2, 3])
    assert _tables(pg_url) == ["rivers"]  # the build's table, renamed
    reader = pgvector_store.open_reader(tmp_path, manifest_for(stored, passages=3))

    # dense: the HNSW walk and the exact scan both give FAISS's inner products, best first
    expected = sorted(((i + 1, float(vectors[i] @ vectors[0])) for i in range(3)), key=lambda pair: -pair[1])
    for exact in (False, True):
        reader.exact = exact
        ranking = reader.dense(vectors[:1], k=3)[0]
        assert [i for i, _ in ranking] == [i for i, _ in expected]
        assert [s for _, s in ranking] == pytest.approx([s for _, s in expected], abs=1e-6)

    # keywords: "alp" and "begin" (the rest are stopwords); passage 1 holds both, 3 holds
    # "alp" three times in as many words; the Danube neither
    ranking = reader.keywords(["Where do the Alps begin?"], k=3)[0]
    assert [i for i, _ in ranking] == [1, 3] and ranking[0][1] > ranking[1][1] > 0
    assert reader.keywords(["Who was it?", "?!"], k=3) == [[], []]  # stopwords only, no word at all
    assert reader.passages([3, 1, 99]) == {1: passages[0], 3: passages[2]}
    assert len(reader) == 3

    # the next save deletes what the documents file no longer holds, and checks the ids; a
    # save whose ids differ changes nothing (one transaction)
    later = pgvector_store.open_writer(tmp_path, manifest_for(stored, passages=3), stored, 4, rebuild=False)
    later.add([Passage(4, "The Elbe flows north.", "", "rivers.txt", "", 0, content_hash("The Elbe flows north."))],
              _unit_vectors(1, seed=1))
    with pytest.raises(StoreError, match=r"passages without a row: \[7\].*nothing was changed"):
        later.publish(tmp_path, manifest_for(stored, passages=4, generation=2), [1, 3, 4, 7])
    assert sorted(reader.passages([1, 2, 3, 4])) == [1, 2, 3]
    later.publish(tmp_path, manifest_for(stored, passages=3, generation=2), [1, 3, 4])
    assert sorted(reader.passages([1, 2, 3, 4])) == [1, 3, 4] and len(reader) == 3
    reader.close()
    later.close()
    writer.close()


def test_a_rebuild_swaps_the_table_in_one_transaction(tmp_path, pg_url):
    record = PgvectorTarget(pg_url, "docs").record()
    writer = pgvector_store.open_writer(tmp_path, None, record, 4, rebuild=False)
    writer.add([Passage(1, "old", "", "a", "", 0, content_hash("old"))], _unit_vectors(1))
    writer.describe(Settings())
    writer.publish(tmp_path, manifest_for(record, passages=1), [1])
    reader = pgvector_store.open_reader(tmp_path, manifest_for(record, passages=1))

    rebuilt = pgvector_store.open_writer(tmp_path, manifest_for(record, passages=1), record, 4, rebuild=True)
    rebuilt.add([Passage(1, "new", "", "b", "", 0, content_hash("new")), Passage(2, "newer", "", "b", "", 0, content_hash("newer"))],
                _unit_vectors(2, seed=2))
    with pytest.raises(StoreError, match="rows without a passage"):  # a refused rebuild leaves the old table whole
        rebuilt.publish(tmp_path, manifest_for(record, passages=1, generation=2), [1])
    assert _tables(pg_url) == ["docs"] and reader.passages([1])[1].text == "old"
    rebuilt.publish(tmp_path, manifest_for(record, passages=2, generation=2), [1, 2])
    assert _tables(pg_url) == ["docs"] and {p.text for p in reader.passages([1, 2]).values()} == {"new", "newer"}
    for backend in (reader, rebuilt, writer):
        backend.close()


def test_a_reader_whose_connection_was_dropped_opens_it_again(tmp_path, pg_url):
    record = PgvectorTarget(pg_url, "docs").record()
    writer = pgvector_store.open_writer(tmp_path, None, record, 4, False)
    writer.add([Passage(1, "kept", "", "a", "", 0, content_hash("kept"))], _unit_vectors(1))
    writer.publish(tmp_path, manifest_for(record, passages=1), [1])
    reader = pgvector_store.open_reader(tmp_path, manifest_for(record, passages=1))
    with psycopg.connect(pg_url, autocommit=True) as admin:  # what a server restart does to it
        admin.execute("SELECT pg_terminate_backend(%s)", [reader.conn.info.backend_pid])
    with pytest.raises(StoreError, match=r"refused a request .*check that the server is running"):
        reader.passages([1])
    assert reader.passages([1])[1].text == "kept" and len(reader) == 1
    reader.close()
    writer.close()


def test_bad_urls_are_one_line_naming_the_url_with_its_password_masked(tmp_path, pgvector, capsys):
    with pytest.raises(StoreError, match="is not a PostgreSQL URL"):
        PgvectorTarget("http://db:5432/rag", "docs")
    with pytest.raises(StoreError, match="not a usable table name"):
        PgvectorTarget("postgresql://db/rag", "Docs; DROP")
    assert PgvectorTarget.for_store("postgresql://db/rag", tmp_path / "My docs.store").table == "my_docs_store"
    assert PgvectorTarget.for_store("postgresql://db/rag", tmp_path / "2024").table == "s_2024"
    assert without_password("postgresql://app:s3cret@db/rag?password=x&sslmode=require") == "postgresql://app@db/rag?sslmode=require"

    nowhere = f"postgresql://app:s3cret@/rag?host={tmp_path}/no-server"  # a socket folder with no server
    with pytest.raises(StoreError) as caught:
        pgvector_store.open_writer(tmp_path, None, PgvectorTarget(nowhere, "docs").record(), 4, False)
    message = str(caught.value)
    assert message.startswith("cannot reach PostgreSQL at postgresql://app@/rag?host=") and "check that PostgreSQL runs" in message
    folder = tmp_path / "store"  # the commands that search: the server is asked before any model loads
    folder.mkdir()
    write_manifest(folder, manifest_for(PgvectorTarget(nowhere, "docs").record()))
    assert main(["index", "search", "where is the Rhine?", "--store", str(folder)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ragdec: error: cannot reach PostgreSQL at postgresql://app@/rag?host=")  # as the manifest keeps it
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1

    # the right server, a wrong password: said, and the password never shown
    wrong = pgvector.url("postgres", PASSWORD_USER, "wrong-password")
    with pytest.raises(StoreError) as caught:
        pgvector_store.open_writer(tmp_path, None, PgvectorTarget(wrong, "docs").record(), 4, False)
    assert "password authentication failed" in str(caught.value) and "$PGPASSWORD" in str(caught.value)
    assert "wrong-password" not in str(caught.value)
    corpus = write_jsonl(tmp_path / "docs.jsonl", sample_records(1))
    assert main(["index", "build", str(corpus), "--store", str(tmp_path / "s"), "--table", "docs"]) == 2
    assert "give --pgvector URL with it" in capsys.readouterr().err


def test_a_missing_extension_says_who_may_create_it(tmp_path, pgvector, capsys, weights):
    # a database its owner may write to, but where only a superuser may create pgvector
    url = pgvector.create_database("v_no_extension", owner=PASSWORD_USER)
    try:
        with pytest.raises(StoreError) as caught:
            pgvector_store.open_writer(tmp_path, None, PgvectorTarget(url, "docs").record(), 4, False)
        message = str(caught.value)
        assert "has no pgvector extension and would not create it" in message and "as a superuser" in message
        assert f"postgresql://{PASSWORD_USER}@/v_no_extension" in message and PASSWORD not in message
        corpus = write_jsonl(tmp_path / "docs.jsonl", sample_records(1))
        weights("all-minilm-l6-v2")
        assert main(["index", "build", str(corpus), "--store", str(tmp_path / "s"), "--pgvector", url, "--quiet",
                     "--model", "all-minilm-l6-v2"]) == 2
        err = capsys.readouterr().err
        assert "CREATE EXTENSION vector" in err and PASSWORD not in err and "Traceback" not in err
        assert not (tmp_path / "s" / "manifest.json").exists()
    finally:
        pgvector.drop_database("v_no_extension")


def test_a_table_of_another_kind_or_size_is_refused(tmp_path, pg_url):
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("CREATE SCHEMA ragdec_passages; CREATE TABLE ragdec_passages.orders (id BIGINT PRIMARY KEY, total NUMERIC)")
    with pytest.raises(StoreError, match=r"ragdec_passages.orders at .* exists and was not made by ragdec: give another --table"):
        pgvector_store.open_writer(tmp_path, None, PgvectorTarget(pg_url, "orders").record(), 4, rebuild=True)
    folder = tmp_path / "store"
    folder.mkdir()
    write_manifest(folder, manifest_for(PgvectorTarget(pg_url, "orders").record()))
    with pytest.raises(StoreError, match="was not made by ragdec, not the 4-dimensional vectors"):
        Retriever.open(folder)
    assert main(["index", "search", "x", "--store", str(folder)]) == 2

    record = PgvectorTarget(pg_url, "docs").record()
    writer = pgvector_store.open_writer(tmp_path, None, record, 4, False)
    writer.add([Passage(1, "a", "", "a", "", 0, content_hash("a"))], _unit_vectors(1))
    writer.publish(tmp_path, manifest_for(record, passages=1), [1])
    writer.close()
    write_manifest(folder, manifest_for(record, dimension=8))
    with pytest.raises(StoreError, match="holds 4-dimensional vectors, not the 8-dimensional"):
        Retriever.open(folder)
    with pytest.raises(StoreError, match="already holds a store that .* did not build.*--rebuild"):
        pgvector_store.open_writer(tmp_path / "another", None, record, 4, rebuild=False)
    write_manifest(folder, manifest_for(PgvectorTarget(pg_url, "gone").record()))
    with pytest.raises(StoreError, match="ragdec_passages.gone at .* does not exist"):
        Retriever.open(folder)


def test_one_database_holds_the_qa_cache_and_the_passages(tmp_path, pg_url):
    from test_cache_store import IDENTITY, put

    from ragdec.cache.store import QAStore

    store = QAStore.open(pg_url, IDENTITY)
    put(store, "Where does the Rhine begin?", "In the Alps.")
    record = PgvectorTarget(pg_url, "passages").record()
    writer = pgvector_store.open_writer(tmp_path, None, record, 4, False)
    writer.add([Passage(1, TEXTS[0], "", "a", "", 0, content_hash(TEXTS[0]))], _unit_vectors(1))
    writer.publish(tmp_path, manifest_for(record, passages=1), [1])
    assert len(store) == 1 and _tables(pg_url) == ["passages"] and "entries" in _tables(pg_url, "public")
    assert len(QAStore.open(pg_url, IDENTITY)) == 1
    writer.close()
    store.close()


# --- with a real embedder: FAISS's answers, builds, the command line --------------------------


@pytest.fixture(scope="module")
def twin_stores(tmp_path_factory, minilm, pgvector):
    """The repository's SQuAD sample built twice with all-minilm-l6-v2: FAISS, pgvector."""
    root = tmp_path_factory.mktemp("pgtwins")
    url = pgvector.create_database("v_twins")
    faiss_folder, pg_folder = root / "faiss", root / "pgvector"
    build([QA_DATA / "squad_passages.jsonl"], faiss_folder, embedder=minilm, progress=False)
    build([QA_DATA / "squad_passages.jsonl"], pg_folder, embedder=minilm, progress=False,
          qdrant=PgvectorTarget.for_store(url, pg_folder))
    yield faiss_folder, pg_folder
    pgvector.drop_database("v_twins")


def test_pgvector_answers_as_faiss_does(twin_stores, minilm):
    questions = [q["question"] for q in QUESTIONS]
    with Retriever.open(twin_stores[0], minilm) as faiss, Retriever.open(twin_stores[1], minilm) as pg:
        assert len(faiss) == len(pg) == 41
        expected = faiss.search_batch(questions, k=10, mode="dense")
        for exact in (True, False):  # the scan equals FAISS's flat index; HNSW does on 41 passages too
            pg.backend.exact = exact
            found = pg.search_batch(questions, k=10, mode="dense")
            assert [[h.id for h in hits] for hits in found] == [[h.id for h in hits] for hits in expected]
            assert [h.score for hits in found for h in hits] == pytest.approx(
                [h.score for hits in expected for h in hits], abs=1e-5)
        assert found[0][0].passage == expected[0][0].passage
        for mode in ("bm25", "hybrid"):
            # ts_rank has no idf, so keyword ranks differ from BM25's; recall@5 stays near
            gold_at_5 = [sum(q["passage_id"] in [h.passage.record for h in hits] for q, hits in zip(QUESTIONS, ranked))
                         for ranked in (faiss.search_batch(questions, k=5, mode=mode), pg.search_batch(questions, k=5, mode=mode))]
            assert abs(gold_at_5[0] - gold_at_5[1]) / len(questions) <= 0.1, (mode, gold_at_5)


def test_the_manifest_records_the_backend_and_only_it_is_needed_to_search(twin_stores, minilm, tmp_path):
    folder = twin_stores[1]
    manifest = read_manifest(folder)
    assert manifest.format == 2 and manifest.passages == 41 and manifest.index["kind"] == "hnsw"
    assert manifest.backend == {"name": "pgvector", "url": manifest.backend["url"], "table": "pgvector"}
    assert sorted(p.name for p in folder.iterdir()) == [".lock", "documents.1.sqlite", "manifest.json"]
    replica_searches_as_the_store(folder, minilm, tmp_path, QUESTIONS[0]["question"])
    with pytest.raises(StoreError, match=r"keeps its passages in the FAISS index.*--rebuild --pgvector postgresql://"):
        Retriever.open_for_writing(twin_stores[0], minilm, qdrant=PgvectorTarget(manifest.backend["url"], "elsewhere"))


def test_saves_deletes_and_rebuilds_reach_the_table(tmp_path, minilm, pg_url):
    folder = tmp_path / "notes"
    target = PgvectorTarget(pg_url, "notes")
    reader, records, docs = saves_and_deletes_reach_a_reader(folder, target, minilm, tmp_path)

    # a rebuild swaps a new table in: an open reader sees the new corpus, one table is left
    write_jsonl(docs, records[:3])
    assert build([docs], folder, embedder=minilm, progress=False, rebuild=True).passages_added == 3
    assert len(reader) == 3 and reader.search("Where does the Rhine begin?", k=1)[0].title in {r["title"] for r in records[:3]}
    assert _tables(pg_url) == ["notes"] and read_manifest(folder).generation == 4
    reader.close()


def test_cli_builds_and_searches_with_a_password_kept_out_of_the_manifest(tmp_path, weights, pgvector, capsys, monkeypatch):
    weights("all-minilm-l6-v2")
    with psycopg.connect(pgvector.url(), autocommit=True) as conn:  # the superuser makes the extension; the owner the rest
        conn.execute("CREATE DATABASE v_cli OWNER ragdec_password TEMPLATE template0")
    try:
        with psycopg.connect(pgvector.url("v_cli"), autocommit=True) as conn:
            conn.execute("CREATE EXTENSION vector")
        url = pgvector.url("v_cli", PASSWORD_USER, PASSWORD)
        folder = tmp_path / "cli.store"
        args = ["index", "build", str(QA_DATA / "squad_passages.jsonl"), "--store", str(folder), "--pgvector", url,
                "--table", "squad", "--model", "all-minilm-l6-v2", "--quiet", "--json", str(tmp_path / "build.json")]
        assert main(args) == 0
        out = capsys.readouterr().out
        assert f"PostgreSQL table ragdec_passages.squad at postgresql://{PASSWORD_USER}@/v_cli" in out and PASSWORD not in out
        assert PASSWORD not in (folder / "manifest.json").read_text()
        assert json.loads((tmp_path / "build.json").read_text())["passages_added"] == 41
        monkeypatch.setenv("PGPASSWORD", PASSWORD)  # as another process would: libpq's own way
        monkeypatch.setattr(pgvector_store, "_passwords", {})
        cli_finds_the_gold_and_builds_nothing_again(folder, tmp_path, QUESTIONS[:4], args)
    finally:
        pgvector.drop_database("v_cli")


def test_bench_measures_pgvector_beside_faiss(twin_stores, minilm, tmp_path, pgvector):
    """``ragdec bench retrieval --backend faiss,pgvector`` on the sample: the FAISS store
    copied into pgvector (same ids, same vectors), HNSW and exact measured; the table is
    dropped after."""
    from ragdec.bench.retrieval import BENCH_TABLE, measure_backend, pgvector_beside

    url = pgvector.create_database("v_bench")
    try:
        texts, gold = [q["question"] for q in QUESTIONS], [q["passage_id"] for q in QUESTIONS]
        with Retriever.open(twin_stores[0], minilm) as faiss:
            faiss_measured = measure_backend(faiss, texts, gold, texts[:6])
            compared = pgvector_beside(faiss, tmp_path, texts, gold, texts[:6], url, faiss_measured)
        assert compared["pgvector"]["store"].startswith(f"PostgreSQL table ragdec_passages.{BENCH_TABLE} at")
        assert compared["pgvector"]["recall"]["e5"] == faiss_measured["recall"]["e5"]  # the same vectors
        assert compared["pgvector"]["recall"]["e5_exact"] == faiss_measured["recall"]["e5"]
        assert abs(compared["pgvector_minus_faiss_recall@5"]["e5"]) <= 0.01
        assert compared["pgvector"]["latency_ms"]["dense_exact"]["queries"] == 6
        assert _tables(url) == []  # dropped
    finally:
        pgvector.drop_database("v_bench")
