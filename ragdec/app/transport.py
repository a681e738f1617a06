"""How the server meets the network: who may talk to it (``Gate``: Host names, the API key,
JSON posts), slow clients (``GuardedH11``: a deadline for a request's headers, and no
reading on after a refusal), uvicorn's settings (``server_config``) and a server in a
thread for tests and notebooks (``BackgroundServer``). The routes are in ``server.py``.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from http import HTTPStatus
from typing import Sequence

import h11
import uvicorn
from fastapi.responses import JSONResponse
from uvicorn.protocols.http.h11_impl import H11Protocol

from .openai_api import DEFAULT_HEADER_TIMEOUT, DEFAULT_MAX_CONNECTIONS, ApiError

LOOPBACK_NAMES = frozenset({"127.0.0.1", "localhost", "[::1]"})
CLOSE = {"Connection": "close"}  # on a refusal sent before the body was read: read no more of it


# ---- who may talk to the server -------------------------------------------------------------


def host_allowed(host: str, server: tuple | None, allowed: frozenset[str]) -> bool:
    """Whether a Host header names this server: a loopback name, or the address the
    connection came in on, at the port it came in on (or with no port); or an entry of
    ``allowed`` (``--allowed-host``): NAME at any port, NAME:PORT at that one, * any host.

    Example: a connection to 127.0.0.1:8000 -> "localhost:8000" yes, "127.0.0.1" yes,
    "localhost:9000" no, "evil.example:8000" no (a page that rebound evil.example to
    127.0.0.1), unless ``allowed`` names it.
    """
    host = host.lower()
    if "*" in allowed or host in allowed:
        return True
    name, _, port = host.rpartition(":") if ":" in host and not host.endswith("]") else (host, "", "")
    if name in allowed:
        return True
    own = set(LOOPBACK_NAMES)
    local_port = None
    if server:
        address, local_port = server
        own.add(f"[{address}]" if ":" in address else address)
    return name in own and port in ("", str(local_port))


class Gate:
    """Who may talk to the server, checked on a request's head before any route runs: the
    Host header must name this server (421), /v1 routes need the API key when there is
    one (401, compared in constant time), a POST must be ``application/json`` (415).

    Why: a page in the user's browser reaches a loopback server in two ways. DNS rebinding
    points a name the page controls at 127.0.0.1, and its requests carry that name as
    Host; a form or text/plain POST goes out cross-origin without asking (a JSON one needs
    the server's CORS consent, which this server never gives).
    """

    def __init__(self, app, api_key: str | None, allowed_hosts: Sequence[str]):
        self.app = app
        self.api_key = api_key.encode() if api_key else None
        self.allowed_hosts = frozenset(host.lower() for host in allowed_hosts)

    async def __call__(self, scope, receive, send):
        refusal = self._refusal(scope) if scope["type"] == "http" else None
        if refusal is None:
            return await self.app(scope, receive, send)
        await JSONResponse(refusal.body, status_code=refusal.status, headers=refusal.headers)(scope, receive, send)

    def _refusal(self, scope) -> ApiError | None:
        headers = dict(scope["headers"])
        host = headers.get(b"host", b"").decode("latin-1")
        if host and not host_allowed(host, scope.get("server"), self.allowed_hosts):  # no Host: HTTP/1.0, not a browser
            return ApiError(421, f"this server does not answer to the name {host[:100]!r}: start it with --allowed-host NAME "
                            "to serve a name of your own", None, "misdirected_request", headers=CLOSE)
        path = scope["path"]
        if self.api_key is not None and (path == "/v1" or path.startswith("/v1/")):
            scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.api_key):
                message = ("the API key sent is not this server's" if token else
                           "this server needs an API key: send the header Authorization: Bearer KEY")
                return ApiError(401, message, None, "invalid_api_key", headers={"WWW-Authenticate": "Bearer", **CLOSE})
        if scope["method"] == "POST":
            kind = headers.get(b"content-type", b"").decode("latin-1")
            if kind.partition(";")[0].strip().lower() != "application/json":
                return ApiError(415, f"a POST's body must be JSON, sent as Content-Type: application/json (got {kind[:100]!r})",
                                None, "unsupported_media_type", headers=CLOSE)
        return None


# ---- slow clients ------------------------------------------------------------------------------


class GuardedH11(H11Protocol):
    """uvicorn's h11 protocol with a deadline for a request's headers: uvicorn 0.54 has
    none (its keep-alive timer runs only between requests and stops at the next byte), so
    a client trickling its headers holds a connection for as long as it trickles. Also,
    after an answer sent before the body was read (a refusal), the connection closes
    rather than reading on a body nobody wants (uvicorn would read it to its end)."""

    header_timeout: float | None = None  # set per server by ``server_config``

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._header_clock: asyncio.TimerHandle | None = None
        self._start_header_clock()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self._start_header_clock()  # a head has begun and is not complete
        else:
            self._stop_header_clock()

    def connection_lost(self, exc) -> None:
        self._stop_header_clock()
        super().connection_lost(exc)

    def on_response_complete(self) -> None:
        unread = self.conn.their_state is h11.SEND_BODY  # answered before its body was read
        super().on_response_complete()
        if unread and not self.transport.is_closing():
            self.transport.close()  # read no more of a body nobody wants

    def _start_header_clock(self) -> None:
        if self.header_timeout is not None and self._header_clock is None:
            self._header_clock = self.loop.call_later(self.header_timeout, self._headers_too_slow)

    def _stop_header_clock(self) -> None:
        if self._header_clock is not None:
            self._header_clock.cancel()
            self._header_clock = None

    def _headers_too_slow(self) -> None:
        self._header_clock = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self._answer_and_close(408, f"the request's headers did not arrive within {self.header_timeout:g} s",
                                   "header_timeout")

    def _answer_and_close(self, status: int, message: str, code: str) -> None:
        """An OpenAI-style error written straight to the socket (no request has begun to
        answer through), then the connection closed."""
        body = json.dumps(ApiError(status, message, None, code).body).encode()
        head = (f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\ncontent-type: application/json\r\n"
                f"content-length: {len(body)}\r\nconnection: close\r\n\r\n")
        self.transport.write(head.encode() + body)
        self.transport.close()


def server_config(app, host: str = "127.0.0.1", port: int = 8000, *, header_timeout: float | None = DEFAULT_HEADER_TIMEOUT,
                  max_connections: int | None = DEFAULT_MAX_CONNECTIONS, **options) -> uvicorn.Config:
    """uvicorn's settings for ``app``: h11 with the header deadline (``GuardedH11``), at
    most ``max_connections`` connections served (uvicorn's ``limit_concurrency``: a request
    on one more gets 503, text/plain), uvicorn's keep-alive timeout between requests (5 s)
    and h11's bound on a request head (16 KiB, past it 400); ``options`` go to uvicorn."""
    protocol = type("GuardedH11Protocol", (GuardedH11,), {"header_timeout": header_timeout})
    # uvicorn refuses a request when the open connections, its own included, reach the limit
    limit = max_connections + 1 if max_connections is not None else None
    return uvicorn.Config(app, host=host, port=port, http=protocol, limit_concurrency=limit, **options)


class BackgroundServer:
    """uvicorn serving ``app`` from a thread, on a free port of the loopback address
    (tests, benchmarks, notebooks).

    Example::

        with BackgroundServer(create_app(pipeline, "smollm2-135m-instruct")) as server:
            OpenAI(base_url=server.url + "/v1", api_key="none").models.list()
    """

    def __init__(self, app, host: str = "127.0.0.1", log_level: str = "warning", *,
                 header_timeout: float | None = DEFAULT_HEADER_TIMEOUT, max_connections: int | None = DEFAULT_MAX_CONNECTIONS):
        self.app = app
        self.host = host
        self.log_level = log_level
        self.limits = {"header_timeout": header_timeout, "max_connections": max_connections}  # ``server_config``'s
        self.url = ""
        self._server = None
        self._thread = None

    def __enter__(self) -> "BackgroundServer":
        import socket
        import threading

        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, 0))  # the system picks a free port
        port = sock.getsockname()[1]
        config = server_config(self.app, self.host, port, log_level=self.log_level, timeout_graceful_shutdown=5, **self.limits)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]}, name="ragdec-server", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start on {self.host}:{port}")
            time.sleep(0.02)
        self.url = f"http://{self.host}:{port}"
        return self

    def __exit__(self, *exc) -> None:
        self._server.should_exit = True
        self._thread.join(15)
