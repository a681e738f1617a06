"""Helpers shared by the tests (pytest puts this folder on sys.path)."""

from __future__ import annotations

import contextlib
import copy
import hashlib
import http.client
import random
import shutil
import threading
import time

import pytest
import torch

from ragdec.decoding.generator import Generator


def hf_greedy(generator: Generator, prompt_ids, max_new_tokens: int, **kwargs) -> list[int]:
    input_ids = torch.tensor([prompt_ids])
    with torch.inference_mode():
        out = generator.model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            do_sample=False,
            max_new_tokens=max_new_tokens,
            pad_token_id=generator.tokenizer.pad_token_id or 0,
            **kwargs,
        )
    return out[0, len(prompt_ids) :].tolist()


def random_prompts(vocab_size: int, count: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(2, vocab_size) for _ in range(rng.randrange(1, 40))] for _ in range(count)]


def noisy_copy(model, noise: float, seed: int = 1):
    """The model with Gaussian noise on every weight: it agrees with the original on about
    60% of the tokens at noise 0.2, so drafts stand sometimes and roll back sometimes."""
    little = copy.deepcopy(model)
    rng = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in little.parameters():
            param.add_(torch.randn(param.shape, generator=rng) * noise * param.std())
    return little


def serving(start):
    """The PostgreSQL server ``start()`` gives, stopped after (``yield from`` it in a
    fixture); the test skips where the server's binaries are missing, which `make test` installs."""
    from postgres_server import MissingBinaries

    try:
        server = start()
    except MissingBinaries as error:
        pytest.skip(str(error))
    yield server
    server.stop()


def database_for_test(server, request, prefix: str):
    """The URL of a new empty database on ``server`` (tens of milliseconds), named after the
    test, dropped after (``yield from`` it in a fixture)."""
    name = prefix + hashlib.sha256(request.node.nodeid.encode()).hexdigest()[:20]
    yield server.create_database(name)
    server.drop_database(name)


def saves_and_deletes_reach_a_reader(folder, target, embedder, tmp_path):
    """Build the sample's 7 first paragraphs into store ``folder`` at ``target`` (a server
    backend's), then add a passage, save, remove it and save with a reader open beside:
    the reader sees each save and nothing before it.

    Returns:
        (the open reader, the records, the JSONL file built from), for the caller's rebuild.
    """
    from ragdec.retrieval.ingest import build
    from ragdec.retrieval.retriever import Retriever

    from retrieval_fixtures import sample_records, write_jsonl

    records = sample_records(1)  # the 7 articles' first paragraphs
    docs = write_jsonl(tmp_path / "docs.jsonl", records)
    assert build([docs], folder, embedder=embedder, progress=False, qdrant=target).passages_added == 7
    reader = Retriever.open(folder, embedder)
    with Retriever.open_for_writing(folder, embedder) as writer:
        harbour = "The harbour master logs every ship that enters after dark."
        ids = writer.add_texts([harbour], source="harbour")
        assert writer.add_texts([harbour], source="harbour") == ids  # stored once
        assert len(writer) == 8 and len(reader) == 7  # nothing is published before save
        writer.save()
        assert reader.search("who logs ships at night?", k=1, mode="hybrid")[0].passage.source == "harbour"
        assert writer.remove_source("harbour") == 1
        writer.save()
    assert len(reader) == 7 and all(h.passage.source != "harbour" for h in reader.search("harbour ship", k=7, mode="bm25"))
    return reader, records, docs


def replica_searches_as_the_store(folder, embedder, tmp_path, question: str):
    """A folder holding only the manifest of store ``folder`` (a server backend's), as on
    another machine: it has no documents file and finds what the store finds.

    Returns:
        the replica's folder.
    """
    from ragdec.retrieval.retriever import Retriever

    replica = tmp_path / "replica"
    replica.mkdir()
    shutil.copy(folder / "manifest.json", replica / "manifest.json")
    with Retriever.open(folder, embedder) as original, Retriever.open(replica, embedder) as copy:
        assert copy.documents is None
        assert [h.id for h in copy.search(question, k=5, mode="hybrid")] == [h.id for h in original.search(question, k=5, mode="hybrid")]
    return replica


def cli_finds_the_gold_and_builds_nothing_again(folder, tmp_path, questions, build_args: list[str]) -> None:
    """``ragdec index search`` on store ``folder`` (built by ``ragdec index build_args``) has
    each question's gold passage among its hybrid hits, and the same build run again writes
    no new generation."""
    import json

    from ragdec.app.cli import main
    from ragdec.retrieval.persistence import read_manifest

    for question in questions:
        assert main(["index", "search", question["question"], "--store", str(folder), "--mode", "hybrid",
                     "--json", str(tmp_path / "hits.json")]) == 0
        hits = json.loads((tmp_path / "hits.json").read_text())["hits"]
        assert question["passage_id"] in [h["record"] for h in hits], question
    assert main(build_args) == 0  # again: nothing changed, nothing written
    assert read_manifest(folder).generation == 1


# ---- live servers (ragdec.app.server.BackgroundServer) ----------------------------------------


def address(server) -> tuple[str, int]:
    """The (host, port) a live server listens on."""
    host, port = server.url.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


def head(server, method: str, path: str, **headers) -> bytes:
    """A request's head, to send on a raw socket; ``Content_Type="text/plain"`` is the header
    ``Content-Type: text/plain``."""
    host, port = address(server)
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}:{port}", *(f"{k.replace('_', '-')}: {v}" for k, v in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def health_status(server) -> int:
    """The status of one GET /health on a connection of its own; 0 where none came."""
    connection = http.client.HTTPConnection(*address(server), timeout=10)
    try:
        connection.request("GET", "/health")
        response = connection.getresponse()
        response.read()
        return response.status
    except (OSError, http.client.HTTPException):  # no answer at all: as bad as a slow one
        return 0
    finally:
        connection.close()


@contextlib.contextmanager
def health_answers(server, within: float = 1.0, every: float = 0.1):
    """/health polled from a thread every ``every`` seconds while the block runs; every
    answer must be a 200 within ``within`` seconds."""
    polled: list[tuple[int, float]] = []
    stop = threading.Event()

    def poll():
        while not stop.is_set():
            started = time.perf_counter()
            polled.append((health_status(server), time.perf_counter() - started))
            stop.wait(every)

    thread = threading.Thread(target=poll, name="health-poll", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(15)
    assert polled and all(status == 200 and seconds < within for status, seconds in polled), polled
