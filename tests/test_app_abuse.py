"""Hostile input and hostile clients against a live loopback server (issue 18): JSON that
parses but is pathological, lone surrogates, bodies too large or too slow, headers that
trickle, wrong content types, foreign Host names, the API key, too many connections, a
QA cache that fails after the answer, a streaming client that never reads. Throughout
each, /health answers within 1 s; no response of this module's servers is a 500.

The first tests need no server and no weights (the fast lane): the body parser, the Host
rule and the command's flags."""

from __future__ import annotations

import contextlib
import http.client
import json
import re
import select
import socket
import sqlite3
import time

import pytest
from app_fixtures import STORE_QUESTION, pipeline, store  # noqa: F401 - fixtures
from helpers import address, head, health_answers
from test_app_server import MODEL, ask

from ragdec.decoding.methods import GenerationParams
from ragdec.pipelines.rag import RagPipeline, RagSettings

TIMEOUT = 1.0  # the header and body timeouts of the servers here: small, so that the tests are quick
BODY_KB = 256  # the module server's body limit: above the 200 KB of 100,000 nested brackets
STATUSES: list[int] = []  # every status this module's servers answered


# ---- no server: the body parser, the Host rule, the flags ------------------------------------


def test_parse_body_refuses_pathological_json_in_linear_time():
    from ragdec.app.openai_api import MAX_JSON_DEPTH, ApiError, json_depth, parse_body

    assert json_depth(b'{"a": [1, {"b": "[[["}]}') == 3
    assert json_depth(b'{"a": "x\\\\", "b": [[]]}') == 3  # an escaped backslash does not hide the string's end
    assert json_depth(b'["\\"[[["]') == 1  # nor an escaped quote its rest
    cases = {
        b"[" * 100_000 + b"]" * 100_000: "nests",
        b'{"max_tokens": 1' + b"0" * 5_000 + b"}": "number of 5,001 characters",
        b'{"x": 1.' + b"5" * 5_000 + b"}": "number of",
        b'{"x": NaN}': "NaN",
        b'{"x": "\xed\xa0\x80"}': "not UTF-8",  # a surrogate encoded raw
        b'"' + b'\\"' * 300_000: "not valid JSON",  # quotes and escapes a naive scan would rescan
        b"[" * (MAX_JSON_DEPTH + 1) + b"]" * (MAX_JSON_DEPTH + 1): "nests",
    }
    for raw, message in cases.items():
        started = time.perf_counter()
        with pytest.raises(ApiError, match=message) as refused:
            parse_body(raw)
        assert time.perf_counter() - started < 0.5, message
        assert refused.value.status == 400 and refused.value.body["error"]["code"] == "invalid_json"
    deep_enough = b"[" * MAX_JSON_DEPTH + b"]" * MAX_JSON_DEPTH
    assert parse_body(deep_enough) is not None


def test_parse_body_names_the_parameter_with_a_lone_surrogate():
    from ragdec.app.openai_api import ApiError, parse_body

    for body, param in [
        ({"messages": [{"role": "user", "content": "hi \ud800"}]}, "messages.[0].content"),
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": "\udc00"}]}]}, "messages.[0].content.[0].text"),
        ({"stop": ["ok", "\udfff"]}, "stop.[1]"),
        ({"query": "\ud800"}, "query"),
    ]:
        with pytest.raises(ApiError) as refused:
            parse_body(json.dumps(body).encode())
        error = refused.value.body["error"]
        assert refused.value.status == 400 and error["param"] == param and error["code"] == "invalid_unicode"
    with pytest.raises(ApiError) as refused:
        parse_body(b'{"\\ud800": 1}')
    assert refused.value.body["error"]["param"] == "\\ud800"  # a key: shown escaped, so the answer encodes
    assert parse_body(json.dumps({"query": "rocket \U0001F680"}).encode()) == {"query": "rocket \U0001F680"}  # a pair


