"""Retrieval pieces on their own: chunking, fusion, FTS queries, file readers, the FAISS
index (flat and IVF) and the SQLite store. Real libraries throughout, no model needed
except a real tokenizer."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest

from ragdec.retrieval.chunking import chunk_text
from ragdec.retrieval.fusion import reciprocal_rank_fusion
from ragdec.retrieval.index import IndexFileError, IndexSpec, VectorIndex, choose_spec
from ragdec.retrieval.readers import ReadOptions, SkippedFile, discover, read_documents
from ragdec.retrieval.store import DocumentStore, Passage, StoreFileError, content_hash, fts_query

from retrieval_fixtures import write_mixed_corpus


@pytest.fixture(scope="module")
def tokenizer(minilm):
    return minilm.tokenizer


def unit_vectors(n: int, d: int = 32, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


# --- chunking ---------------------------------------------------------------------------

def test_chunking_worked_example(tokenizer):
    chunks = chunk_text("a b c d e f g h i j", tokenizer, chunk_tokens=4, overlap_tokens=1)
    assert [c.text for c in chunks] == ["a b c d", "d e f g", "g h i j"]
    assert [c.position for c in chunks] == [0, 1, 2]


def test_chunks_are_exact_slices_within_budget_and_overlap(tokenizer):
    text = " ".join(f"Sentence number {i} talks about unbelievably longwinded tokenization." for i in range(40))
    chunks = chunk_text(text, tokenizer, chunk_tokens=50, overlap_tokens=10)
    assert len(chunks) > 5
    for chunk in chunks:
        assert text[chunk.start:chunk.end] == chunk.text
        assert len(tokenizer(chunk.text, add_special_tokens=False)["input_ids"]) <= 50
        assert not chunk.text.startswith("##")
    for before, after in zip(chunks, chunks[1:]):
        assert after.start < before.end  # overlap
        assert after.start > before.start  # progress
        assert text[after.start - 1].isspace()  # cuts fall between words
    assert chunks[0].start == 0 and chunks[-1].end == len(text)


def test_chunking_short_blank_and_bad_overlap(tokenizer):
    assert [c.text for c in chunk_text("  Short text.  ", tokenizer)] == ["Short text."]
    assert chunk_text(" \n\t ", tokenizer) == []
    with pytest.raises(ValueError, match="overlap_tokens"):
        chunk_text("x", tokenizer, chunk_tokens=4, overlap_tokens=4)


# --- fusion and keyword queries -----------------------------------------------------------

def test_reciprocal_rank_fusion_worked_example():
    fused = reciprocal_rank_fusion([[7, 3, 9], [3, 5]], k=4)
    assert [doc for doc, _ in fused] == [3, 7, 5, 9]
    assert fused[0][1] == pytest.approx(1 / 62 + 1 / 61)
    assert reciprocal_rank_fusion([[1, 2], [2, 1]], k=2, weights=[2.0, 1.0])[0][0] == 1
    with pytest.raises(ValueError):
        reciprocal_rank_fusion([[1]], k=1, weights=[1.0, 2.0])


def test_fts_query_quotes_words_and_drops_stopwords():
    assert fts_query('What is "NOT" in C++?') == '"not" OR "c"'
    assert fts_query("Who was it?") == '"who" OR "was" OR "it"'
    assert fts_query("?!") == ""


# --- readers ------------------------------------------------------------------------------

def test_readers_read_good_files_and_explain_bad_ones(tmp_path):
    files = write_mixed_corpus(tmp_path / "corpus")
    found, unsupported = discover([tmp_path / "corpus", files["ignored"]])
    assert files["ignored"].resolve() not in found and unsupported[0][0] == str(files["ignored"])
    assert {p.name for p in found} == {
        "squad.jsonl", "lighthouse.txt", "garden.md", "report.pdf", "empty.txt", "image.txt", "latin1.txt",
        "minified.md", "broken.pdf"}

    documents, notes = read_documents(files["jsonl"])
    assert len(documents) == 21 and not notes
    assert documents[0].record == "Warsaw#0" and documents[0].title == "Warsaw"
    assert read_documents(files["md"])[0][0].title == "Kitchen garden"
    assert "3.2 metres" in read_documents(files["pdf"])[0][0].text
    assert read_documents(files["pdf"])[0][0].record == "page 1"

    reasons = {
        "empty": "empty file", "binary": "binary file", "latin1": "not UTF-8",
        "huge_line": "a line of 250,000 characters", "bad_pdf": "unreadable PDF",
    }
    for name, reason in reasons.items():
        with pytest.raises(SkippedFile, match=reason):
            read_documents(files[name])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        discover([tmp_path / "missing"])


def test_jsonl_bad_lines_are_noted_and_skipped(tmp_path):
    path = tmp_path / "mixed.jsonl"
    long_record = json.dumps({"text": "word " * 50_000})
    path.write_text('{"text": "good one"}\nnot json\n{"body": "no text field"}\n\n{"text": "good two", "id": 5}\n'
                    + long_record + "\n")
    documents, notes = read_documents(path)
    assert [d.text for d in documents] == ["good one", "good two"]
    assert [d.record for d in documents] == ["line 1", "5"]
    assert any("not JSON" in n for n in notes) and any("--text-field" in n for n in notes)
    assert any("1 records are longer than 200,000 characters (line 6" in n for n in notes)
    assert len(read_documents(path, ReadOptions(max_line_chars=300_000))[0]) == 3
    documents, _ = read_documents(path, ReadOptions(text_field="body"))
    assert [d.text for d in documents] == ["no text field"]


# --- vector index -------------------------------------------------------------------------

def test_choose_spec_by_size():
    assert choose_spec(1000).kind == "flat"
    spec = choose_spec(100_000)
    assert (spec.kind, spec.nlist, spec.nprobe) == ("ivf", 1265, 31)
    assert choose_spec(10, "ivf").nlist == 1  # never fewer than 39 training points per cell
    with pytest.raises(ValueError, match="choose one of"):
        choose_spec(10, "hnsw")


@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_index_add_remove_upsert_search_save_load(tmp_path, kind):
    vectors = unit_vectors(2000)
    ids = np.arange(100, 2100)
    spec = IndexSpec("flat") if kind == "flat" else IndexSpec("ivf", nlist=16, nprobe=16)
    index = VectorIndex.build(ids, vectors, spec)
    assert len(index) == 2000
    _, found = index.search(vectors[:5], k=1)
    assert found[:, 0].tolist() == [100, 101, 102, 103, 104]

    assert index.remove([100, 101, 999_999]) == 2
    _, found = index.search(vectors[:1], k=3)
    assert 100 not in found[0]
    index.upsert([102], vectors[50:51])  # 102 now holds 150's vector
    scores, found = index.search(vectors[50:51], k=2)
    assert set(found[0]) == {102, 150} and scores[0, 1] == pytest.approx(1.0, abs=1e-5)
    assert len(index) == 1998

    stored_ids, stored_vectors = index.ids_and_vectors()
    order = np.argsort(stored_ids)
    assert stored_ids[order][:2].tolist() == [102, 103]
    np.testing.assert_allclose(stored_vectors[order][1], vectors[3])

    path = tmp_path / "index.faiss"
    index.save(path)
    loaded = VectorIndex.load(path, index.spec, 32)
    assert len(loaded) == 1998 and loaded.search(vectors[7:8], 1)[1][0, 0] == 107
    assert loaded.remove([107]) == 1  # deletes still work after a round trip

    other = index.convert(IndexSpec("flat") if kind == "ivf" else IndexSpec("ivf", 8, 8))
    assert len(other) == 1998 and other.search(vectors[9:10], 1)[1][0, 0] == 109


def test_index_edge_cases_and_damaged_file(tmp_path):
    index = VectorIndex.empty(32)
    scores, ids = index.search(unit_vectors(2), k=5)
    assert ids.shape == (2, 0)
    with pytest.raises(ValueError, match=r"vectors must be \[n, 32\]"):
        index.add([1], unit_vectors(1, d=16))
    index.add([1, 2], unit_vectors(2))
    assert index.search(unit_vectors(1), k=10)[1].shape == (1, 2)  # k capped at the size

    bad = tmp_path / "bad.faiss"
    bad.write_bytes(b"not a faiss index" * 10)
    with pytest.raises(IndexFileError, match="damaged"):
        VectorIndex.load(bad, IndexSpec("flat"), 32)
    with pytest.raises(FileNotFoundError):
        VectorIndex.load(tmp_path / "none.faiss", IndexSpec("flat"), 32)


def test_index_adds_and_searches_from_several_threads():
    index = VectorIndex.empty(32)
    vectors = unit_vectors(4000, seed=1)
    errors = []

    def writer(part: int):
        try:
            for start in range(part * 1000, (part + 1) * 1000, 50):
                index.add(np.arange(start, start + 50), vectors[start:start + 50])
        except Exception as error:  # pragma: no cover - reported below
            errors.append(error)

    def reader():
        try:
            for i in range(200):
                scores, ids = index.search(vectors[i:i + 1], 3)
                assert ids.shape[1] <= 3
        except Exception as error:  # pragma: no cover
            errors.append(error)

    threads = [threading.Thread(target=writer, args=(p,)) for p in range(4)] + [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(index) == 4000
    assert index.search(vectors[1234:1235], 1)[1][0, 0] == 1234


# --- document store -----------------------------------------------------------------------

def passage(pid: int, text: str, source: str = "a.txt", title: str = "") -> Passage:
    return Passage(pid, text, title, source, "", 0, content_hash(text))


def test_store_add_get_bm25_and_shared_passages(tmp_path):
    store = DocumentStore.open(tmp_path / "documents.sqlite")
    texts = ["The Rhine begins in the Swiss Alps.", "Warsaw is the capital of Poland.", "Tesla was born in 1856."]
    first = store.next_id()
    store.add([passage(first + i, t) for i, t in enumerate(texts)], [("a.txt", first + i) for i in range(3)])
    store.add([], [("b.txt", first + 1)])  # b.txt holds the Warsaw sentence too
    assert len(store) == 3 and store.next_id() == first + 3
    assert store.bm25("Where does the Rhine begin?", 2)[0][0] == first
    assert store.get([first + 2, 999])[first + 2].text == texts[2]
    assert store.ids_by_hash([content_hash("Warsaw  is the capital\nof Poland.")]) != {}

    assert sorted(store.forget_source("a.txt")) == [first, first + 2]  # Warsaw survives: b.txt links it
    assert len(store) == 1 and store.bm25("Rhine", 5) == []
    store.delete([first + 1])
    assert len(store) == 0 and store.next_id() == first + 3  # ids are never reused
    store.close()

    readonly = DocumentStore.open(tmp_path / "documents.sqlite", readonly=True)
    assert len(readonly) == 0
    readonly.close()


def test_store_refuses_damaged_files(tmp_path):
    bad = tmp_path / "bad.sqlite"
    bad.write_bytes(b"x" * 4096)
    with pytest.raises(StoreFileError, match="damaged or not a SQLite database"):
        DocumentStore.open(bad)
    import sqlite3

    other = tmp_path / "other.sqlite"
    sqlite3.connect(other).execute("create table t (x)").connection.commit()
    with pytest.raises(StoreFileError, match="not a ragdec document store"):
        DocumentStore.open(other, readonly=True)
