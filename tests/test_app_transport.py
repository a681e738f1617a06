"""How `ragdec serve` meets the network, on live loopback servers over a tiny random model
(the fast lane: no weights): a refused body's client reads its 413 (the lingering close),
/health stays quick while a refused upload drains, a burst of connections to cheap routes
is answered in full, and a connection past the bound gets a 503 it can act on."""

from __future__ import annotations

import http.client
import json
import os
import resource
import socket
import time

import httpx
import pytest
from conftest import tiny_causal_lm
from helpers import address, head, health_answers

from ragdec.decoding.generator import Generator
from ragdec.pipelines.rag import RagPipeline

BODY_KB = 64  # the servers' body limit: small, so that a refused body is quick to send
OVERSIZED = b'{"model": "tiny", "messages": []}' + b" " * (4 * 1024 * 1024)  # 4 MB: well past it, under LINGER_BYTES


@pytest.fixture(scope="module")
def pipeline(tiny_tokenizer):
    return RagPipeline(Generator(tiny_causal_lm("llama", len(tiny_tokenizer)), tiny_tokenizer, name="tiny-llama"))


def serve(pipeline, **limits):
    """A live server over ``pipeline`` (``limits``: ``BackgroundServer``'s)."""
    from ragdec.app.server import BackgroundServer, create_app

    app = create_app(pipeline, "tiny", context_length=512, max_body_kb=BODY_KB, body_timeout=5)
    return BackgroundServer(app, **limits)


@pytest.fixture(scope="module")
def server(pipeline):
    with serve(pipeline) as running:  # the connection bound sized from this machine
        yield running


def read_to_close(sock: socket.socket, timeout: float) -> bytes:
    """All the server sends on ``sock`` until it closes it; a reset or ``timeout`` fails."""
    sock.settimeout(timeout)
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def answer_of(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    """An HTTP/1.1 response's status, headers (lower-case names) and body."""
    top, _, body = raw.partition(b"\r\n\r\n")
    status_line, *lines = top.decode("latin-1").split("\r\n")
    headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}
    return int(status_line.split(" ", 2)[1]), headers, body


def assert_too_large(status: int, body: bytes) -> None:
    assert status == 413, body
    error = json.loads(body)["error"]
    assert error["code"] == "body_too_large" and "--max-body-kb" in error["message"], error


# ---- a refused body: the client reads the refusal ---------------------------------------------


def test_a_client_that_sends_its_whole_oversized_body_reads_the_413(server):
    with socket.create_connection(address(server), timeout=10) as sock:  # the body sent whole before reading
        sock.sendall(head(server, "POST", "/v1/chat/completions", Content_Type="application/json",
                          Content_Length=str(len(OVERSIZED))) + OVERSIZED)
        status, headers, body = answer_of(read_to_close(sock, 10))
    assert_too_large(status, body)
    assert headers["connection"] == "close"

    connection = http.client.HTTPConnection(*address(server), timeout=10)  # the standard library does the same
    try:
        connection.request("POST", "/v1/chat/completions", OVERSIZED, {"Content-Type": "application/json"})
        response = connection.getresponse()
        assert_too_large(response.status, response.read())
    finally:
        connection.close()

    response = httpx.post(server.url + "/v1/chat/completions", content=OVERSIZED, headers={"Content-Type": "application/json"},
                          timeout=10)
    assert_too_large(response.status_code, response.content)

    def chunks():  # chunked: refused as it streams, while httpx is still sending
        for start in range(0, len(OVERSIZED), 65536):
            yield OVERSIZED[start:start + 65536]

    response = httpx.post(server.url + "/v1/chat/completions", content=chunks(), headers={"Content-Type": "application/json"},
                          timeout=10)
    assert_too_large(response.status_code, response.content)
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200