def test_host_rule():
    from ragdec.app.server import host_allowed

    local = ("127.0.0.1", 8000)
    assert all(host_allowed(host, local, frozenset()) for host in ("localhost:8000", "127.0.0.1:8000", "[::1]:8000", "LocalHost"))
    assert not any(host_allowed(host, local, frozenset()) for host in ("localhost:9000", "evil.example:8000", "0.0.0.0:8000"))
    assert host_allowed("192.168.1.5:8000", ("192.168.1.5", 8000), frozenset())  # the address it came in on
    assert host_allowed("docs.example:443", local, frozenset({"docs.example"}))  # a name at any port
    assert not host_allowed("docs.example:443", local, frozenset({"docs.example:8443"}))  # that port only
    assert host_allowed("anything:1", local, frozenset({"*"}))


def test_serve_flags_reach_the_app_and_uvicorn(monkeypatch):
    from fastapi import FastAPI

    from ragdec.app.cli import build_parser
    from ragdec.app.cli_serve import access_settings, exposure_warnings
    from ragdec.app.server import server_config

    monkeypatch.delenv("RAGDEC_API_KEY", raising=False)
    args = build_parser().parse_args(["serve", "--host", "0.0.0.0", "--allowed-host", "a.example", "--allowed-host", "b.example:8443",
                                      "--max-body-kb", "64", "--body-timeout", "5", "--header-timeout", "2", "--max-connections", "10"])
    settings = access_settings(args)
    assert settings == {"api_key": None, "allowed_hosts": ["a.example", "b.example:8443"], "max_body_kb": 64, "body_timeout": 5.0,
                        "docs": False, "metrics_public": False}
    assert any("without an API key" in warning for warning in exposure_warnings(args))
    monkeypatch.setenv("RAGDEC_API_KEY", "from-the-environment")
    assert access_settings(args)["api_key"] == "from-the-environment" and exposure_warnings(args) == []
    named = build_parser().parse_args(["serve", "--host", "box.lan", "--api-key", "k", "--docs"])
    assert access_settings(named)["allowed_hosts"] == ["box.lan"] and access_settings(named)["docs"] is True
    assert exposure_warnings(build_parser().parse_args(["serve"])) == []  # loopback: nothing to warn of
    config = server_config(FastAPI(), header_timeout=2, max_connections=10)
    assert config.http.header_timeout == 2 and config.http.max_connections == 10  # the transport's bound (GuardedH11)


# ---- helpers ------------------------------------------------------------------------------------


def call(server, method: str, path: str, body=None, headers: dict | None = None, timeout: float = 120) -> tuple[int, object]:
    """One request; its status (recorded in STATUSES) and its JSON (or text) body. A dict
    body goes as JSON (``json.dumps`` escapes lone surrogates, as a client would)."""
    data = json.dumps(body).encode() if isinstance(body, (dict, list)) else body
    sent = ({"Content-Type": "application/json"} if data is not None else {}) | (headers or {})
    connection = http.client.HTTPConnection(*address(server), timeout=timeout)
    try:
        connection.request(method, path, data, sent)
        response = connection.getresponse()
        raw = response.read()
    finally:
        connection.close()
    STATUSES.append(response.status)
    try:
        return response.status, json.loads(raw)
    except ValueError:
        return response.status, raw.decode(errors="replace")


def error_of(status_and_body, status: int, code: str | None = None, param: str | None = None) -> str:
    """The message of an OpenAI-shaped error, after checking its status, code and param."""
    got, body = status_and_body
    assert got == status, body
    assert isinstance(body, dict) and set(body["error"]) == {"message", "type", "param", "code"}, body
    if code is not None:
        assert body["error"]["code"] == code, body
    if param is not None:
        assert body["error"]["param"] == param, body
    return body["error"]["message"]


