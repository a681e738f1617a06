"""A store folder end to end with a real embedder (all-minilm-l6-v2): ingestion of good and
bad files, incremental re-runs, search modes, persistence, crash safety, refusals."""

from __future__ import annotations

import json
import shutil
import threading

import pytest

from ragdec.retrieval.ingest import build, ingest
from ragdec.retrieval.persistence import EmbedderMismatch, Settings, StoreError, read_manifest
from ragdec.retrieval.retriever import Retriever

from retrieval_fixtures import sample_records, store_backend, write_jsonl, write_mixed_corpus  # noqa: F401 (a fixture)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_mixed_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def built(tmp_path_factory, corpus, minilm):
    """The mixed corpus built once: (store folder, report, warnings)."""
    folder = tmp_path_factory.mktemp("store") / "store"
    warnings: list[str] = []
    with Retriever.open_for_writing(folder, minilm) as retriever:
        report = ingest(retriever, [corpus["jsonl"].parent], progress=False, warn=warnings.append)
        retriever.save()
    return folder, report, warnings


def test_build_indexes_good_files_and_names_the_bad_ones(built, corpus):
    folder, report, warnings = built
    assert report.files_indexed == 4  # jsonl, txt, md, pdf
    skipped = dict(report.files_skipped)
    for name in ("empty", "binary", "latin1", "huge_line", "bad_pdf"):
        assert str(corpus[name].resolve()) in skipped
        assert any(str(corpus[name].resolve()) in w for w in warnings)
    assert report.passages_added >= 21 + 3
    manifest = read_manifest(folder)
    assert manifest.passages == report.passages_added
    assert manifest.embedder["name"] == "all-minilm-l6-v2" and manifest.embedder["dimension"] == 384
    assert manifest.index["kind"] == "flat"
    assert sorted(p.name for p in folder.iterdir()) == [".lock", "documents.1.sqlite", "index.1.faiss", "manifest.json"]


def test_search_modes_find_the_right_passage(built, minilm):
    folder, _, _ = built
    with Retriever.open(folder, minilm) as retriever:
        for mode in ("dense", "bm25", "hybrid"):
            hits = retriever.search("Who kept the lighthouse lamp burning?", k=3, mode=mode)
            assert hits[0].passage.source.endswith("lighthouse.txt"), mode
            assert [h.rank for h in hits] == list(range(1, len(hits) + 1))
            assert all(a.score >= b.score for a, b in zip(hits, hits[1:]))
        pdf_hit = retriever.search("storm surge measured at the tidal observatory", k=1)[0]
        assert pdf_hit.passage.record == "page 1" and "3.2 metres" in pdf_hit.text
        squad = retriever.search("In what country is Normandy located?", k=3, mode="hybrid")
        assert "Normans#0" in [h.passage.record for h in squad]
        with pytest.raises(ValueError, match="unknown search mode"):
            retriever.search("x", mode="sparse")


def test_incremental_rebuild_adds_only_new_or_changed(tmp_path, minilm, store_backend):
    docs = tmp_path / "docs"
    docs.mkdir()
    records = sample_records(2)
    write_jsonl(docs / "a.jsonl", records[:8])
    (docs / "b.txt").write_text("Granite lighthouses outlast wooden ones by centuries.", encoding="utf-8")
    folder = tmp_path / "store"
    first = build([docs], folder, embedder=minilm, progress=False, qdrant=store_backend(folder))
    assert first.files_indexed == 2

    again = build([docs], folder, embedder=minilm, progress=False)  # the backend is the stored one
    assert (again.files_indexed, again.files_unchanged, again.passages_added) == (0, 2, 0)
    assert read_manifest(folder).generation == 1  # nothing changed, nothing written

    with Retriever.open_for_writing(folder, minilm) as writer:  # the documents file, whatever the backend
        stored = writer.documents.get(writer.documents.all_ids()).values()
        old_chunks = sum(p.record == records[3]["id"] for p in stored)  # a long paragraph is 2 chunks
    # change one record of a.jsonl, add a file that repeats a passage: only the new text is embedded
    changed = [dict(r) for r in records[:8]]
    changed[3]["text"] = "An entirely new paragraph about the migration of arctic terns."
    write_jsonl(docs / "a.jsonl", changed)
    (docs / "c.txt").write_text("Granite lighthouses outlast wooden ones by centuries.", encoding="utf-8")
    third = build([docs], folder, embedder=minilm, progress=False)
    assert (third.files_indexed, third.files_unchanged) == (2, 1)
    assert third.passages_added == 1 and third.passages_removed == old_chunks
    # the kept chunks of a.jsonl, and c.txt's copy of b.txt
    assert third.duplicates == (first.passages_added - 1 - old_chunks) + 1
    with Retriever.open(folder, minilm) as retriever:
        assert len(retriever) == first.passages_added - old_chunks + 1
        for mode in ("dense", "bm25", "hybrid"):
            assert "arctic terns" in retriever.search("arctic tern migration", k=1, mode=mode)[0].text

    # b.txt vanishes: its passage stays while c.txt holds the same text; pruning c too removes it
    (docs / "b.txt").unlink()
    pruned = build([docs], folder, embedder=minilm, progress=False, prune=True)
    assert (pruned.files_removed, pruned.passages_removed) == (1, 0)
    (docs / "c.txt").unlink()
    pruned = build([docs], folder, embedder=minilm, progress=False, prune=True)
    assert (pruned.files_removed, pruned.passages_removed) == (1, 1)
    assert read_manifest(folder).passages == first.passages_added - old_chunks
    with Retriever.open(folder, minilm) as retriever:  # the backend forgot them too
        assert len(retriever) == first.passages_added - old_chunks
        assert all("Granite" not in hit.text for hit in retriever.search("granite lighthouses", k=5, mode="bm25"))


