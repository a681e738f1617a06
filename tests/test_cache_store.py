"""The QA store on real SQLite and PostgreSQL (``qa_location``: each test that takes it runs
on both) and FAISS, with vectors made from a hash of the text (the store does not care
where vectors come from; the embedder is tested in test_cache_lookup).

Covers: keys and invalidation by model and store version, replacement, TTL, the LRU cap,
other connections' writes reaching this index, damaged and foreign files, 4 processes x
500 operations, and a writer killed mid-transaction.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import signal
import sqlite3
import time

import numpy as np
import pytest

from ragdec.cache.backends import SQLiteBackend
from ragdec.cache.errors import CacheFileError
from ragdec.cache.store import HUMAN, EmbedderIdentity, NewEntry, QAStore

DIM = 16
IDENTITY = EmbedderIdentity("hash-vectors", "test:1", DIM)


def vectors_for(texts) -> np.ndarray:
    """A unit vector per text, the same for the same text: float32 [n, DIM]."""
    rows = []
    for text in texts:
        seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
        v = np.random.default_rng(seed).standard_normal(DIM).astype(np.float32)
        rows.append(v / np.linalg.norm(v))
    return np.stack(rows) if rows else np.zeros((0, DIM), np.float32)


class Clock:
    """A settable clock (unix seconds) for TTL and LRU tests."""

    def __init__(self, now: float = 1_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def put(store: QAStore, question: str, answer: str = "an answer", model: str = "m1", **kwargs) -> int:
    return store.put([NewEntry(question, answer, model, **kwargs)], vectors_for([question]))[0]


def integrity_ok(store: QAStore) -> bool:
    """SQLite's page check; PostgreSQL keeps its pages itself (its WAL, checksummed)."""
    if not isinstance(store.backend, SQLiteBackend):
        return True
    return store.conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


@pytest.fixture
def store(qa_location):
    s = QAStore.open(qa_location, IDENTITY)
    yield s
    s.close()


def test_exact_hits_need_the_same_model_and_store_version(store):
    put(store, "What is WAL?", "Write-ahead logging.", model="m1", store_version="7")
    assert store.exact("what is wal", "m1", "7").answer == "Write-ahead logging."
    assert store.exact("What is WAL?", "m2", "7") is None  # another model's answer
    assert store.exact("What is WAL?", "m1", "8") is None  # grounded on an older store
    put(store, "How do I export?", "Use File > Export.", model=HUMAN)  # curated, no store
    assert store.exact("How do I export?", "any-model", "42").answer == "Use File > Export."


def test_search_finds_the_nearest_question(store):
    ids = store.put([NewEntry(q, f"answer {q}", "m1") for q in ["alpha", "beta", "gamma"]], vectors_for(["alpha", "beta", "gamma"]))
    hits = store.search(vectors_for(["beta"])[0], k=2)
    assert hits[0][0] == ids[1] and hits[0][1] == pytest.approx(1.0, abs=1e-5)
    assert len(hits) == 2


def test_same_key_replaces_the_entry_and_keeps_its_hits(store):
    first = put(store, "What is WAL?", "old answer")
    store.touch(first)
    second = put(store, "what is wal", "new answer")
    assert second != first and len(store) == 1
    entry = store.exact("What is WAL?", "m1")
    assert (entry.id, entry.answer, entry.hits) == (second, "new answer", 1)
    assert [i for i, _ in store.search(vectors_for(["What is WAL?"])[0], k=5)] == [second]


def test_ttl_expires_entries_and_purges_them(qa_location):
    clock = Clock()
    store = QAStore.open(qa_location, IDENTITY, clock=clock)
    put(store, "short lived", ttl_s=60)
    put(store, "forever")
    assert store.exact("short lived", "m1") is not None
    clock.now += 61
    assert store.exact("short lived", "m1") is None
    entry = store.entries([i for i, _ in store.search(vectors_for(["short lived"])[0], k=1)])
    assert not next(iter(entry.values())).valid_for("m1", "", clock.now)
    assert store.stats().expired == 1
    assert store.clear(expired_only=True) == 1
    assert len(store) == 1 and store.stats().expired == 0
    store.close()


