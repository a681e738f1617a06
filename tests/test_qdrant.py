"""Retrieval on Qdrant (issue 19): the backend on ``:memory:`` answers as FAISS does on the
same data and embedder; its scores are inner products and BM25; incremental builds, deletes
and rebuilds reach the collection; a folder holding only the manifest searches it; the
command line builds and searches it; bad URLs, unreachable servers, in-memory stores from
another process and a missing qdrant-client are one-line errors that say what to do."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest

from ragdec.app.cli import main
from ragdec.retrieval import qdrant_store
from ragdec.retrieval.ingest import build
from ragdec.retrieval.persistence import Manifest, Settings, StoreError, read_manifest, write_manifest
from ragdec.retrieval.qdrant_store import QdrantTarget
from ragdec.retrieval.retriever import Retriever
from ragdec.retrieval.sparse import B, K1, TOKENIZER, passage_vector, query_vector, term_id
from ragdec.retrieval.store import Passage, content_hash

from helpers import (cli_finds_the_gold_and_builds_nothing_again, replica_searches_as_the_store,
                     saves_and_deletes_reach_a_reader)
from retrieval_fixtures import QA_DATA, memory_target, sample_records, write_jsonl

QUESTIONS = [json.loads(line) for line in (QA_DATA / "squad_questions.jsonl").read_text(encoding="utf-8").splitlines()]


def manifest_for(backend: dict, dimension: int = 4, passages: int = 0, generation: int = 1) -> Manifest:
    """A manifest as a save writes it, for tests that drive a backend without an embedder."""
    embedder = {"name": "none", "dimension": dimension, "version": "test", "query_prefix": "", "passage_prefix": "",
                "max_tokens": 512, "precision": "float32"}
    return Manifest(format=2, generation=generation, embedder=embedder, index={"kind": "qdrant"},
                    settings={}, passages=passages, updated_at="", backend=backend)


# --- no weights: the sparse vectors, the backend's scores, the refusals -----------------------


def test_sparse_vectors_worked_examples():
    assert TOKENIZER.term_counts(["Rhine\nThe Rhine begins in the Alps."])[0] == {
        "rhine": 2, "the": 2, "begin": 1, "in": 1, "alp": 1}
    indices, values = passage_vector(TOKENIZER.term_counts(["Rhine\nThe Rhine begins in the Alps."])[0], avgdl=7)
    weights = dict(zip(indices, values))
    assert weights[term_id("rhine")] == pytest.approx(1.375) and weights[term_id("alp")] == pytest.approx(1.0)
    assert indices == sorted(indices)
    indices, values = query_vector("Where does the Rhine begin?")  # where, does, the: stopwords
    assert indices == sorted([term_id("rhine"), term_id("begin")]) and values == [1.0, 1.0]
    assert query_vector("?!") == ([], [])


def test_qdrant_scores_are_inner_products_and_bm25(tmp_path):
    texts = ["The Rhine begins in the Alps.", "The Danube flows to the Black Sea.", "Alps and Alps again: the Alps."]
    passages = [Passage(i, text, "", "rivers.txt", "", 0, content_hash(text)) for i, text in enumerate(texts, start=1)]
    vectors = np.random.default_rng(0).normal(size=(3, 4)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    record = memory_target(tmp_path).record()
    writer = qdrant_store.open_writer(tmp_path, None, record, 4, rebuild=False)
    writer.add(passages, vectors)
    _, stored = writer.describe(Settings())
    avgdl = stored["bm25_avgdl"]
    assert avgdl == pytest.approx((6 + 7 + 6) / 3, abs=1e-3)  # tokens of each text, as recorded
    writer.publish(tmp_path, manifest_for(stored, passages=3), [1, 2, 3])
    reader = qdrant_store.open_reader(tmp_path, manifest_for(stored, passages=3))

    # dense: Dot over unit vectors, FAISS's inner product
    ranking = reader.dense(vectors[:1], k=3)[0]
    expected = sorted(((i + 1, float(vectors[i] @ vectors[0])) for i in range(3)), key=lambda pair: -pair[1])
    assert [i for i, _ in ranking] == [i for i, _ in expected]
    assert [s for _, s in ranking] == pytest.approx([s for _, s in expected], abs=1e-5)

    # BM25 of "Where do the Alps begin?" (terms alp, begin) with Qdrant's idf over N = 3:
    #   idf(alp) = ln((3 - 2 + 0.5) / (2 + 0.5) + 1), idf(begin) = ln((3 - 1 + 0.5) / (1 + 0.5) + 1)
    #   passage 1 (6 tokens, alp 1, begin 1), passage 3 (6 tokens, alp 3); avgdl = 19 / 3
    idf_alp, idf_begin = math.log(1.5 / 2.5 + 1), math.log(2.5 / 1.5 + 1)
    length_factor = K1 * (1 - B + B * 6 / avgdl)

    def tf_part(tf):
        return tf * (K1 + 1) / (tf + length_factor)

    ranking = reader.keywords(["Where do the Alps begin?"], k=3)[0]
    assert [i for i, _ in ranking] == [1, 3]  # the Danube holds neither term
    assert [s for _, s in ranking] == pytest.approx([(idf_alp + idf_begin) * tf_part(1), idf_alp * tf_part(3)], rel=1e-5)
    # a question of stopwords only keeps them, as for FTS5: "the" is in every passage, "where is it" in none
    assert [len(ranking) for ranking in reader.keywords(["the", "Where is it?"], k=3)] == [3, 0]
    assert reader.passages([3, 1, 99]) == {1: passages[0], 3: passages[2]}
    assert len(reader) == 3

    # the next save deletes what the documents file no longer holds, and checks the ids
    later = qdrant_store.open_writer(tmp_path, manifest_for(stored, passages=3), stored, 4, rebuild=False)
    later.describe(Settings())
    later.publish(tmp_path, manifest_for(stored, passages=2, generation=2), [1, 3])
    assert sorted(reader.passages([1, 2, 3])) == [1, 3]
    with pytest.raises(StoreError, match=r"passages without a point: \[7\].*was not updated"):
        later.publish(tmp_path, manifest_for(stored, passages=3, generation=3), [1, 3, 7])


def test_a_path_or_a_bare_host_is_refused_with_the_reason(tmp_path, capsys):
    with pytest.raises(StoreError, match="local on-disk mode stores points as pickles"):
        QdrantTarget(str(tmp_path / "qdrant-data"), "docs")
    with pytest.raises(StoreError, match=r"did you mean http://localhost:6333\?"):
        QdrantTarget("localhost:6333", "docs")
    with pytest.raises(StoreError, match="not a usable Qdrant collection name"):
        QdrantTarget.for_store(qdrant_store.MEMORY, tmp_path, "a/b")
    assert QdrantTarget.for_store("http://q:6333", tmp_path / "my docs.store").collection == "my_docs.store"

    corpus = write_jsonl(tmp_path / "docs.jsonl", sample_records(1))
    folder_path = tmp_path / "qdrant-data"
    assert main(["index", "build", str(corpus), "--store", str(tmp_path / "store"), "--qdrant", str(folder_path)]) == 2
    assert "pickles" in capsys.readouterr().err and not folder_path.exists() and not (tmp_path / "store").exists()
    assert main(["index", "build", str(corpus), "--store", str(tmp_path / "store"), "--collection", "docs"]) == 2
    assert "give --qdrant URL with it" in capsys.readouterr().err


def test_an_unreachable_server_is_named_with_what_to_check(tmp_path, capsys):
    folder = tmp_path / "store"
    folder.mkdir()
    write_manifest(folder, manifest_for({"name": "qdrant", "url": "http://127.0.0.1:1", "collection": "docs"}))
    with pytest.raises(StoreError, match=r"cannot reach Qdrant at http://127\.0\.0\.1:1 .*server is running.*port"):
        Retriever.open(folder)
    assert main(["index", "search", "where is the Rhine?", "--store", str(folder)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ragdec: error: cannot reach Qdrant at http://127.0.0.1:1") and "Traceback" not in err
    with pytest.raises(StoreError, match="cannot reach Qdrant at http://127.0.0.1:1"):
        qdrant_store.open_writer(tmp_path / "new", None, QdrantTarget("http://127.0.0.1:1", "docs").record(), 4, False)


def test_a_memory_store_opened_by_another_process_says_why(tmp_path):
    folder = tmp_path / "store"
    folder.mkdir()
    write_manifest(folder, manifest_for({"name": "qdrant", "url": ":memory:", "collection": "built-elsewhere"}))
    searched = subprocess.run([sys.executable, "-m", "ragdec.app.cli", "index", "search", "x", "--store", str(folder)],
                              capture_output=True, text=True, timeout=120)
    assert searched.returncode == 2, searched.stderr
    assert "lived only in the process that built it" in searched.stderr and "--rebuild --qdrant http://" in searched.stderr
    assert "Traceback" not in searched.stderr


def test_a_missing_qdrant_client_gives_the_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "qdrant_client", None)  # what `import` sees when it is not installed
    with pytest.raises(StoreError, match=r"pip install 'ragdec\[qdrant\]'"):
        qdrant_store.import_qdrant()


def test_ragdec_help_does_not_import_qdrant():
    imported = subprocess.run([sys.executable, "-c", "import sys; from ragdec.app.cli import build_parser; "
                               "build_parser().format_help(); print('qdrant_client' in sys.modules)"],
                              capture_output=True, text=True, timeout=120)
    assert imported.stdout.strip() == "False", imported.stderr


# --- with a real embedder: the same answers as FAISS ------------------------------------------


@pytest.fixture(scope="module")
def twin_stores(tmp_path_factory, minilm):
    """The repository's SQuAD sample built twice with all-minilm-l6-v2: FAISS, Qdrant :memory:."""
    root = tmp_path_factory.mktemp("twins")
    faiss_folder, qdrant_folder = root / "faiss", root / "qdrant"
    build([QA_DATA / "squad_passages.jsonl"], faiss_folder, embedder=minilm, progress=False)
    build([QA_DATA / "squad_passages.jsonl"], qdrant_folder, embedder=minilm, progress=False,
          qdrant=memory_target(qdrant_folder))
    return faiss_folder, qdrant_folder