def test_another_embedder_is_refused_with_a_fix(built, e5):
    folder, _, _ = built
    with pytest.raises(EmbedderMismatch, match=r"built with embedder 'all-minilm-l6-v2'.*--model all-minilm-l6-v2.*--rebuild"):
        Retriever.open(folder, e5)


def test_unsaved_or_crashed_writes_leave_the_previous_index(built, tmp_path, minilm):
    folder = tmp_path / "store"
    shutil.copytree(built[0], folder)
    before = read_manifest(folder)
    with Retriever.open_for_writing(folder, minilm) as writer:
        writer.add_texts(["A passage that is never saved."])
        assert len(writer) == before.passages + 1
        # a crash between writing the next generation's files and the manifest
        writer.backend.index.save(folder / f"index.{before.generation + 1}.faiss")
        with pytest.raises(StoreError, match="being written by another process"):
            Retriever.open_for_writing(folder, minilm)
        with Retriever.open(folder, minilm) as reader:  # readers are never blocked
            assert len(reader) == before.passages
    assert read_manifest(folder) == before
    with Retriever.open(folder, minilm) as reader:
        assert reader.search("A passage that is never saved.", k=1)[0].text != "A passage that is never saved."
    with Retriever.open_for_writing(folder, minilm) as writer:  # the next writer tidies up
        assert not (folder / f"index.{before.generation + 1}.faiss").exists()
        ids = writer.add_texts(["Saved this time.", "Saved this time.", "And another."])
        assert ids[0] == ids[1] != ids[2]
        manifest = writer.save()
    assert manifest.generation == before.generation + 1 and manifest.passages == before.passages + 2
    assert not (folder / before.index_file).exists() and not (folder / before.documents_file).exists()


def test_damaged_files_give_a_rebuild_hint(built, tmp_path, minilm):
    folder = tmp_path / "store"
    shutil.copytree(built[0], folder)
    manifest = read_manifest(folder)
    index_file = folder / manifest.index_file
    index_file.write_bytes(index_file.read_bytes()[:1000])  # truncated
    with pytest.raises(StoreError, match=r"damaged.*ragdec index build PATH\.\.\. --store .* --rebuild"):
        Retriever.open(folder, minilm)
    (folder / "manifest.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(StoreError, match="manifest.json is damaged"):
        Retriever.open(folder, minilm)
    with pytest.raises(FileNotFoundError, match="no index in"):
        Retriever.open(tmp_path / "nowhere", minilm)


def test_rebuild_and_index_kind_change(tmp_path, minilm):
    docs = write_jsonl(tmp_path / "docs.jsonl", sample_records(1))
    folder = tmp_path / "store"
    build([docs], folder, embedder=minilm, progress=False)
    build([docs], folder, embedder=minilm, settings=Settings(index_kind="ivf", nprobe=2), progress=False)
    manifest = read_manifest(folder)
    assert manifest.index["kind"] == "ivf" and manifest.generation == 2  # settings alone trigger a save
    with Retriever.open(folder, minilm) as retriever:
        assert retriever.backend.index.spec.kind == "ivf" and retriever.backend.index.nprobe == 1  # nlist 1 for 7 passages
        assert retriever.search("Where does the Rhine begin?", k=1)[0].title == "Rhine"
    report = build([docs], folder, embedder=minilm, rebuild=True, progress=False)
    assert report.passages_added == 7 and read_manifest(folder).index["kind"] == "flat"


def test_concurrent_adds_and_searches(tmp_path, minilm):
    folder = tmp_path / "store"
    errors = []
    with Retriever.open_for_writing(folder, minilm) as retriever:
        retriever.add_texts([r["text"] for r in sample_records(1)], source="seed")

        def add(worker: int):
            try:
                for i in range(3):
                    retriever.add_texts([f"Worker {worker} note {i}: the tide table for pier {worker * 10 + i}."],
                                        source=f"worker-{worker}")
            except Exception as error:  # pragma: no cover - reported below
                errors.append(error)

        def search():
            try:
                for _ in range(5):
                    assert retriever.search("tide table for the pier", k=3, mode="hybrid")
            except Exception as error:  # pragma: no cover
                errors.append(error)

        threads = [threading.Thread(target=add, args=(w,)) for w in range(2)] + [threading.Thread(target=search)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors
        assert len(retriever) == len(retriever.documents) == 7 + 6
        retriever.save()
    assert json.loads((folder / "manifest.json").read_text())["passages"] == 13
