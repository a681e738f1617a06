"""Durability (issue 18): a store keeps its previous generation until the next one has been
read back and checked, so that a writer killed at any point, or a save that reads back
wrong, leaves the store as it was; a prepared model folder is checked at every load
(sizes) and by ``verify`` (hashes)."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ragdec.models import zoo
from ragdec.retrieval.ingest import build
from ragdec.retrieval.persistence import StoreError, read_manifest
from ragdec.retrieval.retriever import Retriever

from retrieval_fixtures import sample_records, write_jsonl

QUESTIONS = ("Who kept the lighthouse lamp burning?", "What grows between the tomatoes?", "Where did the black death originate?")


def snapshot(folder: Path, embedder) -> tuple[int, list[int], list[list[int]]]:
    """What a reader of the store sees: the generation, the passage ids, the hits of a few questions."""
    with Retriever.open(folder, embedder) as retriever:
        return (
            retriever.manifest.generation,
            retriever.documents.all_ids(),
            [[hit.id for hit in retriever.search(q, k=3, mode="hybrid")] for q in QUESTIONS],
        )


@pytest.fixture
def first_generation(tmp_path, minilm) -> Path:
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "lighthouse.txt").write_text("Agnes Moray kept the lighthouse lamp burning for forty-one years.", encoding="utf-8")
    (docs / "garden.md").write_text("# Garden\n\nBasil is planted between the tomatoes.\n", encoding="utf-8")
    write_jsonl(docs / "squad.jsonl", sample_records(2))
    build([docs], tmp_path / "store", embedder=minilm, progress=False)
    return tmp_path / "store"


def test_a_killed_index_build_leaves_the_previous_generation(first_generation, tmp_path, minilm):
    before = snapshot(first_generation, minilm)
    more = tmp_path / "more"
    more.mkdir()
    write_jsonl(more / "squad.jsonl", sample_records(1_000))  # every paragraph: seconds of embedding
    command = [sys.executable, "-m", "ragdec.app.cli", "index", "build", str(more), "--store", str(first_generation),
               "--model", "all-minilm-l6-v2", "--quiet"]
    writer = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    working = first_generation / f".documents.{before[0] + 1}.sqlite.partial"
    deadline = time.monotonic() + 120
    while not working.exists() and writer.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert writer.poll() is None, writer.stderr.read().decode()[-2000:]  # still writing: kill it mid-run
    time.sleep(1.0)  # into the embedding
    writer.send_signal(signal.SIGKILL)
    assert writer.wait() == -signal.SIGKILL  # killed, not finished
    writer.stderr.close()

    assert snapshot(first_generation, minilm) == before
    # and the next writer takes over: the lock died with the process, the leftovers go
    (tmp_path / "note.txt").write_text("Lighthouse keepers logged the weather every four hours.", encoding="utf-8")
    assert build([tmp_path / "note.txt"], first_generation, embedder=minilm, progress=False).passages_added == 1
    generation, ids, _ = snapshot(first_generation, minilm)
    assert generation == before[0] + 1 and set(before[1]) < set(ids)
    assert not any(p.name.endswith((".partial", ".tmp")) for p in first_generation.iterdir())


def test_a_save_that_reads_back_wrong_is_not_committed(first_generation, minilm):
    before = snapshot(first_generation, minilm)
    with Retriever.open_for_writing(first_generation, minilm) as retriever:
        retriever.add_texts(["Granite lighthouses outlast wooden ones by centuries."])
        # the counts still agree, the ids do not: a vector for a passage that is not stored
        victim = retriever.documents.all_ids()[0]
        vector = retriever.embed_passages([""], ["a stray vector"])
        retriever.backend.index.remove([victim])
        retriever.backend.index.add([10**9], vector)
        with pytest.raises(StoreError, match="nothing was committed"):
            retriever.save()
        assert retriever.documents.all_ids()  # still writable, as before the save
    assert snapshot(first_generation, minilm) == before
    assert read_manifest(first_generation).generation == before[0]
    assert sorted(p.name for p in first_generation.iterdir() if not p.name.startswith(".")) == [
        f"documents.{before[0]}.sqlite", f"index.{before[0]}.faiss", "manifest.json"
    ]


# ---- prepared model folders -------------------------------------------------------------------


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("RAGDEC_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture
def fake_model(tmp_path, monkeypatch, home) -> str:
    """A zoo entry whose package (installed by hand) holds a small sentence-transformers folder."""
    site = tmp_path / "site"
    folder = site / "ragdec_fake_st" / "model"
    folder.mkdir(parents=True)
    weights = bytes(range(256)) * 40
    (folder / "model.safetensors").write_bytes(weights)
    (folder / "config.json").write_text('{"hidden_size": 8}', encoding="utf-8")
    info = site / "ragdec_fake_st-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: ragdec-fake-st\nVersion: 1.0\n")
    digest = base64.urlsafe_b64encode(hashlib.sha256(weights).digest()).rstrip(b"=").decode()
    (info / "RECORD").write_text(f"ragdec_fake_st/model/model.safetensors,sha256={digest},{len(weights)}\n")
    spec = dataclasses.replace(
        zoo.MODELS["all-minilm-l6-v2"], name="fake-st", packages=("ragdec-fake-st==1.0",),
        files=("ragdec_fake_st/model/model.safetensors",), sha256=hashlib.sha256(weights).hexdigest(),
        size_bytes=len(weights),
    )
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setitem(zoo.MODELS, spec.name, spec)
    monkeypatch.delenv(zoo.NO_WEIGHTS, raising=False)  # fake weights: nothing to guard
    return spec.name


def test_a_damaged_model_folder_is_refused_at_load_and_named_by_verify(fake_model, home):
    folder = zoo.prepare(fake_model, progress=False)
    manifest = json.loads((folder / zoo.MANIFEST).read_text())
    assert set(manifest["files"]) == {"model.safetensors", "config.json"}
    assert manifest["files"]["model.safetensors"]["bytes"] == 10_240
    assert zoo.verify(fake_model).ok and zoo.verify(fake_model).checked == 2

    # a byte changed in place: the size check at load cannot see it, verify can
    weights = folder / "model.safetensors"
    weights.write_bytes(b"\xff" + weights.read_bytes()[1:])
    assert zoo.resolve(fake_model) == str(folder)
    assert zoo.verify(fake_model).problems == ("model.safetensors: SHA-256 differs from the manifest's (same size: damaged in place)",)

    # a truncated file: refused at load with the command that repairs it
    weights.write_bytes(weights.read_bytes()[:1000])
    assert zoo.model_status(fake_model) == "damaged"
    with pytest.raises(zoo.ZooError, match=f"ragdec models prepare {fake_model}` again") as error:
        zoo.resolve(fake_model)
    assert "model.safetensors has 1,000 bytes, the manifest 10,240" in str(error.value)
    assert zoo.verify(fake_model).problems == ("model.safetensors has 1,000 bytes, the manifest 10,240",)

    assert zoo.prepare(fake_model, progress=False) == folder  # prepares again
    assert zoo.verify(fake_model).ok and zoo.model_status(fake_model) == "prepared"


def test_a_folder_prepared_before_the_file_records_says_so(fake_model, home):
    folder = zoo.prepare(fake_model, progress=False)
    manifest = json.loads((folder / zoo.MANIFEST).read_text())
    del manifest["files"]
    (folder / zoo.MANIFEST).write_text(json.dumps(manifest))
    assert zoo.resolve(fake_model) == str(folder)  # nothing to compare: loads as before
    result = zoo.verify(fake_model)
    assert not result.ok and result.checked == 0
    assert "prepared before ragdec recorded" in result.problems[0] and f"ragdec models prepare {fake_model}" in result.problems[0]
    with pytest.raises(zoo.ZooError, match="not prepared"):
        zoo.verify("smollm2-135m-instruct")


@pytest.mark.usefixtures("weights")  # copies all-minilm-l6-v2 out of its package
def test_a_truncated_real_model_file_is_refused_by_the_embedder(home):
    from ragdec.retrieval.embedder import Embedder

    name = "all-minilm-l6-v2"
    folder = zoo.prepare(name, progress=False)
    assert folder == home / "models" / name  # the temporary home, not ~/.cache/ragdec
    assert zoo.verify(name).ok
    weights = folder / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    with pytest.raises(zoo.ZooError, match=f"damaged .*model.safetensors has .*ragdec models prepare {name}` again"):
        Embedder(name)
    assert any("model.safetensors has" in line for line in zoo.verify(name).problems)


def test_models_verify_command(fake_model, home, capsys):
    from ragdec.app.cli import main

    folder = zoo.prepare(fake_model, progress=False)
    assert main(["models", "verify", fake_model]) == 0
    assert f"{fake_model}: ok (2 files as prepared)" in capsys.readouterr().out
    (folder / "config.json").write_text("{}", encoding="utf-8")
    assert main(["models", "verify"]) == 1  # every prepared model: here the fake one
    out = capsys.readouterr().out
    assert "config.json has 2 bytes, the manifest 18" in out and f"prepare it again: ragdec models prepare {fake_model}" in out