def test_qdrant_answers_as_faiss_does(twin_stores, minilm):
    questions = [q["question"] for q in QUESTIONS]
    with Retriever.open(twin_stores[0], minilm) as faiss, Retriever.open(twin_stores[1], minilm) as qdrant:
        assert len(faiss) == len(qdrant) == 41
        for mode in ("dense", "bm25", "hybrid"):
            expected, found = faiss.search_batch(questions, k=5, mode=mode), qdrant.search_batch(questions, k=5, mode=mode)
            assert [[h.id for h in hits][:1] for hits in found] == [[h.id for h in hits][:1] for hits in expected], mode
            gold_at_5 = [[q["passage_id"] in [h.passage.record for h in hits] for q, hits in zip(QUESTIONS, ranked)]
                         for ranked in (expected, found)]
            assert gold_at_5[0] == gold_at_5[1], mode  # recall@5 question by question
            if mode == "dense":  # the same vectors, the same inner products
                assert [[h.id for h in hits] for hits in found] == [[h.id for h in hits] for hits in expected]
                assert [h.score for hits in found for h in hits] == pytest.approx(
                    [h.score for hits in expected for h in hits], abs=1e-5)
                assert found[0][0].passage == expected[0][0].passage  # the payload is the passage
            else:
                # BM25's idf differs (Qdrant's ln(1 + ...) against FTS5's ln(...)), which reorders
                # weak hits of the 41 passages; the top hits stand
                overlap = sum(len({h.id for h in a} & {h.id for h in b}) for a, b in zip(expected, found))
                assert overlap / (5 * len(questions)) >= 0.85, mode


