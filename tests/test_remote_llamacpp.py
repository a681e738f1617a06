"""The remote engine against a third party's server: llama-cpp-python's OpenAI-compatible
server (``python -m llama_cpp.server``, tests/llamacpp_server.py) on the zoo's GGUF of
smollm2, the very weights ragdec's float32 folder was dequantized from.

Full lane (the ``weights`` fixture): answers streamed and whole through ``RemoteEngine``
and ``RagPipeline``, through `ragdec ask --engine openai`, with the sources retrieved here;
a prompt over the server's context; the server killed mid-answer; and the equality: what
the server answers at temperature 0 equals llama-cpp-python's own completion of the same
messages in this process. `ragdec bench qa --engine openai` with a local method beside it.

Fast lane: streams no conforming server sends (llama.cpp won't produce them), from a
scripted server (tests/test_remote_engine.py's), end the answer with an error, never a
traceback or a hang; tests/test_remote_engine.py covers streams cut short.
"""

from __future__ import annotations

import json
import threading
import time

import pytest
from test_remote_engine import FakeServer, event

from ragdec.pipelines.rag import RagPipeline, RagSettings, question_request
from ragdec.pipelines.remote import RemoteEngine, RemoteSettings
from ragdec.pipelines.types import collect

MODEL = "smollm2-135m-instruct"
QUESTIONS = ["What is the capital of France?", "Name a planet of the solar system.", "Who wrote Hamlet?"]


# ---- fast lane: malformed streams ---------------------------------------------------------------


def stream_of(*parts: bytes, pause: float = 0.0):
    """A 200 whose body is ``parts`` as they are (a body that ends by closing the connection),
    ``pause`` seconds apart."""

    def reply(handler, body):
        handler.send_response(200)
        handler.send_header("Content-Type", "text/event-stream")
        handler.send_header("Connection", "close")
        handler.end_headers()
        for part in parts:
            handler.wfile.write(part)
            handler.wfile.flush()
            if handler.server.fake.release.wait(pause):
                return
        handler.close_connection = True

    return reply


def keep_alive_forever(handler, body):
    """Comments every 0.1 s and never an event: a server stuck behind its lock, pinging."""
    handler.send_response(200)
    handler.send_header("Content-Type", "text/event-stream")
    handler.send_header("Connection", "close")
    handler.end_headers()
    try:
        while not handler.server.fake.release.wait(0.1):
            handler.wfile.write(b": ping\r\n\r\n")
            handler.wfile.flush()
    except OSError:  # the client gave up
        pass


MALFORMED = {
    "not json": (event("Par") + b"data: {\"choices\": [{\"delta\": {\"content\": \"is\"\n\n", "not an OpenAI chat completion"),
    "choices not a list": (event("Par") + b'data: {"choices": "is"}\n\n', "not an OpenAI chat completion"),
    "delta not an object": (event("Par") + b'data: {"choices": [{"delta": "is"}]}\n\n', "not an OpenAI chat completion"),
    "an event that is a list": (event("Par") + b"data: [1, 2]\n\n", "not an OpenAI chat completion"),
    "an html page": (b"<html><body>502 Bad Gateway</body></html>\n", "closed the stream mid-answer"),
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_a_malformed_stream_ends_the_answer_with_an_error(name):
    body, says = MALFORMED[name]
    settings = RemoteSettings(read_timeout_s=5, timeout_s=20, retries=0)
    with FakeServer(stream_of(body)) as server:
        started = time.perf_counter()
        chunks = list(RagPipeline(RemoteEngine(server.url, "m", settings=settings)).stream([question_request("Capital?")]))
    assert time.perf_counter() - started < 10
    last = chunks[-1]
    assert last.finish_reason == "error" and last.info.engine_failed, name
    assert says in last.info.error and server.url in last.info.error
    assert "".join(c.text for c in chunks[:-1]) in ("", "Par")  # what came before the fault, and nothing after


def test_a_server_that_only_pings_is_ended_by_the_total_timeout():
    """Keep-alive comments reset the read timeout (llama-cpp-python's server pings while a
    request waits for its lock); the answer's total timeout must still end it."""
    settings = RemoteSettings(read_timeout_s=5, timeout_s=1.5, retries=0)
    result = []
    with FakeServer(keep_alive_forever) as server:
        engine = RemoteEngine(server.url, "m", settings=settings)
        asker = threading.Thread(target=lambda: result.append(collect(RagPipeline(engine), [question_request("Capital?")])[0]),
                                 daemon=True)
        asker.start()
        asker.join(15)
        assert not asker.is_alive(), "the answer hung past its total timeout"
    answer, = result
    assert answer.finish_reason == "error" and "1.5 s" in answer.info.error and "--remote-timeout" in answer.info.error