def test_health_stays_quick_while_a_refused_upload_drains(server):
    from ragdec.app.transport import LINGER_SECONDS

    with health_answers(server, every=0.05), socket.create_connection(address(server), timeout=10) as sock:
        total = 64 * 1024 * 1024  # announced; sent slowly, so that it is still draining while /health is asked
        sock.sendall(head(server, "POST", "/v1/chat/completions", Content_Type="application/json", Content_Length=str(total)))
        started, sent, cut = time.perf_counter(), 0, False
        while time.perf_counter() - started < LINGER_SECONDS + 3:
            try:
                sock.sendall(b" " * 32768)
            except OSError:  # the linger's bound reached: the rest of the body is refused with a reset
                cut = True
                break
            sent += 32768
            time.sleep(0.01)
    assert cut and time.perf_counter() - started < LINGER_SECONDS + 2, (sent, time.perf_counter() - started)
    assert sent > 1024 * 1024  # it drained at the client's pace until the bound


def test_a_refusal_before_the_body_lets_the_client_read_it_without_a_reset(server):
    with socket.create_connection(address(server), timeout=10) as sock:  # 405 on a route that reads no body
        sock.sendall(head(server, "POST", "/health", Content_Type="application/json", Content_Length=str(len(OVERSIZED)))
                     + OVERSIZED)
        status, headers, _ = answer_of(read_to_close(sock, 10))
    assert status == 405


# ---- many connections ------------------------------------------------------------------------


def test_a_burst_of_400_connections_to_cheap_routes_is_answered_in_full(server):
    paths = ["/health", "/v1/models"]
    sockets = [socket.create_connection(address(server), timeout=30) for _ in range(400)]  # all open at once
    try:
        for i, sock in enumerate(sockets):
            sock.sendall(head(server, "GET", paths[i % 2], Connection="close"))
        statuses = [answer_of(read_to_close(sock, 30))[0] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()
    assert statuses == [200] * 400, {status: statuses.count(status) for status in set(statuses)}
    from ragdec.app.transport import connection_bound

    assert connection_bound() >= 400  # sized from this machine, the bound holds the burst


def test_a_connection_past_the_bound_gets_a_503_with_retry_after(pipeline):
    with serve(pipeline, max_connections=4) as server:
        held = [socket.create_connection(address(server), timeout=10) for _ in range(4)]
        try:
            time.sleep(0.2)  # all four accepted
            response = httpx.get(server.url + "/health", timeout=10)
            assert response.status_code == 503 and int(response.headers["retry-after"]) >= 1, response.text
            assert response.json()["error"]["code"] == "server_overloaded"
            connection = http.client.HTTPConnection(*address(server), timeout=10)
            connection.request("POST", "/v1/chat/completions", b'{"model": "tiny", "messages": []}', {"Content-Type": "application/json"})
            response = connection.getresponse()
            assert response.status == 503 and response.getheader("Retry-After"), response.read()
            connection.close()
        finally:
            for sock in held:
                sock.close()
        deadline = time.monotonic() + 5  # the held ones are gone: served again
        while (status := httpx.get(server.url + "/health", timeout=10).status_code) != 200 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert status == 200


def test_the_bound_follows_the_descriptor_limit_and_memory():
    from fastapi import FastAPI

    from ragdec.app.transport import CONNECTION_BYTES, DESCRIPTOR_RESERVE, available_memory, connection_bound, server_config

    assert connection_bound() <= int(available_memory() * 0.25) // CONNECTION_BYTES * 1.1  # the memory's bound
    assert connection_bound(connection_bytes=available_memory()) == 1  # memory for none: one all the same
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    open_now = len(os.listdir("/proc/self/fd"))
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (open_now + DESCRIPTOR_RESERVE + 300, hard))
        assert 290 <= connection_bound() <= 300  # the descriptors' bound
        config = server_config(FastAPI())  # raises the soft limit first
        assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == hard
        assert config.http.max_connections > 300
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert server_config(FastAPI(), max_connections=10).http.max_connections == 10
    assert server_config(FastAPI(), max_connections=0).http.max_connections is None  # 0: no bound