def test_the_manifest_records_the_backend_and_only_it_is_needed_to_search(twin_stores, minilm, tmp_path):
    folder = twin_stores[1]
    manifest = read_manifest(folder)
    assert manifest.format == 2 and manifest.passages == 41 and manifest.index == {"kind": "qdrant", "distance": "dot"}
    assert set(manifest.backend) == {"name", "url", "collection", "bm25_avgdl"}
    assert manifest.backend["name"] == "qdrant" and manifest.backend["url"] == ":memory:"
    assert manifest.backend["collection"] == memory_target(folder).collection and manifest.backend["bm25_avgdl"] > 50
    assert manifest.embedder["name"] == "all-minilm-l6-v2"
    assert sorted(p.name for p in folder.iterdir()) == [".lock", "documents.1.sqlite", "manifest.json"]
    assert read_manifest(twin_stores[0]).format == 1 and read_manifest(twin_stores[0]).backend == {"name": "faiss"}

    replica = replica_searches_as_the_store(folder, minilm, tmp_path, QUESTIONS[0]["question"])
    with pytest.raises(StoreError, match="documents.1.sqlite is missing .*can be searched, not added to"):
        Retriever.open_for_writing(replica, minilm)


def test_moving_a_store_or_taking_a_collection_needs_rebuild(twin_stores, minilm, tmp_path):
    faiss_folder, qdrant_folder = twin_stores
    with pytest.raises(StoreError, match=r"keeps its passages in the FAISS index.*--rebuild --qdrant :memory:"):
        Retriever.open_for_writing(faiss_folder, minilm, qdrant=memory_target(tmp_path))
    taken = QdrantTarget.from_record(read_manifest(qdrant_folder).backend)
    with pytest.raises(StoreError, match="already holds a store that .* did not build.*--rebuild"):
        Retriever.open_for_writing(tmp_path / "another", minilm, qdrant=taken)


