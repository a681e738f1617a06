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
from test_bench_qa import data  # noqa: F401 - the fixture: a few SQuAD questions and paragraphs
from test_remote_engine import FakeServer, event

from ragdec.pipelines.rag import RagPipeline, RagSettings, question_request
from ragdec.pipelines.remote import RemoteEngine, RemoteSettings
from ragdec.pipelines.types import collect

MODEL = "smollm2-135m-instruct"
QUESTIONS = ["What is the capital of France?", "Name a planet of the solar system.", "Who wrote Hamlet?"]
N_CTX = 2048  # the llama.cpp server's context; the engine is told it, except where a test tells it more
MAX_NEW = 24  # tokens per answer: enough for a sentence, few enough for two CPU cores


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
    "an html page": (b"<html><body>502 Bad Gateway</body></html>\n", "ended the stream before any text"),
    "[DONE] without a finish reason": (event("Par") + b"data: [DONE]\n\n", "ended the stream mid-answer after 3 characters"),
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


# ---- full lane: llama-cpp-python's server on the zoo's GGUF ---------------------------------------


@pytest.fixture(scope="module")
def gguf(weights):
    """The zoo's verified GGUF of smollm2 (the source of the float32 folder); skips where
    llama-cpp-python's server is not installed, which `make test` installs."""
    from llamacpp_server import MissingServer, check_installed

    from ragdec.models import zoo

    try:
        check_installed()
    except MissingServer as error:
        pytest.skip(str(error))
    return zoo.gguf_file(weights(MODEL), progress=False)


@pytest.fixture(scope="module")
def llamacpp(gguf):
    """One server for the module's tests that leave it running."""
    from llamacpp_server import LlamaCppServer

    with LlamaCppServer.start(gguf, MODEL, n_ctx=N_CTX) as server:
        yield server


@pytest.fixture(scope="module")
def tokenizer(weights):
    """smollm2's own tokenizer, so the pipeline measures prompts as the server's model will."""
    from ragdec.decoding.generator import ChatTokenizer

    return ChatTokenizer.load(weights(MODEL))


def engine_on(server, tokenizer, **settings) -> RemoteEngine:
    return RemoteEngine(server.url, server.alias, tokenizer=tokenizer, settings=RemoteSettings(context_length=N_CTX, **settings))


def posted_messages(tokenizer, question: str) -> list:
    """The messages the pipeline posts for a question without history or store."""
    from ragdec.pipelines.prompts import PLAIN_SYSTEM_PROMPT, build_prompt

    return list(build_prompt(tokenizer.prompt_ids, PLAIN_SYSTEM_PROMPT, [], question, N_CTX - MAX_NEW).messages)