def read_answer(sock: socket.socket, timeout: float) -> tuple[int | None, bytes, bool]:
    """What the server sent on ``sock`` until it closed it or ``timeout`` passed: the
    status (None: no response), the bytes, and whether the server closed the connection."""
    sock.settimeout(timeout)
    data, closed = b"", False
    try:
        while chunk := sock.recv(65536):
            data += chunk
        closed = True
    except ConnectionResetError:
        closed = True
    except TimeoutError:
        pass
    status = int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/1.1 ") else None
    if status is not None:
        STATUSES.append(status)
    return status, data, closed


def trickle(sockets: list[socket.socket], byte: bytes, seconds: float) -> dict[int, tuple[int | None, float]]:
    """Send ``byte`` on every socket every 0.1 s until the server closes each (or
    ``seconds`` pass): socket index -> (the status it answered, seconds to the close)."""
    started = time.perf_counter()
    ended: dict[int, tuple[int | None, float]] = {}
    while len(ended) < len(sockets) and time.perf_counter() - started < seconds:
        open_ones = [s for i, s in enumerate(sockets) if i not in ended]
        readable, _, _ = select.select(open_ones, [], [], 0.1)
        for sock in readable:
            status, _, closed = read_answer(sock, 2.0)
            if closed:
                ended[sockets.index(sock)] = (status, time.perf_counter() - started)
        for i, sock in enumerate(sockets):
            if i not in ended and sock not in readable:
                try:
                    sock.sendall(byte)
                except OSError:  # closed under us: its answer, if any, is still to read
                    pass
    return ended


# ---- the servers ----------------------------------------------------------------------------


def serve(pipeline, header_timeout: float = TIMEOUT, max_connections: int | None = None, **access):
    """A live server over ``pipeline`` with this module's small timeouts."""
    from ragdec.app.server import BackgroundServer, create_app

    app = create_app(pipeline, MODEL, engine=pipeline.engine, retriever=pipeline.retriever,
                     defaults=GenerationParams(max_new_tokens=8, method="auto"), body_timeout=TIMEOUT, **access)
    return BackgroundServer(app, header_timeout=header_timeout, max_connections=max_connections)


@pytest.fixture(scope="module")
def server(pipeline):
    with serve(pipeline, max_batch=2, max_connections=128, max_body_kb=BODY_KB, allowed_hosts=("ragdec.test",)) as running:
        yield running


def chat(question: str = "Hello", **extra) -> dict:
    return {"model": MODEL, "messages": ask(question), "max_tokens": 4, **extra}


# ---- each class of abuse ----------------------------------------------------------------------


def test_deep_nesting_is_a_400(server):
    with health_answers(server):
        deep = b"[" * 100_000 + b"]" * 100_000
        for path, raw in [("/v1/chat/completions", b'{"model": "%s", "messages": %s}' % (MODEL.encode(), deep)),
                          ("/v1/retrieve", b'{"query": "x", "k": %s}' % deep), ("/v1/retrieve", deep)]:
            assert "nests" in error_of(call(server, "POST", path, raw), 400, "invalid_json")
        status, found = call(server, "POST", "/v1/retrieve", {"query": "[" * 5_000 + " Tesla", "k": 1})  # brackets in a string
        assert status == 200 and len(found["data"]) == 1


def test_huge_numbers_are_a_400(server):
    with health_answers(server):
        huge = b"1" + b"0" * 5_000
        for path, raw in [("/v1/chat/completions", b'{"model": "%s", "messages": [], "max_tokens": %s}' % (MODEL.encode(), huge)),
                          ("/v1/retrieve", b'{"query": "x", "k": %s}' % huge), ("/v1/retrieve", b'{"query": "x", "k": 1.%s}' % huge),
                          ("/v1/retrieve", b'{"query": "x", "k": Infinity}')]:
            error_of(call(server, "POST", path, raw), 400, "invalid_json")
        error_of(call(server, "POST", "/v1/chat/completions", chat(max_tokens=10**30)), 400, param="max_tokens")
        with socket.create_connection(address(server), timeout=10) as sock:  # a Content-Length of 5,000 digits: h11's 400
            sock.sendall(head(server, "POST", "/v1/retrieve", Content_Type="application/json", Content_Length="9" * 5_000))
            status, data, closed = read_answer(sock, 5)
        assert status == 400 and closed, data