def test_saves_deletes_and_rebuilds_reach_the_collection(tmp_path, minilm):
    folder = tmp_path / "notes"
    target = memory_target(folder)
    reader, records, docs = saves_and_deletes_reach_a_reader(folder, target, minilm, tmp_path)

    client = reader.backend.client
    before = [c.name for c in client.get_collections().collections if c.name.startswith(target.collection)]
    assert len(before) == 1
    # a rebuild fills a new collection and moves the alias: an open reader sees the new corpus
    write_jsonl(docs, records[:3])
    assert build([docs], folder, embedder=minilm, progress=False, rebuild=True).passages_added == 3
    assert len(reader) == 3 and reader.search("Where does the Rhine begin?", k=1)[0].title in {r["title"] for r in records[:3]}
    after = [c.name for c in client.get_collections().collections if c.name.startswith(target.collection)]
    assert len(after) == 1 and after != before  # the old collection is gone
    assert read_manifest(folder).generation == 4
    reader.close()


def test_cli_builds_on_memory_and_searches_in_process(tmp_path, weights, capsys):
    weights("all-minilm-l6-v2")
    folder = tmp_path / f"cli-store-{tmp_path.name}"  # the collection takes the folder's name
    args = ["index", "build", str(QA_DATA / "squad_passages.jsonl"), "--store", str(folder), "--qdrant", ":memory:",
            "--model", "all-minilm-l6-v2", "--quiet", "--json", str(tmp_path / "build.json")]
    assert main(args) == 0
    assert f"Qdrant collection '{folder.name}' at :memory:" in capsys.readouterr().out
    report = json.loads((tmp_path / "build.json").read_text())
    assert report["passages_added"] == 41 and report["manifest"]["backend"]["collection"] == folder.name
    cli_finds_the_gold_and_builds_nothing_again(folder, tmp_path, QUESTIONS[:4], args)


def test_bench_measures_qdrant_beside_faiss(twin_stores, minilm, tmp_path):
    """``ragdec bench retrieval --backend faiss,qdrant`` on the sample: the FAISS store copied
    into Qdrant (same ids, same vectors) and measured alike; the copy is dropped after."""
    from ragdec.bench.retrieval import BENCH_COLLECTION, measure_backend, qdrant_beside

    texts, gold = [q["question"] for q in QUESTIONS], [q["passage_id"] for q in QUESTIONS]
    with Retriever.open(twin_stores[0], minilm) as faiss:
        faiss_measured = measure_backend(faiss, texts, gold, texts[:6])
        compared = qdrant_beside(faiss, tmp_path, texts, gold, texts[:6], ":memory:", faiss_measured)
    assert compared["qdrant"]["store"] == f"Qdrant collection '{BENCH_COLLECTION}' at :memory:"
    assert compared["qdrant"]["recall"]["e5"] == faiss_measured["recall"]["e5"]  # the same vectors
    assert set(compared["qdrant_minus_faiss_recall@5"]) == {"e5", "bm25", "hybrid"}
    assert all(abs(delta) <= 0.01 for delta in compared["qdrant_minus_faiss_recall@5"].values())
    assert compared["qdrant"]["latency_ms"]["bm25"]["queries"] == 6
    with pytest.raises(StoreError, match="lived only in the process"):  # dropped
        Retriever.open(tmp_path / "qdrant", minilm)
