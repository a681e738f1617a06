"""The remote engine: the pipeline's prompt answered on an OpenAI-compatible server.

Fast lane: small real HTTP servers on 127.0.0.1 (http.server in a thread) that stream,
cut the stream, answer 429 or 503 before they answer, stay silent, refuse with a 400, or
are not there; `ragdec serve` in front of such a server; the command line's flags.
Full lane: a `ragdec serve` of smollm2 in a subprocess as the remote, whose answers equal
the in-process answers (greedy), through `ragdec ask`, a second `ragdec serve --engine
openai` (a chain of two servers) and the LangChain chat model.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from ragdec.bench.server_load import free_port, start_server
from ragdec.pipelines.engine import EngineError
from ragdec.pipelines.prompts import PLAIN_SYSTEM_PROMPT, build_prompt
from ragdec.pipelines.rag import RagPipeline, RagSettings, question_request
from ragdec.pipelines.remote import RemoteEngine, RemoteSettings, TokenEstimate, sse_events
from ragdec.pipelines.types import Request, collect

MODEL = "smollm2-135m-instruct"
FAST = RemoteSettings(backoff_s=0.05, read_timeout_s=5, timeout_s=20)  # a test's patience


# ---- scripted servers ---------------------------------------------------------------------------


class FakeServer:
    """An OpenAI-like server on 127.0.0.1 whose replies a test scripts: ``reply(handler,
    body)`` answers each POST (``in_turn`` gives one reply per request). ``bodies`` keeps
    what was posted; ``url`` is the API root."""

    def __init__(self, reply):
        self.reply = reply
        self.bodies: list[dict] = []
        self.release = threading.Event()  # a silent reply waits for this (set at exit)

    def __enter__(self) -> "FakeServer":
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.httpd.daemon_threads = True
        self.httpd.fake = self
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        return self

    def __exit__(self, *exc) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.fake.bodies.append(body)
        self.server.fake.reply(self, body)

    def log_message(self, *args):  # quiet
        pass


def in_turn(*replies):
    """The n-th request gets the n-th reply; the last repeats."""
    count = iter(range(1 << 30))

    def reply(handler, body):
        replies[min(next(count), len(replies) - 1)](handler, body)

    return reply


def event(text: str | None = None, finish: str | None = None, **extra) -> bytes:
    delta = {"content": text} if text is not None else {}
    body = {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}
    return f"data: {json.dumps(body)}\n\n".encode()


def sse(*texts: str, usage: dict | None = None, delay: float = 0.0, cut: str | None = None):
    """A streamed answer of ``texts``, with usage and [DONE]; ``cut``: stop after the texts
    by closing the connection ("close": a body that just ends; "chunked": a chunked body
    without its last chunk)."""

    def reply(handler, body):
        time.sleep(delay)
        handler.send_response(200)
        handler.send_header("Content-Type", "text/event-stream")
        chunked = cut != "close"
        handler.send_header("Transfer-Encoding" if chunked else "Connection", "chunked" if chunked else "close")
        handler.end_headers()
        parts = [event(t) for t in texts]
        if cut is None:
            parts += [event(finish="stop"), b"data: " + json.dumps({"choices": [], "usage": usage or {}}).encode() + b"\n\n",
                      b"data: [DONE]\n\n"]
        for part in parts:
            handler.wfile.write(b"%x\r\n%s\r\n" % (len(part), part) if chunked else part)
            handler.wfile.flush()
        if cut is None:
            handler.wfile.write(b"0\r\n\r\n")
        handler.close_connection = True

    return reply


def status(code: int, body, headers: dict | None = None):
    def reply(handler, _):
        raw = body.encode() if isinstance(body, str) else json.dumps(body).encode()
        handler.send_response(code)
        for name, value in (headers or {}).items():
            handler.send_header(name, value)
        handler.send_header("Content-Length", str(len(raw)))
        handler.end_headers()
        handler.wfile.write(raw)

    return reply


def silent(handler, _):
    handler.server.fake.release.wait(30)


def ask(engine, question: str = "What is the capital of France?", max_new_tokens: int = 8):
    return collect(RagPipeline(engine), [question_request(question, max_new_tokens=max_new_tokens)])[0]


# ---- the request, and the answer streamed back ------------------------------------------------


def test_the_server_gets_the_pipelines_messages_and_the_answer_streams_back_with_stats():
    history = [{"role": "user", "content": "Who wrote Hamlet?"}, {"role": "assistant", "content": "Shakespeare."}]
    usage = {"prompt_tokens": 41, "completion_tokens": 3, "total_tokens": 44, "prompt_tokens_details": {"cached_tokens": 32}}
    with FakeServer(sse("He was ", "born in ", "1564.", usage=usage)) as server:
        engine = RemoteEngine(server.url, "the-model", settings=FAST)
        request = Request([*history, {"role": "user", "content": "When was he born?"}], params=question_request("x", max_new_tokens=9).params)
        chunks = list(RagPipeline(engine).stream([request]))
    body, = server.bodies
    expected = build_prompt(TokenEstimate().prompt_ids, PLAIN_SYSTEM_PROMPT, history, "When was he born?", 3072).messages
    assert body["messages"] == list(expected) and body["messages"][0] == {"role": "system", "content": PLAIN_SYSTEM_PROMPT}
    assert body["model"] == "the-model" and body["max_tokens"] == 9 and body["temperature"] == 0
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert [c.text for c in chunks] == ["He was ", "born in ", "1564.", ""]
    last = chunks[-1]
    assert last.finish_reason == "stop" and last.info.method == "remote" and not last.info.error
    assert (last.stats.new_tokens, last.stats.prompt_tokens, last.stats.reused_prompt_tokens) == (3, 41, 32)
    assert 0 < last.stats.prefill_seconds <= last.stats.seconds and last.info.tokens_per_s > 0


def test_references_go_along_only_when_asked():
    """For a remote `ragdec serve` to copy from (LLMA): what the local engine would copy from."""
    history = [{"role": "user", "content": "Who wrote Hamlet?"}, {"role": "assistant", "content": "Shakespeare."}]
    request = Request([*history, {"role": "user", "content": "When was he born?"}], ("Born in 1564 in Stratford.",))
    with FakeServer(sse("1564.")) as server:
        for send in (False, True):
            engine = RemoteEngine(server.url, "m", settings=RemoteSettings(send_references=send))
            collect(RagPipeline(engine), [request])
    plain, sent = server.bodies
    assert "ragdec" not in plain
    assert sent["ragdec"] == {"references": ["Who wrote Hamlet?", "Shakespeare.", "Born in 1564 in Stratford."]}


def test_an_answer_asked_whole_instead_of_streamed():
    completion = {"choices": [{"index": 0, "message": {"role": "assistant", "content": "Paris."}, "finish_reason": "length"}],
                  "usage": {"prompt_tokens": 20, "completion_tokens": 2}}
    with FakeServer(status(200, completion)) as server:
        answer = ask(RemoteEngine(server.url, "m", settings=RemoteSettings(stream=False)))
    assert "stream_options" not in server.bodies[0] and server.bodies[0]["stream"] is False
    assert (answer.text, answer.finish_reason, answer.stats.new_tokens) == ("Paris.", "length", 2)


def test_token_estimate_and_sse_reader_examples():
    estimate = TokenEstimate()
    assert estimate.count_tokens("Where does the Rhine begin?") == 9
    assert len(estimate.prompt_ids([{"role": "user", "content": "Where does the Rhine begin?"}])) == 17
    assert estimate.count_tokens("東京") == 2  # 6 bytes of UTF-8: about a token a CJK character
    lines = ['data: {"a": 1}', "", ": keep-alive", b"data: [DONE]", 'data: {"after": "done"}']
    assert list(sse_events(lines)) == [{"a": 1}, None]


def test_the_loopback_benchmarks_overhead_figures_example():
    from ragdec.bench.qa import remote_overhead

    local = [{"seconds": 2.0, "ttft_s": 0.5, "text": "a"}, {"seconds": 4.0, "ttft_s": 0.7, "text": "b"}]
    remote = [{"seconds": 2.2, "ttft_s": 0.6, "text": "a"}, {"seconds": 4.1, "ttft_s": 0.8, "text": "c"}]
    figures = remote_overhead(local, remote, "greedy")
    assert figures["ratio_remote_to_in_process"] == pytest.approx(1.0625) and figures["overhead_ms"] == pytest.approx(150)
    assert (figures["seconds_in_process"], figures["seconds_remote"], figures["identical"]) == (3.0, 3.15, 0.5)


# ---- failures -----------------------------------------------------------------------------------


@pytest.mark.parametrize("cut", ["close", "chunked"])
def test_a_connection_dropped_mid_answer_ends_it_with_an_error_chunk(cut):
    with FakeServer(sse("The capital ", "is ", cut=cut)) as server:
        chunks = list(RagPipeline(RemoteEngine(server.url, "m", settings=FAST)).stream([question_request("Capital?")]))
    assert [c.text for c in chunks[:-1]] == ["The capital ", "is "]
    last = chunks[-1]
    assert last.finish_reason == "error" and last.info.engine_failed and last.info.method == "remote"
    assert "mid-answer" in last.info.error and server.url in last.info.error
    assert len(server.bodies) == 1  # text had come: never asked again


def test_429_with_retry_after_is_honoured_then_answered():
    busy = status(429, {"error": {"message": "too many requests"}}, {"Retry-After": "1"})
    with FakeServer(in_turn(busy, sse("Paris."))) as server:
        started = time.perf_counter()
        answer = ask(RemoteEngine(server.url, "m", settings=FAST))
    assert answer.text == "Paris." and len(server.bodies) == 2
    assert time.perf_counter() - started >= 0.95  # waited what Retry-After said, not the 0.05 s backoff


def test_503_is_retried_with_backoff_then_answered():
    unavailable = status(503, {"error": {"message": "loading the model"}})
    with FakeServer(in_turn(unavailable, unavailable, sse("Paris."))) as server:
        answer = ask(RemoteEngine(server.url, "m", settings=FAST))
    assert answer.text == "Paris." and len(server.bodies) == 3


def test_a_long_retry_after_is_capped_and_the_retries_end():
    settings = RemoteSettings(retries=2, max_wait_s=0.1, timeout_s=20)
    with FakeServer(status(429, {"error": {"message": "slow down"}}, {"Retry-After": "3600"})) as server:
        started = time.perf_counter()
        answer = ask(RemoteEngine(server.url, "m", settings=settings))
    assert time.perf_counter() - started < 5 and len(server.bodies) == 3
    assert answer.finish_reason == "error" and "429" in answer.info.error and "slow down" in answer.info.error
    assert "3 tries" in answer.info.error


def test_a_silent_server_times_out_quickly_with_a_clear_error():
    settings = RemoteSettings(read_timeout_s=0.5, timeout_s=20)
    with FakeServer(silent) as server:
        started = time.perf_counter()
        answer = ask(RemoteEngine(server.url, "m", settings=settings))
    assert time.perf_counter() - started < 5 and len(server.bodies) == 1  # a read timeout is not retried
    assert answer.finish_reason == "error" and answer.info.engine_failed
    assert "did not start answering" in answer.info.error and "0.5 s" in answer.info.error


@pytest.mark.parametrize("body, says", [
    ({"error": {"message": "This model's maximum context length is 2048 tokens", "type": "BadRequestError"}}, "maximum context length"),
    ({"object": "error", "message": "max_tokens must be at least 1"}, "max_tokens must be at least 1"),  # older vLLM
    ({"detail": "Not authenticated"}, "Not authenticated"),  # FastAPI
    ("upstream went away", "upstream went away"),  # a proxy's text
])
def test_an_error_status_carries_the_servers_message(body, says):
    with FakeServer(status(400, body)) as server:
        answer = ask(RemoteEngine(server.url, "m", settings=FAST))
    assert answer.finish_reason == "error" and "answered 400" in answer.info.error and says in answer.info.error
    assert len(server.bodies) == 1


def test_an_unreachable_server_is_named_with_what_to_check():
    url = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    engine = RemoteEngine(url, "m", settings=RemoteSettings(retries=1, backoff_s=0.05))
    answer = ask(engine)
    assert answer.finish_reason == "error" and answer.info.engine_failed
    assert f"cannot reach the remote engine at {url}" in answer.info.error and "2 tries" in answer.info.error
    assert "check that the server is running" in answer.info.error
    with pytest.raises(EngineError, match="cannot reach"):  # the engine alone raises; the pipeline turns it into a chunk
        list(engine.stream(build_prompt(engine.template, "s", [], "q", 100), question_request("q").params))


# ---- in front of it: `ragdec serve` and the command line ---------------------------------------


def serve_remote(url: str, **scheduling):
    """``create_app`` over a pipeline whose engine is the remote server at ``url``."""
    from ragdec.app.server import create_app

    pipeline = RagPipeline(RemoteEngine(url, "m", settings=FAST))
    return create_app(pipeline, "m", engine=pipeline.engine, **scheduling)


def test_serve_over_a_remote_engine_answers_concurrently_and_survives_a_cut():
    from ragdec.app.server import BackgroundServer

    in_flight = []  # requests the remote holds at once, as each arrives

    def reply(handler, body):
        if "cut" in body["messages"][-1]["content"]:
            return sse("The capital ", "is ", cut="close")(handler, body)
        in_flight.append(None)
        peak.append(len(in_flight))
        sse("Paris.", delay=1.5)(handler, body)
        in_flight.pop()

    peak: list[int] = []

    with FakeServer(reply) as remote, BackgroundServer(serve_remote(remote.url, max_batch=4)) as front:
        health = json.loads(urllib.request.urlopen(front.url + "/health", timeout=10).read())
        assert health["engine"]["kind"] == "remote" and health["engine"]["base_url"] == remote.url
        assert health["worker"]["batching"] is False  # the remote server batches, not this one

        def post(question: str, stream: bool = False):
            body = json.dumps({"model": "m", "messages": [{"role": "user", "content": question}], "stream": stream}).encode()
            request = urllib.request.Request(front.url + "/v1/chat/completions", body, {"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=30) as response:
                    return response.status, response.read()
            except urllib.error.HTTPError as error:
                return error.code, error.read()

        results = []
        threads = [threading.Thread(target=lambda: results.append(post("Capital of France?"))) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert max(peak) == 4  # the four 1.5-second answers were asked at once, not one after another
        assert [json.loads(b)["choices"][0]["message"]["content"] for _, b in results] == ["Paris."] * 4

        code, raw = post("Please cut this one.")  # whole: the engine's failure is a 502 with its message
        assert code == 502 and json.loads(raw)["error"]["code"] == "engine_failed" and "mid-answer" in json.loads(raw)["error"]["message"]
        code, raw = post("Please cut this one.", stream=True)  # streamed: the text so far, then an error event
        events = list(sse_events(raw.splitlines()))
        assert "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-2] if e.get("choices")) == "The capital is "
        assert "mid-answer" in events[-2]["error"]["message"] and events[-1] is None
        assert post("Capital of France?")[0] == 200  # and the server goes on


def test_ask_command_over_a_remote_engine_and_its_errors(capsys):
    from ragdec.app.cli import main

    with FakeServer(sse("Paris ", "[1].", usage={"prompt_tokens": 30, "completion_tokens": 4})) as server:
        code = main(["ask", "What is the capital of France?", "--engine", "openai", "--base-url", server.url,
                     "--remote-model", "m", "--no-cache"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "Paris [1]." in out and "[remote, cache off" in err and "4 tokens at" in err and "tokens/forward" not in err

    unreachable = f"http://127.0.0.1:{free_port()}/v1"
    code = main(["ask", "Why?", "--engine", "openai", "--base-url", unreachable, "--remote-model", "m", "--no-cache",
                 "--remote-retries", "0"])
    err = capsys.readouterr().err
    assert code == 2 and f"cannot reach the remote engine at {unreachable}" in err and "Traceback" not in err


@pytest.mark.parametrize("argv, says", [
    (["--engine", "openai"], "--engine openai needs --base-url URL and --remote-model NAME"),
    (["--base-url", "http://127.0.0.1:1/v1"], "add --engine openai"),
    (["--engine", "openai", "--base-url", "http://127.0.0.1:1/v1", "--remote-model", "m", "--method", "llma", "--copy-k", "4"],
     "--method, --copy-k: ragdec's in-process decoding"),
    (["--engine", "openai", "--base-url", "127.0.0.1:8000/v1", "--remote-model", "m"], "is not an http:// or https:// URL with a host"),
])
def test_engine_flags_that_do_not_fit_say_what_to_do(argv, says, capsys):
    from ragdec.app.cli import main

    assert main(["ask", "Why?", "--no-cache", *argv]) == 2
    assert says in capsys.readouterr().err


# ---- full lane: `ragdec serve` of smollm2 as the remote ---------------------------------------


@pytest.fixture(scope="module")
def backend(weights):
    """`ragdec serve` of smollm2 in a subprocess (greedy, one request at a time, float32 like
    the in-process ``smollm2`` fixture its answers are compared with): the API root."""
    port = free_port()
    server = start_server(port, weights(MODEL), ["--no-cache", "--max-batch", "1", "--method", "greedy", "--dtype", "float32"])
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.terminate()
        server.wait(30)


QUESTIONS = ["What is the capital of France?", "Name a planet of the solar system."]


def in_process(smollm2, question: str, max_new_tokens: int = 12) -> str:
    return collect(RagPipeline(smollm2), [question_request(question, method="greedy", max_new_tokens=max_new_tokens)])[0].text


@pytest.mark.parametrize("stream", [True, False])
def test_remote_answers_equal_the_in_process_answers(backend, smollm2, stream):
    from ragdec.decoding.generator import ChatTokenizer

    engine = RemoteEngine(backend, MODEL, tokenizer=ChatTokenizer(smollm2.tokenizer), settings=RemoteSettings(stream=stream))
    for question in QUESTIONS:
        answer = ask(engine, question, max_new_tokens=12)
        assert answer.finish_reason in ("stop", "length") and answer.info.method == "remote"
        assert answer.text == in_process(smollm2, question)
        assert answer.stats.forward_passes > 0 and answer.stats.new_tokens > 0  # the ragdec server tells its stats


def test_the_posted_messages_are_those_the_in_process_path_templates(smollm2):
    """History cut to a small prompt limit with the model's own tokenizer: the remote
    engine posts exactly the messages whose template the local engine decodes."""
    from ragdec.decoding.generator import ChatTokenizer

    history = [{"role": r, "content": f"turn {i} " + "word " * 30} for i, r in enumerate(["user", "assistant"] * 4)]
    request = Request([*history, {"role": "user", "content": "And now?"}], params=question_request("x", max_new_tokens=8).params)
    settings = RagSettings(max_prompt_tokens=200)
    with FakeServer(sse("ok")) as server:
        remote = collect(RagPipeline(RemoteEngine(server.url, MODEL, tokenizer=ChatTokenizer(smollm2.tokenizer), settings=FAST),
                                     settings=settings), [request])[0]
    local = build_prompt(smollm2.prompt_ids, PLAIN_SYSTEM_PROMPT, history, "And now?", 200)
    posted = server.bodies[0]["messages"]
    assert local.dropped_turns > 0 and remote.info.dropped_turns == local.dropped_turns
    assert posted == list(local.messages) and smollm2.prompt_ids(posted) == local.token_ids


def test_ask_over_a_store_keeps_retrieval_sources_and_the_cache_here(backend, smollm2, minilm, tmp_path, capsys):
    from app_fixtures import STORE_QUESTION, build_store

    from ragdec.app.cli import main
    from ragdec.cache.lookup import QACache
    from ragdec.retrieval.retriever import Retriever

    store = build_store(tmp_path, minilm)
    assert main(["ask", STORE_QUESTION, "--store", str(store), "--engine", "openai", "--base-url", backend, "--remote-model", MODEL,
                 "--model", MODEL, "--db", str(tmp_path / "qa.sqlite"), "--max-new-tokens", "12", "-k", "2",
                 "--remote-references", "--json", str(tmp_path / "answer.json")]) == 0  # the passages go as ragdec.references
    assert "[remote, cache miss" in capsys.readouterr().err
    answer, = json.loads((tmp_path / "answer.json").read_text())["answers"]
    assert answer["info"]["method"] == "remote" and answer["info"]["sources"]
    with Retriever.open(store, minilm) as retriever:
        local = collect(RagPipeline(smollm2, retriever, settings=RagSettings(k=2)),
                        [question_request(STORE_QUESTION, method="greedy", max_new_tokens=12)])[0]
        assert answer["answer"] == local.text
        assert [s["text"] for s in answer["info"]["sources"]] == [s.text for s in local.info.sources]

        # a finished answer is written back here, and the next asker is served from the cache
        cache = QACache.open(tmp_path / "write-back.sqlite", minilm)
        with FakeServer(sse("Tesla was born in 1856 [1].")) as server:
            pipeline = RagPipeline(RemoteEngine(server.url, "m", settings=FAST), retriever, cache, RagSettings(k=2))
            first, again = (collect(pipeline, [question_request(STORE_QUESTION)])[0] for _ in range(2))
        cache.close()
    assert (first.info.method, first.info.cache, again.info.method, again.info.cache) == ("remote", "miss", "cache", "exact")
    assert again.text == first.text and len(server.bodies) == 1
    assert "Passages:" in server.bodies[0]["messages"][-1]["content"]  # the numbered passages went with the question


def test_serve_with_a_remote_engine_in_front_of_another_serve(backend, smollm2, monkeypatch):
    """A chain of two servers; the front one may load no weights (the zoo refuses here)."""
    import openai

    from ragdec.app.langchain import ChatRagdec
    from ragdec.models.zoo import NO_WEIGHTS

    monkeypatch.setenv(NO_WEIGHTS, "1")  # the front's subprocess inherits it
    port = free_port()
    front = start_server(port, None, ["--engine", "openai", "--base-url", backend, "--remote-model", MODEL, "--no-cache"])
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=120)
        messages = [{"role": "user", "content": QUESTIONS[0]}]
        whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12)
        streamed = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, stream=True)
        text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
        expected = in_process(smollm2, QUESTIONS[0])
        assert whole.choices[0].message.content == text == expected
        assert whole.model_extra["ragdec"]["method"] == "remote" and whole.usage.completion_tokens > 0
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        connection.request("GET", "/health")
        assert json.loads(connection.getresponse().read())["engine"] == {
            "kind": "remote", "base_url": backend, "model": MODEL, "context_length": 4096, "tokenizer": "estimate"}
    finally:
        front.terminate()
        front.wait(30)
    chat = ChatRagdec(engine="openai", base_url=backend, remote_model=MODEL, max_tokens=12)
    reply = chat.invoke(QUESTIONS[0])
    assert reply.content == expected and reply.response_metadata["ragdec"]["method"] == "remote"
    assert reply.response_metadata["model_name"] == MODEL