def test_size_cap_evicts_the_least_recently_used(qa_location):
    clock = Clock()
    store = QAStore.open(qa_location, IDENTITY, clock=clock)
    ids = {}
    for q in ["q1", "q2", "q3"]:
        ids[q] = put(store, q)
        clock.now += 1
    store.touch(ids["q1"])  # q1 is now the most recently used
    clock.now += 1
    store.set_max_entries(3)
    ids["q4"] = put(store, "q4")  # over the cap: q2, the least recently used, goes
    assert set(store.entries(ids.values())) == {ids["q1"], ids["q3"], ids["q4"]}
    assert ids["q2"] not in {i for i, _ in store.search(vectors_for(["q2"])[0], k=5)}
    store.set_max_entries(1)
    assert list(store.entries(ids.values())) == [ids["q4"]]
    store.close()


def test_clear_by_model_and_all(store):
    put(store, "a", model="m1")
    put(store, "b", model="m2")
    assert store.clear(model="m1") == 1
    assert store.stats().by_model == {"m2": 1}
    assert store.clear() == 1
    assert len(store) == 0 and store.embedder is None  # a new embedder may fill it now


def test_other_connections_writes_reach_this_index(qa_location):
    reader, writer = QAStore.open(qa_location, IDENTITY), QAStore.open(qa_location, IDENTITY)
    assert reader.search(vectors_for(["x"])[0], k=1) == []
    entry_id = put(writer, "x")
    assert reader.search(vectors_for(["x"])[0], k=1)[0][0] == entry_id
    writer.delete([entry_id])
    assert reader.search(vectors_for(["x"])[0], k=1) == []
    put(writer, "y")
    writer.clear()  # a new epoch: the reader rebuilds
    assert reader.search(vectors_for(["y"])[0], k=1) == []
    reader.close()
    writer.close()


def test_file_is_wal_with_a_busy_timeout(tmp_path):
    store = QAStore.open(tmp_path / "qa.sqlite", IDENTITY)
    assert store.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert store.conn.execute("PRAGMA busy_timeout").fetchone()[0] >= 5000
    store.close()


def test_damaged_foreign_and_mismatched_files_give_clear_errors(tmp_path):
    garbage = tmp_path / "garbage.sqlite"
    garbage.write_bytes(os.urandom(4096))
    with pytest.raises(CacheFileError, match="damaged or not a SQLite database"):
        QAStore.open(garbage, IDENTITY)
    foreign = tmp_path / "foreign.sqlite"
    conn = sqlite3.connect(foreign)
    conn.execute("CREATE TABLE passages (id INTEGER PRIMARY KEY, text TEXT)")
    conn.commit()
    conn.close()
    with pytest.raises(CacheFileError, match="not a ragdec QA cache"):
        QAStore.open(foreign, IDENTITY)
    mine = QAStore.open(tmp_path / "mine.sqlite", IDENTITY)
    mine.close()
    with pytest.raises(CacheFileError, match="--embedder hash-vectors"):
        QAStore.open(tmp_path / "mine.sqlite", EmbedderIdentity("other", "test:2", DIM))
    with pytest.raises(FileNotFoundError, match="no QA cache"):
        QAStore.open(tmp_path / "absent.sqlite", IDENTITY, create=False)
    with pytest.raises(CacheFileError, match="is a folder"):
        QAStore.open(tmp_path, IDENTITY)


def test_a_truncated_file_gives_a_clear_error(tmp_path):
    path = tmp_path / "qa.sqlite"
    store = QAStore.open(path, IDENTITY)
    store.put([NewEntry(f"q{i}", "a" * 500, "m1") for i in range(200)], vectors_for([f"q{i}" for i in range(200)]))
    store.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    store.close()
    data = path.read_bytes()
    path.write_bytes(data[:8192] + os.urandom(len(data) - 8192))  # the schema pages survive, the entries do not
    with pytest.raises(CacheFileError, match="damaged"):  # at open, or at the first read of an entry
        store = QAStore.open(path, IDENTITY)
        store.search(vectors_for(["q1"])[0], k=1)
        store.exact("q1", "m1")


# ---- several processes ------------------------------------------------------------------


