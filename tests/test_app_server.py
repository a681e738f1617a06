"""The OpenAI-compatible server on a live loopback port, driven by the official `openai`
client: answers streamed and not, ragdec's extra fields, bad requests, a client that
leaves mid-stream, concurrent requests kept apart, the FAQ mode, the command."""

from __future__ import annotations

import http.client
import json
import threading
import time
import urllib.request

import openai  # a test dependency (pip install -e '.[test]')
import pytest
from app_fixtures import STORE_QUESTION, pipeline, store  # noqa: F401 - fixtures

from ragdec.decoding.methods import GenerationParams
from ragdec.pipelines.types import Request, collect

MODEL = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def server(pipeline, store):
    from ragdec.app.server import BackgroundServer, create_app

    app = create_app(pipeline, MODEL, engine=pipeline.engine, retriever=store,
                     defaults=GenerationParams(max_new_tokens=12, method="auto"))
    with BackgroundServer(app) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="not-needed", max_retries=0, timeout=120)


def post(server, path: str, body, raw: bool = False) -> tuple[int, dict]:
    data = body if raw else json.dumps(body).encode()
    request = urllib.request.Request(server.url + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def get_status(server, path: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(server.url + path, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def get(server, path: str) -> dict:
    status, body = get_status(server, path)
    assert status == 200, body
    return body


def direct(pipeline, messages, max_new_tokens=12) -> str:
    """The pipeline's own answer, for comparison with what the server sends."""
    answer, = collect(pipeline, [Request(messages, params=GenerationParams(max_new_tokens=max_new_tokens, method="auto"))])
    return answer.text


def ask(question: str) -> list[dict]:
    return [{"role": "user", "content": question}]


# ---- answers --------------------------------------------------------------------------------


def test_models_health_and_the_web_page(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    health = get(server, "/health")
    assert health["status"] == "ok" and health["model"] == MODEL and health["mode"] == "rag"
    with urllib.request.urlopen(server.url + "/", timeout=30) as response:
        page = response.read().decode()
    assert "<title>ragdec chat</title>" in page and "/v1/chat/completions" in page
    assert 'src="http' not in page and 'href="http' not in page  # no CDN: the machine may be offline


def test_answer_with_sources_and_stats_equals_the_pipelines(server, client, pipeline):
    response = client.chat.completions.create(model=MODEL, messages=ask(STORE_QUESTION), max_tokens=12)
    choice = response.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    assert choice.message.content == direct(pipeline, ask(STORE_QUESTION))
    ragdec = response.model_extra["ragdec"]
    assert ragdec["method"] == "llma" and ragdec["cache"] == "off"
    assert ragdec["sources"][0]["title"] == "Nikola Tesla" and ragdec["sources"][0]["number"] == 1
    assert ragdec["stats"]["new_tokens"] == response.usage.completion_tokens > 0
    assert response.usage.prompt_tokens == ragdec["stats"]["prompt_tokens"]
    assert response.id.startswith("chatcmpl-") and response.model == MODEL


def test_streamed_answer_matches_and_ends_with_ragdecs_figures(server, client):
    messages = ask("Who was Nikola Tesla?")
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12).choices[0].message.content
    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole and len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1  # streamed in pieces
    assert chunks[0].choices[0].delta.role == "assistant"
    finish = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finish) == 1 and finish[0].model_extra["ragdec"]["sources"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    assert len({c.id for c in chunks}) == 1


def test_raw_stream_ends_with_done(server):
    body = {"model": MODEL, "messages": ask("Hello"), "max_tokens": 4, "stream": True}
    connection = http.client.HTTPConnection(server.url.removeprefix("http://"), timeout=60)
    connection.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    response = connection.getresponse()
    assert response.status == 200 and response.getheader("content-type").startswith("text/event-stream")
    events = [e for e in response.read().decode().split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    connection.close()


def test_history_and_n_copies(server, client, pipeline):
    messages = [{"role": "system", "content": "Answer in one short sentence."}, *ask("Who was Nikola Tesla?"),
                {"role": "assistant", "content": "Nikola Tesla was an inventor."}, *ask("When was he born?")]
    response = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, n=2, temperature=0.7)
    assert [c.index for c in response.choices] == [0, 1]
    assert response.choices[0].message.content == response.choices[1].message.content == direct(pipeline, messages, 10)
    assert response.model_extra["ragdec"]["ignored"] == ["temperature"]  # greedy: said, not silently dropped
    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, n=2, stream=True)
    texts = {0: "", 1: ""}
    for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
    assert texts[0] == texts[1] == response.choices[0].message.content


def test_retrieve_returns_the_stores_passages(server):
    status, body = post(server, "/v1/retrieve", {"query": STORE_QUESTION, "k": 2})
    assert status == 200 and len(body["data"]) == 2
    assert body["data"][0]["title"] == "Nikola Tesla" and body["data"][0]["rank"] == 1
    assert post(server, "/v1/retrieve", {"query": "x", "k": 0})[1]["error"]["param"] == "k"
    assert post(server, "/v1/retrieve", {"query": "x", "mode": "magic"})[1]["error"]["param"] == "mode"


# ---- bad requests -----------------------------------------------------------------------------


@pytest.mark.parametrize("body, status, param, code", [
    (b"{not json", 400, None, "invalid_json"),
    ({"messages": ask("hi")}, 400, "model", None),
    ({"model": MODEL}, 400, "messages", None),
    ({"model": MODEL, "messages": []}, 400, "messages", None),
    ({"model": "gpt-4o", "messages": ask("hi")}, 404, "model", "model_not_found"),
    ({"model": MODEL, "messages": [{"role": "assistant", "content": "hi"}]}, 400, "messages", None),
    ({"model": MODEL, "messages": [{"role": "tool", "content": "3"}]}, 400, "messages.[0].role", None),
    ({"model": MODEL, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400, "messages.[0].content", None),
    ({"model": MODEL, "messages": ask("hi"), "max_tokens": 0}, 400, "max_tokens", None),
    ({"model": MODEL, "messages": ask("hi"), "max_tokens": 10**6}, 400, "max_tokens", None),
    ({"model": MODEL, "messages": ask("hi"), "n": 99}, 400, "n", None),
    ({"model": MODEL, "messages": ask("hi"), "stop": 5}, 400, "stop", None),
    ({"model": MODEL, "messages": ask("hi"), "tools": [{"type": "function"}]}, 400, "tools", None),
    ({"model": MODEL, "messages": ask("hi"), "ragdec": {"method": "no-such-method"}}, 400, "ragdec.method", None),
    ({"model": MODEL, "messages": ask("why " * 12_000)}, 400, "messages", "context_length_exceeded"),
    ({"model": MODEL, "messages": ask("why " * 12_000), "stream": True}, 400, "messages", "context_length_exceeded"),
])
def test_bad_requests_get_openai_style_errors(server, body, status, param, code):
    got, answer = post(server, "/v1/chat/completions", body, raw=isinstance(body, bytes))
    assert got == status, answer
    error = answer["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["type"] == "invalid_request_error" and error["param"] == param and error["code"] == code


def test_the_official_client_raises_its_own_errors_and_the_server_goes_on(server, client):
    with pytest.raises(openai.NotFoundError, match="does not exist here"):
        client.chat.completions.create(model="gpt-4o", messages=ask("hi"))
    with pytest.raises(openai.BadRequestError, match="prompt limit"):
        client.chat.completions.create(model=MODEL, messages=ask("why " * 12_000))
    status, body = get_status(server, "/nowhere")
    assert status == 404 and body["error"]["code"] == "not_found"
    assert client.chat.completions.create(model=MODEL, messages=ask("Hello"), max_tokens=3).choices[0].message.content


def open_request(server, body: dict) -> http.client.HTTPConnection:
    connection = http.client.HTTPConnection(server.url.removeprefix("http://"), timeout=60)
    connection.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    return connection


def test_clients_leaving_mid_stream_or_while_queued_stop_their_decodes(server, client):
    before = get(server, "/health")["jobs"]
    long = {"model": MODEL, "messages": ask("Write a long story about a lighthouse."), "max_tokens": 400,
            "ragdec": {"method": "greedy"}}
    streaming = open_request(server, {**long, "stream": True})
    response = streaming.getresponse()
    assert response.status == 200
    assert response.readline().startswith(b"data: ")  # the stream has begun
    waiting = open_request(server, long)  # queued behind the stream, then its client leaves too
    waiting.close()
    response.close()  # the streaming client goes away, mid-answer
    streaming.close()
    deadline = time.monotonic() + 120
    while get(server, "/health")["jobs"]["cancelled"] < before["cancelled"] + 2:
        assert time.monotonic() < deadline, "the decodes were not cancelled"
        time.sleep(0.2)
    assert get(server, "/health")["jobs"]["done"] == before["done"]  # neither ran to its end
    assert client.chat.completions.create(model=MODEL, messages=ask("Hello"), max_tokens=3).choices[0].message.content


def test_concurrent_requests_are_queued_and_kept_apart(server, pipeline):
    questions = ["Who was Nikola Tesla?", "Where did the black death originate?", "In what country is Normandy located?",
                 "What was Maria Curie the first female recipient of?"]
    expected = {q: direct(pipeline, ask(q), 8) for q in questions}
    results: dict[str, str] = {}

    def one(question):
        status, body = post(server, "/v1/chat/completions", {"model": MODEL, "messages": ask(question), "max_tokens": 8})
        results[question] = body["choices"][0]["message"]["content"] if status == 200 else f"error {status}"

    threads = [threading.Thread(target=one, args=(q,)) for q in questions * 2]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    assert results == expected  # each answer is its own question's (greedy: the same text every time)


# ---- FAQ mode and the command ----------------------------------------------------------------


def test_faq_mode_serves_curated_answers_and_generates_otherwise(tmp_path, smollm2, minilm):
    from ragdec.app.faq_pipeline import FaqPipeline
    from ragdec.app.server import BackgroundServer, create_app
    from ragdec.cache.faq import FaqService, import_faq
    from ragdec.cache.lookup import QACache

    faq = tmp_path / "faq.jsonl"
    faq.write_text(json.dumps({"question": "How do I reset my password?", "answers": ["Open Settings, then Security, then Reset password."]}) + "\n")
    cache = QACache.open(tmp_path / "faq.sqlite", minilm)
    import_faq(cache, faq)
    service = FaqService(cache, model=MODEL, max_new_tokens=8)
    service._generator = smollm2  # the session's loaded model
    with BackgroundServer(create_app(FaqPipeline(service), MODEL, mode="faq")) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="not-needed", max_retries=0)
        served = client.chat.completions.create(model=MODEL, messages=ask("How do I reset my password?"))
        assert served.choices[0].message.content == "Open Settings, then Security, then Reset password."
        assert served.model_extra["ragdec"]["method"] == "cache" and served.model_extra["ragdec"]["cache"] == "exact"
        generated = client.chat.completions.create(model=MODEL, messages=ask("What is the capital of France?"), max_tokens=8)
        extra = generated.model_extra["ragdec"]
        assert extra["method"] == "llma" and extra["cache"] in ("miss", "near") and extra["stats"]["new_tokens"] > 0
        assert get(server, "/health")["mode"] == "faq"
        assert post(server, "/v1/retrieve", {"query": "x"})[1]["error"]["code"] == "no_store"
    cache.close()


def test_serve_command_builds_its_app_and_says_what_is_wrong(store, tmp_path, capsys):
    from ragdec.app.cli import build_parser, main
    from ragdec.app.cli_serve import build_app

    args = build_parser().parse_args(["serve", "--store", str(store.folder), "--model", MODEL, "--no-cache", "--port", "0"])
    app = build_app(args)
    assert {r.path for r in app.routes} >= {"/", "/health", "/v1/models", "/v1/chat/completions", "/v1/retrieve"}
    assert main(["serve", "--faq-db", str(tmp_path / "none.sqlite"), "--model", MODEL]) == 2
    assert "ragdec faq import" in capsys.readouterr().err
    assert main(["serve", "--faq-db", str(tmp_path / "x.sqlite"), "--store", str(store.folder)]) == 2
    assert "drop --store" in capsys.readouterr().err