def test_lone_surrogates_are_a_400_naming_the_parameter(server):
    with health_answers(server):
        error_of(call(server, "POST", "/v1/chat/completions", chat("Who was \ud800 Tesla?")), 400, "invalid_unicode", "messages.[0].content")
        parts = {"model": MODEL, "messages": [{"role": "user", "content": [{"type": "text", "text": "\udc00"}]}]}
        error_of(call(server, "POST", "/v1/chat/completions", parts), 400, "invalid_unicode", "messages.[0].content.[0].text")
        error_of(call(server, "POST", "/v1/chat/completions", chat(stop=["\ud800"])), 400, "invalid_unicode", "stop.[0]")
        error_of(call(server, "POST", "/v1/retrieve", {"query": "\ud800"}), 400, "invalid_unicode", "query")
        status, found = call(server, "POST", "/v1/retrieve", {"query": "Tesla \U0001F680", "k": 1})  # a pair is text
        assert status == 200 and found["query"] == "Tesla \U0001F680"


def test_an_oversized_body_is_a_413_before_it_is_sent(server):
    with health_answers(server):
        with socket.create_connection(address(server), timeout=10) as sock:  # 10 MB announced, 1 KB sent
            started = time.perf_counter()
            sock.sendall(head(server, "POST", "/v1/chat/completions", Content_Type="application/json",
                              Content_Length=str(10 * 1024 * 1024)) + b"{" + b" " * 1023)
            status, data, closed = read_answer(sock, 5)
        assert status == 413 and closed and time.perf_counter() - started < 2, data
        assert json.loads(data.partition(b"\r\n\r\n")[2])["error"]["code"] == "body_too_large"
        with socket.create_connection(address(server), timeout=10) as sock:  # chunked: no length to check first
            sock.sendall(head(server, "POST", "/v1/retrieve", Content_Type="application/json", Transfer_Encoding="chunked"))
            sent = 0
            while not select.select([sock], [], [], 0.01)[0] and sent < 4 * BODY_KB * 1024:
                with contextlib.suppress(OSError):
                    sock.sendall(b"10000\r\n" + b" " * 0x10000 + b"\r\n")
                sent += 0x10000
            status, data, closed = read_answer(sock, 5)
        assert status == 413 and closed and sent < 4 * BODY_KB * 1024, (sent, data)  # refused as it streamed
        status, _ = call(server, "POST", "/v1/retrieve", b'{"query": "Tesla", "k": 1}' + b" " * (BODY_KB * 1024 - 100))
        assert status == 200  # just under the limit


def test_a_post_that_is_not_json_is_a_415_and_runs_nothing(server):
    with health_answers(server):
        before = call(server, "GET", "/health")[1]["jobs"]
        body = json.dumps(chat()).encode()
        for kind in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"):
            headers = {"Content-Type": kind, "Origin": "http://evil.example"}  # what a cross-origin page sends without asking
            error_of(call(server, "POST", "/v1/chat/completions", body, headers), 415, "unsupported_media_type")
        error_of(call(server, "POST", "/v1/chat/completions", body, {"Content-Type": ""}), 415)
        assert call(server, "GET", "/health")[1]["jobs"] == before  # no job ran, nothing was cached
        status, _ = call(server, "POST", "/v1/retrieve", b'{"query": "Tesla"}', {"Content-Type": "application/json; charset=utf-8"})
        assert status == 200