def test_answers_equal_llama_cpp_pythons_own_on_the_same_requests(gguf, tokenizer):
    """What is compared, on a server of its own: its answers to a sequence of requests, and
    llama-cpp-python's own completions of the same messages in this process, in the same
    order. The order matters: llama.cpp keeps the previous prompt's cache and reads only
    the rest of the next one, and its CPU kernels give a row other bits in another batch
    (bench/results/llamacpp_verify.json: bitwise_equal_rows), enough to turn a greedy pick.

    1. The first request, asked for repeat_penalty 1.0 beside temperature 0: plain greedy,
       equal to the benchmarks' llamacpp-greedy (``run_llamacpp``) on ragdec's own template
       of the messages (the same prompt tokens: the server's usage counts them).
    2. Then through the remote engine, streamed and whole: temperature 0 is all it asks for,
       so the server adds its default repeat penalty, and its own completion gets that same
       penalty (llamacpp_server.SERVER_REPEAT_PENALTY).
    """
    import httpx
    import llama_cpp
    from llamacpp_server import SERVER_REPEAT_PENALTY, LlamaCppServer

    from ragdec.bench.llamacpp import run_llamacpp

    with LlamaCppServer.start(gguf, MODEL, n_ctx=N_CTX) as server:
        own, fresh = llama_cpp.Llama(**server.llama_settings()), llama_cpp.Llama(**server.llama_settings())

        def own_answer(messages, repeat_penalty: float) -> str:
            completion = own.create_chat_completion(messages, temperature=0, max_tokens=MAX_NEW, repeat_penalty=repeat_penalty)
            return completion["choices"][0]["message"]["content"]

        messages = posted_messages(tokenizer, QUESTIONS[0])
        served = httpx.post(server.url + "/chat/completions", timeout=120, json={
            "model": MODEL, "messages": messages, "max_tokens": MAX_NEW, "temperature": 0, "repeat_penalty": 1.0}).json()
        prompt_ids = tokenizer.prompt_ids(messages)
        eos = frozenset({fresh.token_eos(), *tokenizer.tokenizer.convert_tokens_to_ids(["<|im_end|>"])})
        greedy = run_llamacpp(fresh, prompt_ids, MAX_NEW, eos)
        assert served["usage"]["prompt_tokens"] == len(prompt_ids)
        assert served["choices"][0]["message"]["content"] == own_answer(messages, 1.0) == tokenizer.decode_text(greedy.token_ids)

        for stream in (True, False):
            engine = engine_on(server, tokenizer, stream=stream)
            for question in QUESTIONS:
                answer = collect(RagPipeline(engine), [question_request(question, max_new_tokens=MAX_NEW)])[0]
                assert answer.finish_reason in ("stop", "length") and not answer.info.error and answer.info.method == "remote"
                assert 0 < answer.stats.new_tokens <= MAX_NEW and answer.info.tokens_per_s > 0
                assert answer.text == own_answer(posted_messages(tokenizer, question), SERVER_REPEAT_PENALTY), (stream, question)
            engine.close()
        own.close()
        fresh.close()


def test_ask_command_over_llama_cpp_with_sources_retrieved_here(llamacpp, tokenizer, minilm, tmp_path, capsys):
    """`ragdec ask --engine openai` over a store: the passages retrieved here go in the
    prompt and come back as the answer's sources."""
    from app_fixtures import STORE_QUESTION, build_store

    from ragdec.app.cli import main
    from ragdec.retrieval.retriever import Retriever

    store = build_store(tmp_path, minilm)
    assert main(["ask", STORE_QUESTION, "--store", str(store), "--engine", "openai", "--base-url", llamacpp.url,
                 "--remote-model", MODEL, "--model", MODEL, "--remote-context", str(N_CTX), "--no-cache",
                 "--max-new-tokens", str(MAX_NEW), "-k", "2", "--json", str(tmp_path / "answer.json")]) == 0
    out, err = capsys.readouterr()
    assert "[remote, cache off" in err and "Sources:" in out
    answer, = json.loads((tmp_path / "answer.json").read_text())["answers"]
    assert answer["info"]["method"] == "remote" and answer["answer"] and answer["answer"] in out
    with Retriever.open(store, minilm) as retriever:
        expected = [hit.passage.text for hit in retriever.search(STORE_QUESTION, k=2)]
    assert [s["text"] for s in answer["info"]["sources"]] == expected and "Tesla" in expected[0]
    # the passages went with the question: the prompt is that much longer than the question's alone
    alone = len(tokenizer.prompt_ids(posted_messages(tokenizer, STORE_QUESTION)))
    assert answer["stats"]["prompt_tokens"] > alone + sum(tokenizer.count_tokens(text) for text in expected) - 10


def test_a_prompt_over_the_servers_context_is_refused_with_a_clear_error(llamacpp, tokenizer):
    question = "Summarize these words: " + "river mountain valley " * 1000  # about 3,000 tokens, over the 2,048
    # told the server's context: ragdec refuses before asking
    told = collect(RagPipeline(engine_on(llamacpp, tokenizer)), [question_request(question, max_new_tokens=MAX_NEW)])[0]
    assert told.finish_reason == "error" and "over the prompt limit" in told.info.error
    # told a larger one than the server has: the server refuses, and its reason comes through
    for stream in (True, False):
        engine = RemoteEngine(llamacpp.url, MODEL, tokenizer=tokenizer, settings=RemoteSettings(context_length=8192, stream=stream))
        refused = collect(RagPipeline(engine), [question_request(question, max_new_tokens=MAX_NEW)])[0]
        assert refused.finish_reason == "error" and refused.info.engine_failed
        if stream:  # the server fails after its 200 and closes the stream: no reason comes, the hint says where to look
            assert "ended the stream before any text" in refused.info.error and "--remote-context" in refused.info.error
        else:
            assert "answered 400" in refused.info.error and f"maximum context length is {N_CTX} tokens" in refused.info.error
    # and the server goes on answering
    assert collect(RagPipeline(engine), [question_request(QUESTIONS[0], max_new_tokens=4)])[0].finish_reason == "length"