def _worker(path: str, worker: int, operations: int, results) -> None:
    """Puts, hits and searches, interleaved; reports what it wrote."""
    import random

    rng = random.Random(worker)
    store = QAStore.open(path, IDENTITY)
    mine: list[int] = []
    questions: list[str] = []
    touches = 0
    for op in range(operations):
        kind = rng.random()
        if kind < 0.4 or not mine:
            question = f"worker {worker} question {op}"
            mine.append(put(store, question, f"answer {worker}-{op}"))
            questions.append(question)
        elif kind < 0.7:
            store.touch(rng.choice(mine))
            touches += 1
        elif kind < 0.85:
            store.search(vectors_for([f"worker {rng.randrange(4)} question {rng.randrange(op + 1)}"])[0], k=3)
        else:
            assert store.exact(rng.choice(questions), "m1") is not None
    store.close()
    results.put((worker, questions, touches))


def test_four_processes_500_operations_each_lose_nothing(qa_location):
    path = str(qa_location)
    QAStore.open(path, IDENTITY).close()
    context = multiprocessing.get_context("spawn")  # no fork of a process with OpenMP threads
    results = context.Queue()
    workers = [context.Process(target=_worker, args=(path, w, 500, results)) for w in range(4)]
    for process in workers:
        process.start()
    reports = [results.get(timeout=300) for _ in workers]
    for process in workers:
        process.join(timeout=60)
        assert process.exitcode == 0
    store = QAStore.open(path, IDENTITY)
    written = [q for _, questions, _ in reports for q in questions]
    assert len(store) == len(written)
    assert all(store.exact(q, "m1") is not None for q in written)
    assert store.stats().hits == sum(touches for _, _, touches in reports)
    assert len(store.index) == len(written)
    assert integrity_ok(store)
    store.close()


def _endless_writer(path: str) -> None:
    """Writes batches of 50 entries, one transaction each, until killed."""
    store = QAStore.open(path, IDENTITY)
    batch = 0
    while True:
        questions = [f"batch {batch} question {i}" for i in range(50)]
        store.put([NewEntry(q, "x" * 2000, "m1", source=f"batch{batch}") for q in questions], vectors_for(questions))
        batch += 1


def test_a_writer_killed_mid_write_leaves_a_consistent_database(qa_location):
    path = str(qa_location)
    watcher = QAStore.open(path, IDENTITY)
    process = multiprocessing.get_context("spawn").Process(target=_endless_writer, args=(path,))
    process.start()
    deadline = time.monotonic() + 120
    while len(watcher) < 150 and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.join()
    watcher.close()
    store = QAStore.open(path, IDENTITY)
    assert integrity_ok(store)
    sizes = [n for _, n in store.conn.execute("SELECT source, count(*) FROM entries GROUP BY source")]
    assert len(sizes) >= 3 and set(sizes) == {50}  # whole batches only
    assert len(store.index) == len(store)
    put(store, "after the crash")  # and it takes writes again
    store.close()


def test_a_large_cache_trains_ivf_cells_once_and_reuses_them(tmp_path):
    """On SQLite only: keeping the cells is the backends' shared code and SQL, and storing
    50k entries takes PostgreSQL about 10 s here."""
    from ragdec.retrieval.index import IVF_MIN_VECTORS

    path = tmp_path / "qa.sqlite"
    store = QAStore.open(path, IDENTITY)
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((IVF_MIN_VECTORS, DIM)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    ids = []
    for start in range(0, IVF_MIN_VECTORS, 10_000):
        part = range(start, start + 10_000)
        ids += store.put([NewEntry(f"q{i}", f"a{i}", "m1") for i in part], vectors[start : start + 10_000])
    assert store.index.spec.kind == "ivf"  # trained now, cells kept in the file
    assert store.search(vectors[123], k=1)[0][0] == ids[123]
    trained = store.conn.execute("SELECT trained_on, nlist FROM centroids").fetchone()
    assert trained[0] == IVF_MIN_VECTORS
    store.close()
    reopened = QAStore.open(path, IDENTITY)
    assert reopened.index.spec.nlist == trained[1]  # rebuilt over the kept cells
    assert reopened.search(vectors[4567], k=1)[0][0] == ids[4567]
    reopened.delete([ids[4567]])
    assert ids[4567] not in [i for i, _ in reopened.search(vectors[4567], k=3)]
    reopened.close()