def test_a_foreign_host_is_a_421_and_an_allowed_one_is_served(server):
    _, port = address(server)
    with health_answers(server):
        for path in ("/health", "/v1/models", "/"):
            error_of(call(server, "GET", path, headers={"Host": f"evil.example:{port}"}), 421, "misdirected_request")
        error_of(call(server, "POST", "/v1/retrieve", {"query": "Tesla"}, {"Host": f"evil.example:{port}"}), 421)
        error_of(call(server, "GET", "/health", headers={"Host": "127.0.0.1:1"}), 421)  # not the port it came in on
        for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}", "ragdec.test", f"RAGDEC.TEST:{port}"):
            assert call(server, "GET", "/v1/models", headers={"Host": host})[0] == 200, host


def test_the_api_key_guards_v1_and_the_page_asks_for_it(pipeline):
    import openai

    with serve(pipeline, api_key="s3cret-key") as server, health_answers(server):
        error_of(call(server, "GET", "/v1/models"), 401, "invalid_api_key")
        error_of(call(server, "GET", "/v1/models", headers={"Authorization": "Bearer wrong"}), 401, "invalid_api_key")
        error_of(call(server, "POST", "/v1/retrieve", {"query": "Tesla"}), 401)
        assert call(server, "GET", "/v1/models", headers={"Authorization": "Bearer s3cret-key"})[0] == 200
        assert call(server, "POST", "/v1/retrieve", {"query": "Tesla", "k": 1}, {"Authorization": "bearer s3cret-key"})[0] == 200
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="s3cret-key", max_retries=0, timeout=60)
        assert client.chat.completions.create(model=MODEL, messages=ask("Hello"), max_tokens=3).choices[0].message.content
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()
        status, page = call(server, "GET", "/")
        assert status == 200 and "<title>ragdec chat</title>" in page  # the page loads without the key
    # ... and its script sends the key on every /v1 call, asking for it on a 401
    script = page.split("<script>", 1)[1]
    assert "response.status !== 401" in script and "window.prompt(" in script and "sessionStorage" in script
    assert "Authorization = `Bearer ${apiKey}`" in script
    assert not re.search(r"""\bfetch\(\s*["'`]/v1""", script)  # every /v1 call goes through apiFetch
    assert re.search(r"""apiFetch\(\s*"/v1/models""", script) and re.search(r"""apiFetch\(\s*"/v1/chat/completions""", script)


def test_docs_are_off_unless_asked_for(server, pipeline):
    from ragdec.app.server import create_app

    for path in ("/docs", "/redoc", "/openapi.json"):
        error_of(call(server, "GET", path), 404)
    app = create_app(pipeline, MODEL, docs=True)
    assert {"/docs", "/redoc", "/openapi.json"} <= {route.path for route in app.routes}
    app.state.worker.close()


def test_headers_trickled_slowly_are_cut(server):
    with health_answers(server):
        sockets = [socket.create_connection(address(server), timeout=10) for _ in range(20)]
        try:
            for sock in sockets:
                sock.sendall(head(server, "POST", "/v1/chat/completions").removesuffix(b"\r\n\r\n") + b"\r\nX-Slow: ")
            ended = trickle(sockets, b"a", TIMEOUT + 4)
        finally:
            for sock in sockets:
                sock.close()
    assert len(ended) == 20, ended  # every one was closed ...
    assert all(seconds < TIMEOUT + 2 for _, seconds in ended.values()), ended  # ... soon after the timeout
    assert {status for status, _ in ended.values()} <= {408, None} and 408 in {status for status, _ in ended.values()}


def test_bodies_trickled_slowly_are_cut(server):
    with health_answers(server):
        sockets = [socket.create_connection(address(server), timeout=10) for _ in range(22)]
        try:
            for i, sock in enumerate(sockets):  # the last two to a route that never reads a body (405)
                path, method = ("/v1/chat/completions", "POST") if i < 20 else ("/health", "POST")
                sock.sendall(head(server, method, path, Content_Type="application/json", Content_Length="1000") + b"{")
            ended = trickle(sockets, b" ", TIMEOUT + 4)
        finally:
            for sock in sockets:
                sock.close()
    assert len(ended) == 22 and all(seconds < TIMEOUT + 2 for _, seconds in ended.values()), ended
    assert [ended[i][0] for i in range(20)] == [408] * 20 and [ended[i][0] for i in (20, 21)] == [405, 405]