def test_the_server_killed_mid_answer_ends_it_with_an_error(gguf, tokenizer):
    """Its own server: killed (SIGKILL) after the first text, the answer ends with an error
    naming the cut, at once; the next question finds nothing there."""
    from llamacpp_server import LlamaCppServer

    with LlamaCppServer.start(gguf, MODEL, n_ctx=N_CTX) as server:
        engine = engine_on(server, tokenizer, retries=0, read_timeout_s=30)
        request = question_request("Write a long story about a dragon who learns to cook.", max_new_tokens=1000)
        texts, killed_at = [], None
        for chunk in RagPipeline(engine).stream([request]):
            texts.append(chunk.text)
            if chunk.text and killed_at is None:
                server.kill()
                killed_at = time.perf_counter()
        assert killed_at is not None and time.perf_counter() - killed_at < 10
        assert chunk.finish_reason == "error" and chunk.info.engine_failed and "mid-answer" in chunk.info.error
        assert "".join(texts)  # what came before the cut was yielded
        after = collect(RagPipeline(engine), [question_request(QUESTIONS[0])])[0]
        assert after.finish_reason == "error" and "cannot reach the remote engine" in after.info.error


def test_an_answer_the_server_interrupts_for_the_next_request_ends_with_an_error(gguf, tokenizer):
    """llama-cpp-python's server by default (--interrupt_requests) ends a streamed answer
    with [DONE] when another request comes, without a finish reason: the engine tells the
    cut instead of passing the part off as the whole answer; the other request is answered."""
    from llamacpp_server import LlamaCppServer

    with LlamaCppServer.start(gguf, MODEL, n_ctx=N_CTX, interrupt_requests=True) as server:
        engine = engine_on(server, tokenizer, retries=0)
        long_request = question_request("Write a long story about a dragon who learns to cook.", max_new_tokens=1000)
        chunks, started = [], threading.Event()

        def ask_long():
            for chunk in RagPipeline(engine).stream([long_request]):
                chunks.append(chunk)
                started.set()

        asker = threading.Thread(target=ask_long, daemon=True)
        asker.start()
        assert started.wait(120)
        other = collect(RagPipeline(engine), [question_request(QUESTIONS[0], max_new_tokens=8)])[0]
        asker.join(120)
        assert not asker.is_alive()
    assert other.finish_reason in ("stop", "length") and other.text
    last = chunks[-1]
    assert last.finish_reason == "error" and "mid-answer" in last.info.error and "without a finish reason" in last.info.error
    assert 0 < sum(len(c.text) for c in chunks)


def test_bench_qa_reports_the_local_greedy_beside_llama_cpp_through_the_remote_engine(llamacpp, data, tmp_path):
    from ragdec.app.cli import main

    out = tmp_path / "qa.json"
    assert main(["bench", "qa", "--engine", "openai", "--base-url", llamacpp.url, "--remote-model", MODEL, "--model", MODEL,
                 "--methods", "greedy", "--data", str(data), "--max-new-tokens", "16", "-k", "2", "--limit", "2",
                 "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["settings"]["engine"] == "openai" and result["settings"]["reference"] == "greedy"
    assert list(result["methods"]) == ["greedy", "remote"]
    remote = result["methods"]["remote"]
    assert remote["answers"] == 2 and remote["tokens_per_s"] > 0 and 0 <= remote["identical_to_greedy"] <= 1
    assert result["methods"]["greedy"]["identical_to_greedy"] == 1.0
