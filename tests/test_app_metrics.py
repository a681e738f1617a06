"""GET /metrics and POST /v1/embeddings against a live `ragdec serve` app (real sockets)."""

from __future__ import annotations

import base64
import threading

import httpx
import numpy as np
import pytest
from app_fixtures import store  # noqa: F401 - a module-scoped fixture
from conftest import tiny_causal_lm
from prometheus_client.parser import text_string_to_metric_families

from ragdec.decoding.generator import Generator
from ragdec.pipelines.rag import RagPipeline


@pytest.fixture(scope="module")
def pipeline(tiny_tokenizer):
    return RagPipeline(Generator(tiny_causal_lm("llama", len(tiny_tokenizer)), tiny_tokenizer, name="tiny-llama"))


def serve(pipeline, **settings):
    from ragdec.app.server import BackgroundServer, create_app

    return BackgroundServer(create_app(pipeline, "tiny", context_length=512, **settings))


def scrape(url: str, **headers) -> dict[str, float]:
    """Every sample of /metrics, by name and labels: {'ragdec:x_total{a="b"}': value}."""
    response = httpx.get(url + "/metrics", headers=headers, timeout=30)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples


def ask(url: str, text: str, stream: bool = False) -> dict:
    body = {"model": "tiny", "messages": [{"role": "user", "content": text}], "max_tokens": 12, "stream": stream,
            "ragdec": {"method": "greedy"}}
    if not stream:
        response = httpx.post(url + "/v1/chat/completions", json=body, timeout=120)
        assert response.status_code == 200, response.text
        return response.json()["usage"]
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=120) as response:
        assert response.status_code == 200
        assert any(line.startswith("data: [DONE]") for line in response.iter_lines())
    return {}


def test_metrics_count_the_requests_sent_while_they_run(pipeline):
    with serve(pipeline, max_batch=2) as server:
        before = scrape(server.url)
        assert before['ragdec:request_success_total{finished_reason="stop"}'] == 0
        assert before["ragdec:num_requests_running"] == 0
        usages, scrapes = [], []
        done = threading.Event()

        def scraper():  # scrapes while the answers are being decoded: the page must always parse
            while not done.is_set():
                scrapes.append(scrape(server.url))

        watcher = threading.Thread(target=scraper)
        watcher.start()
        threads = [threading.Thread(target=lambda i=i: usages.append(ask(server.url, f"question {i}", stream=i % 2 == 1)))
                   for i in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        done.set()
        watcher.join()
        bad = httpx.post(server.url + "/v1/chat/completions", json={"model": "tiny", "messages": []}, timeout=30)
        assert bad.status_code == 400
        after = scrape(server.url)

    assert scrapes, "no scrape ran while the requests did"
    finished = sum(v for k, v in after.items() if k.startswith("ragdec:request_success_total{"))
    assert finished == 6
    assert after["ragdec:e2e_request_latency_seconds_count"] == 6
    assert after["ragdec:request_queue_time_seconds_count"] == 6
    assert after["ragdec:time_to_first_token_seconds_count"] <= 6
    assert after['ragdec:request_failure_total{status="400"}'] == 1
    whole = [u for u in usages if u]
    assert after["ragdec:generation_tokens_total"] >= sum(u["completion_tokens"] for u in whole) > 0
    assert after["ragdec:prompt_tokens_total"] >= sum(u["prompt_tokens"] for u in whole) > 0
    assert after['ragdec:qa_cache_requests_total{outcome="off"}'] == 6
    assert after["ragdec:num_requests_running"] == 0 and after["ragdec:num_requests_waiting"] == 0


def test_metrics_need_the_key_unless_public(pipeline):
    with serve(pipeline, api_key="k3y") as server:
        assert httpx.get(server.url + "/metrics").status_code == 401
        assert "ragdec:e2e_request_latency_seconds_bucket" in httpx.get(
            server.url + "/metrics", headers={"Authorization": "Bearer k3y"}).text
    with serve(pipeline, api_key="k3y", metrics_public=True) as server:
        assert httpx.get(server.url + "/metrics").status_code == 200
        assert httpx.get(server.url + "/v1/models").status_code == 401  # only /metrics was opened


def test_embeddings_need_a_store(pipeline):
    with serve(pipeline) as server:
        response = httpx.post(server.url + "/v1/embeddings", json={"input": "hello"})
    assert response.status_code == 400 and "--store" in response.json()["error"]["message"]


@pytest.fixture(scope="module")
def store_server(store, pipeline):  # noqa: F811 - the fixture imported above
    from ragdec.app.server import BackgroundServer, create_app

    with BackgroundServer(create_app(pipeline, "tiny", retriever=store, context_length=512, max_body_kb=64)) as server:
        yield server


def test_embeddings_equal_the_vectors_the_store_holds(store, store_server):  # noqa: F811
    from openai import OpenAI

    texts = ["The Rhine begins in the Swiss Alps.", "Nikola Tesla was born in 1856."]
    client = OpenAI(base_url=store_server.url + "/v1", api_key="none")
    result = client.embeddings.create(model=store.embedder.info.name, input=texts, encoding_format="float")
    got = np.array([item.embedding for item in result.data], dtype=np.float32)
    assert np.array_equal(got, store.embedder.embed_passages(texts))
    assert result.usage.prompt_tokens > len(texts)
    # base64, as the openai client asks by default: the same float32 bytes
    raw = httpx.post(store_server.url + "/v1/embeddings", json={"input": texts[0], "encoding_format": "base64"}).json()
    vector = np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), dtype="<f4")
    assert np.array_equal(vector, store.embedder.embed_passages(texts[:1])[0])
    # a question, embedded as the store searches with it
    query = httpx.post(store_server.url + "/v1/embeddings", json={"input": ["where is the Rhine?"], "input_type": "query"}).json()
    assert np.array_equal(np.array(query["data"][0]["embedding"], dtype=np.float32),
                          store.embedder.embed_queries(["where is the Rhine?"])[0])


@pytest.mark.parametrize("body, status, says", [
    ({"input": ["x"] * 300}, 400, "limit of 256"),
    ({"input": "word " * 5000}, 400, "tokens, over the"),
    ({"input": []}, 400, "non-empty list"),
    ({"input": [1, 2, 3]}, 400, "token ids"),
    ({"input": "x", "input_type": "document"}, 400, "input_type"),
    ({"input": "x", "encoding_format": "int8"}, 400, "encoding_format"),
    ({"input": "x", "model": "text-embedding-3-small"}, 404, "does not embed here"),
])
def test_embeddings_refuse_what_they_cannot_do(store_server, body, status, says):
    response = httpx.post(store_server.url + "/v1/embeddings", json=body)
    assert response.status_code == status and says in response.json()["error"]["message"], response.text


def test_embeddings_are_bounded_like_chat(store_server):
    response = httpx.post(store_server.url + "/v1/embeddings", json={"input": "x" * (80 * 1024)})
    assert response.status_code == 413