def test_connections_past_the_cap_are_refused_until_the_idle_ones_are_cut(pipeline):
    with serve(pipeline, max_connections=4) as server:
        idle = [socket.create_connection(address(server), timeout=10) for _ in range(4)]
        try:
            time.sleep(0.1)
            status, _ = call(server, "GET", "/health")
            assert status == 503  # uvicorn's own refusal, text/plain
            ended = trickle(idle, b"", TIMEOUT + 4)  # they send nothing: the header timeout cuts them
            assert len(ended) == 4 and {s for s, _ in ended.values()} <= {408, None}
            assert call(server, "GET", "/health")[0] == 200
        finally:
            for sock in idle:
                sock.close()


def test_a_streaming_client_that_never_reads_holds_back_no_one(server):
    with health_answers(server):
        never_reads = socket.create_connection(address(server), timeout=10)
        try:
            body = json.dumps(chat("Write a long story about a lighthouse.", max_tokens=200, stream=True, ragdec={"method": "greedy"}))
            never_reads.sendall(head(server, "POST", "/v1/chat/completions", Content_Type="application/json",
                                     Content_Length=str(len(body))) + body.encode())
            time.sleep(1.0)  # its decode is under way
            started = time.perf_counter()
            status, answer = call(server, "POST", "/v1/chat/completions", chat(STORE_QUESTION))
            assert status == 200 and answer["choices"][0]["message"]["content"]
            assert time.perf_counter() - started < 60
        finally:
            never_reads.close()


def test_a_cache_that_fails_after_the_answer_leaves_the_answer_whole(tmp_path, store, smollm2, minilm, monkeypatch):
    from ragdec.cache.lookup import QACache
    from ragdec.pipelines.types import Request, collect

    cache = QACache.open(tmp_path / "qa.sqlite", minilm)

    def locked(*args, **kwargs):
        raise sqlite3.OperationalError("database is locked")

    monkeypatch.setattr(cache, "put", locked)
    pipeline = RagPipeline(smollm2, store, cache, RagSettings(k=1))
    params = GenerationParams(max_new_tokens=48, stop=(".",), method="auto")  # a stop string: the answer finishes
    answer, = collect(pipeline, [Request(ask(STORE_QUESTION), params=params)])
    assert answer.finish_reason == "stop" and answer.text  # a finished answer, so the pipeline tried to cache it
    assert "database is locked" in answer.info.warnings[0]
    body = chat(STORE_QUESTION, max_tokens=48, stop=["."])
    with serve(pipeline) as server, health_answers(server):
        status, whole = call(server, "POST", "/v1/chat/completions", body)
        assert status == 200 and whole["choices"][0]["message"]["content"] == answer.text
        assert "not written to the QA cache" in whole["ragdec"]["warnings"][0]
        connection = http.client.HTTPConnection(*address(server), timeout=60)
        connection.request("POST", "/v1/chat/completions", json.dumps({**body, "stream": True}), {"Content-Type": "application/json"})
        response = connection.getresponse()
        STATUSES.append(response.status)
        events = [json.loads(e.removeprefix("data: ")) for e in response.read().decode().split("\n\n") if e and e != "data: [DONE]"]
        connection.close()
        assert response.status == 200 and "database is locked" in events[-1]["ragdec"]["warnings"][0]
        assert call(server, "GET", "/health")[1]["jobs"]["failed"] == 0
    cache.close()


def test_no_response_was_a_500(server):
    assert STATUSES and 500 not in STATUSES, sorted(set(STATUSES))
