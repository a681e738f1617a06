"""The server with continuous batching (``create_app(max_batch=...)``) on a live loopback
port: concurrent answers equal the same questions asked alone; a flood past the queue
bound gets 429s with Retry-After; a request past its deadline ends with a clear error;
clients leaving free their rows; /health reports the batch and the worker's liveness."""

from __future__ import annotations

import json
import threading
import time

import pytest
from app_fixtures import pipeline, store  # noqa: F401 - fixtures
from test_app_server import MODEL, ask, direct, get, get_status, open_request, post

from ragdec.decoding.methods import GenerationParams

QUESTIONS = [
    "Who was Nikola Tesla?",
    "Where did the black death originate?",
    "In what country is Normandy located?",
    "What was Maria Curie the first female recipient of?",
    "What is Warsaw?",
    "Name a river.",
]


def serve(pipeline, **scheduling):
    from ragdec.app.server import BackgroundServer, create_app

    app = create_app(pipeline, MODEL, engine=pipeline.engine, retriever=pipeline.retriever,
                     defaults=GenerationParams(max_new_tokens=10, method="auto"), **scheduling)
    return BackgroundServer(app)


def body(question: str, **extra) -> dict:
    return {"model": MODEL, "messages": ask(question), "max_tokens": 10, **extra}


def test_batched_answers_equal_answers_alone(pipeline):
    expected = {q: direct(pipeline, ask(q), 10) for q in QUESTIONS}
    results: dict[str, object] = {}
    with serve(pipeline, max_batch=4) as server:
        def client(question: str, method: str):
            status, answer = post(server, "/v1/chat/completions", body(question, ragdec={"method": method}))
            results[question] = answer["choices"][0]["message"]["content"] if status == 200 else answer

        # greedy and llma rows (auto copies from the passage) in one batch: both are lossless
        threads = [threading.Thread(target=client, args=(q, ("greedy", "auto")[i % 2])) for i, q in enumerate(QUESTIONS)]
        for thread in threads:
            thread.start()
        peak = 0
        while any(t.is_alive() for t in threads):
            health = get(server, "/health")
            peak = max(peak, health["batch"]["rows"])
            time.sleep(0.05)
        health = get(server, "/health")
    assert health["worker"] == {"live": True, "threads": 4, "batching": True}
    assert health["jobs"]["done"] >= len(QUESTIONS) and health["jobs"]["failed"] == 0
    assert peak >= 2  # requests really decoded together
    for question in QUESTIONS:
        assert results[question] == expected[question], question


def test_flood_past_the_queue_gets_429_with_retry_after(pipeline):
    with serve(pipeline, max_batch=2, max_queue=2) as server:
        statuses: list[int] = []
        retry_after: list[str] = []
        errors: list[dict] = []

        def client(i: int):
            connection = open_request(server, body(f"Tell me about number {i}.", max_tokens=24))
            response = connection.getresponse()
            statuses.append(response.status)
            if response.status == 429:
                retry_after.append(response.getheader("Retry-After"))
                errors.append(json.loads(response.read()))
            else:
                response.read()
            connection.close()

        threads = [threading.Thread(target=client, args=(i,)) for i in range(12)]
        for thread in threads:
            thread.start()
        while any(t.is_alive() for t in threads):
            started = time.perf_counter()
            get(server, "/health")
            assert time.perf_counter() - started < 1.0  # /health answers throughout
            time.sleep(0.05)
        health = get(server, "/health")
    assert 429 in statuses and set(statuses) <= {200, 429}
    assert all(value and int(value) >= 1 for value in retry_after)
    assert errors[0]["error"]["code"] == "rate_limit_exceeded" and errors[0]["error"]["type"] == "rate_limit_error"
    assert health["jobs"]["refused"] == statuses.count(429)


def test_a_request_past_its_deadline_ends_with_504(pipeline):
    with serve(pipeline, max_batch=2, request_timeout=0.5) as server:
        status, answer = post(server, "/v1/chat/completions", body("Write a long story about a lighthouse.", max_tokens=300,
                                                                    ragdec={"method": "greedy"}))
        assert status == 504 and answer["error"]["code"] == "timeout"
        deadline = time.monotonic() + 60
        while get(server, "/health")["batch"]["rows"]:
            assert time.monotonic() < deadline, "the expired request kept its row"
            time.sleep(0.1)
        assert get(server, "/health")["jobs"]["expired"] == 1


def test_a_client_leaving_mid_batch_frees_its_row_and_others_go_on(pipeline):
    expected = direct(pipeline, ask(QUESTIONS[1]), 10)
    with serve(pipeline, max_batch=3) as server:
        long = open_request(server, body("Write a long story about a lighthouse.", max_tokens=300, stream=True, ragdec={"method": "greedy"}))
        response = long.getresponse()
        assert response.readline().startswith(b"data: ")
        status, answer = post(server, "/v1/chat/completions", body(QUESTIONS[1]))
        response.close()
        long.close()
        deadline = time.monotonic() + 60
        while get(server, "/health")["batch"]["rows"]:
            assert time.monotonic() < deadline, "the row of the client that left was not freed"
            time.sleep(0.1)
    assert status == 200 and answer["choices"][0]["message"]["content"] == expected


def test_health_reports_a_dead_worker(pipeline):
    with serve(pipeline, max_batch=2) as server:
        pipeline.engine.scheduler.close()  # the batch thread is gone
        status, health = get_status(server, "/health")
    assert status == 503 and health["status"] == "down" and health["worker"]["live"] is False
