"""How the server meets the network: who may talk to it (``Gate``: Host names, the API key,
JSON posts), slow clients and closing (``GuardedH11``: a deadline for a request's headers,
no reading on after a refusal, a lingering close so that the client reads the refusal),
how many connections it holds (``connection_bound``: sized from the descriptor limit and
memory; past it, 503 with Retry-After), uvicorn's settings (``server_config``) and a server
in a thread for tests and notebooks (``BackgroundServer``). The routes are in ``server.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import os
import resource
import time
from http import HTTPStatus
from typing import Sequence

import h11
import uvicorn
from h11._connection import DEFAULT_MAX_INCOMPLETE_EVENT_SIZE  # as uvicorn imports it
from fastapi.responses import JSONResponse
from uvicorn.protocols.http.flow_control import HIGH_WATER_LIMIT
from uvicorn.protocols.http.h11_impl import H11Protocol

from .openai_api import DEFAULT_HEADER_TIMEOUT, ApiError

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
    one (401, compared in constant time; /metrics too, unless ``metrics_public``), a POST must
    be ``application/json`` (415).

    Why: a page in the user's browser reaches a loopback server in two ways. DNS rebinding
    points a name the page controls at 127.0.0.1, and its requests carry that name as
    Host; a form or text/plain POST goes out cross-origin without asking (a JSON one needs
    the server's CORS consent, which this server never gives).
    """

    def __init__(self, app, api_key: str | None, allowed_hosts: Sequence[str], metrics_public: bool = False):
        self.app = app
        self.api_key = api_key.encode() if api_key else None
        self.metrics_public = metrics_public  # /metrics needs the key too, unless the operator opened it
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
        guarded = path == "/v1" or path.startswith("/v1/") or (path == "/metrics" and not self.metrics_public)
        if self.api_key is not None and guarded:
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


# ---- closing: the client reads the last answer ------------------------------------------------

# A socket closed with unread bytes in it sends a reset, and a reset can destroy the answer
# in flight to the client: it reads "connection reset" instead of the 413. So a close first
# sends FIN after the answer and reads on, discarding, until the client closes its side,
# goes quiet, or one of these bounds is reached (web servers' "lingering close").
LINGER_SECONDS = 5.0  # the longest a closing connection is drained (nginx's lingering_time is 30 s)
LINGER_IDLE_SECONDS = 2.0  # nothing for this long: the client's bytes are all in (Apache's per-read wait)
# a client that sends its whole body before it reads (http.client, requests, urllib) reads
# the 413 of a body up to this size; a larger one is cut with a reset when the bound is reached
LINGER_BYTES = 64 * 1024 * 1024


class LingeringTransport:
    """The socket's transport as uvicorn sees it, whose ``close()`` lingers
    (``GuardedH11._linger``); everything else goes to the socket's own transport."""

    def __init__(self, transport: asyncio.Transport, protocol: "GuardedH11"):
        self.socket_transport = transport
        self.protocol = protocol

    def close(self) -> None:
        self.protocol._linger()

    def is_closing(self) -> bool:
        return self.protocol._lingering or self.socket_transport.is_closing()

    def __getattr__(self, name):
        return getattr(self.socket_transport, name)


# ---- slow clients, and connections past the bound ------------------------------------------------


class GuardedH11(H11Protocol):
    """uvicorn's h11 protocol with a deadline for a request's headers: uvicorn 0.54 has
    none (its keep-alive timer runs only between requests and stops at the next byte), so
    a client trickling its headers holds a connection for as long as it trickles. After an
    answer sent before the body was read (a refusal), the connection closes rather than
    reading on a body nobody wants (uvicorn would read it to its end); every close lingers
    (``LINGER_SECONDS``), so the client reads that answer. A connection past
    ``max_connections`` is answered 503 with Retry-After at once and closed."""

    header_timeout: float | None = None  # set per server by ``server_config``
    max_connections: int | None = None  # likewise; None: no bound
    lingering = 0  # the server's connections now lingering: on their way out, so not counted against the bound

    def connection_made(self, transport) -> None:
        self._lingering = False
        self._linger_clocks: list[asyncio.TimerHandle] = []
        self._lingered_bytes = 0
        super().connection_made(LingeringTransport(transport, self))
        self._header_clock: asyncio.TimerHandle | None = None
        self._start_header_clock()
        if self.max_connections is not None and len(self.connections) - self.lingering > self.max_connections:
            self._answer_and_close(503, f"the server holds its most connections ({self.max_connections:,}): retry after "
                                   f"{SHED_RETRY_AFTER} s", "server_overloaded", "server_error", {"Retry-After": str(SHED_RETRY_AFTER)})

    def data_received(self, data: bytes) -> None:
        if self._lingering:
            self._drain(data)
            return
        super().data_received(data)
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self._start_header_clock()  # a head has begun and is not complete
        else:
            self._stop_header_clock()

    def connection_lost(self, exc) -> None:
        self._stop_header_clock()
        for clock in self._linger_clocks:
            clock.cancel()
        if self._lingering:
            type(self).lingering -= 1
        super().connection_lost(exc)

    def on_response_complete(self) -> None:
        unread = self.conn.their_state is h11.SEND_BODY  # answered before its body was read
        super().on_response_complete()
        if unread and not self.transport.is_closing():
            self.transport.close()  # read no more of a body nobody wants

    def shutdown(self) -> None:
        if self.cycle is None or self.cycle.response_complete:
            self.transport.socket_transport.close()  # the server is stopping: an idle connection goes at once
            return
        super().shutdown()

    # -- the lingering close

    def _linger(self) -> None:
        """Send what is buffered and then FIN, and read on, discarding, until the client
        closes (its EOF closes the socket), goes quiet, or the bounds are reached."""
        sock = self.transport.socket_transport
        if self._lingering:
            return  # its clocks close it
        if sock.is_closing() or not sock.can_write_eof():  # TLS cannot send FIN alone
            sock.close()
            return
        self._lingering = True
        type(self).lingering += 1  # per server: ``server_config`` makes a class for each
        self._stop_header_clock()
        self._unset_keepalive_if_required()
        sock.write_eof()  # after the buffered answer
        sock.resume_reading()  # uvicorn pauses reading while a body waits for the app
        self._linger_clocks = [self.loop.call_later(LINGER_SECONDS, sock.abort),
                               self.loop.call_later(LINGER_IDLE_SECONDS, sock.close)]

    def _drain(self, data: bytes) -> None:
        sock = self.transport.socket_transport
        self._lingered_bytes += len(data)
        if self._lingered_bytes > LINGER_BYTES:
            sock.close()
            return
        self._linger_clocks[-1].cancel()  # the client is still sending: it has not gone quiet
        self._linger_clocks[-1] = self.loop.call_later(LINGER_IDLE_SECONDS, sock.close)

    # -- the header deadline

    def _start_header_clock(self) -> None:
        if self.header_timeout is not None and self._header_clock is None and not self._lingering:
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

    def _answer_and_close(self, status: int, message: str, code: str, type: str = "invalid_request_error",
                          headers: dict[str, str] | None = None) -> None:
        """An OpenAI-style error written straight to the socket (no request has begun to
        answer through), then the connection closed."""
        body = json.dumps(ApiError(status, message, None, code, type).body).encode()
        extra = "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items())
        head = (f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\ncontent-type: application/json\r\n"
                f"content-length: {len(body)}\r\n{extra}connection: close\r\n\r\n")
        self.transport.write(head.encode() + body)
        self.transport.close()


# ---- how many connections ------------------------------------------------------------------------

SHED_RETRY_AFTER = 1  # seconds: connections come and go within that (a lingering close is bounded by LINGER_SECONDS)
# descriptors kept for what the server opens besides connections (model and store files, a
# cache's database, logs) and for the connections it sheds while they linger
DESCRIPTOR_RESERVE = 256
# what one open connection may hold in memory: its measured cost, idle or with a request in
# flight, in the process and in the kernel, rounded up to a power of two (ragdec bench
# connection-cost: bench/results/connection_cost.json), plus what uvicorn buffers of
# a body before it stops reading (HIGH_WATER_LIMIT) and of a head before h11 refuses it
MEASURED_CONNECTION_BYTES = 32 * 1024
CONNECTION_BYTES = MEASURED_CONNECTION_BYTES + HIGH_WATER_LIMIT + DEFAULT_MAX_INCOMPLETE_EVENT_SIZE
MEMORY_SHARE = 0.25  # of the memory available when the server starts (the model is loaded by then)


def connection_bound(connection_bytes: int = CONNECTION_BYTES, memory_share: float = MEMORY_SHARE) -> int:
    """How many connections this process can hold open: the fewer of what its descriptors
    allow (the soft RLIMIT_NOFILE, less the descriptors open now and ``DESCRIPTOR_RESERVE``)
    and what its memory allows (``memory_share`` of the memory available to it, in this
    machine or its container's limit, over ``connection_bytes`` each).

    Call ``raise_descriptor_limit`` first: the soft limit is often far below the hard one.
    Example: a soft limit of 65,536 with 20 descriptors open, and 8 GiB available ->
    min(65,536 - 20 - 256, 2 GiB // ``CONNECTION_BYTES``), the memory's bound.
    """
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    by_descriptors = (soft if soft != resource.RLIM_INFINITY else 1 << 20) - _open_descriptors() - DESCRIPTOR_RESERVE
    by_memory = int(available_memory() * memory_share) // connection_bytes
    return max(1, min(by_descriptors, by_memory))


def raise_descriptor_limit() -> int:
    """Raise this process's soft limit on open descriptors to its hard limit (no privilege
    needed: nginx's worker_rlimit_nofile does the same); the soft limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != soft:
        with contextlib.suppress(ValueError, OSError):  # macOS refuses RLIM_INFINITY: keep the soft one
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def available_memory() -> int:
    """Bytes this process could still take: Linux's MemAvailable, within the cgroup's
    memory.max when a container sets one; elsewhere the machine's free pages."""
    free = None
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/meminfo") as meminfo:
            free = next(int(line.split()[1]) * 1024 for line in meminfo if line.startswith("MemAvailable:"))
    if free is None:
        names = ("SC_AVPHYS_PAGES", "SC_PAGE_SIZE") if hasattr(os, "sysconf_names") and "SC_AVPHYS_PAGES" in os.sysconf_names \
            else ("SC_PHYS_PAGES", "SC_PAGE_SIZE")
        free = os.sysconf(names[0]) * os.sysconf(names[1])
    with contextlib.suppress(OSError, ValueError):
        limit = open("/sys/fs/cgroup/memory.max").read().strip()
        if limit != "max":
            free = min(free, int(limit) - int(open("/sys/fs/cgroup/memory.current").read()))
    return max(free, 0)


def _open_descriptors() -> int:
    for folder in ("/proc/self/fd", "/dev/fd"):
        with contextlib.suppress(OSError):
            return len(os.listdir(folder))
    return DESCRIPTOR_RESERVE  # no way to count them: assume as many again as the reserve


def server_config(app, host: str = "127.0.0.1", port: int = 8000, *, header_timeout: float | None = DEFAULT_HEADER_TIMEOUT,
                  max_connections: int | None = None, **options) -> uvicorn.Config:
    """uvicorn's settings for ``app``: h11 with the header deadline, lingering close and
    connection bound (``GuardedH11``); at most ``max_connections`` connections held (None:
    ``connection_bound()``, after raising the descriptor limit; 0: no bound), one more is
    answered 503 with Retry-After; uvicorn's keep-alive timeout between requests (5 s) and
    h11's bound on a request head (16 KiB, past it 400); ``options`` go to uvicorn.

    Routes are not bounded apart: the expensive ones are bounded by the worker's queue
    (429), so a burst of cheap ones (/health, /v1/models) is answered up to the bound."""
    if max_connections is None:
        raise_descriptor_limit()
        max_connections = connection_bound()
    bound = {"header_timeout": header_timeout, "max_connections": max_connections or None}
    protocol = type("GuardedH11Protocol", (GuardedH11,), bound)
    return uvicorn.Config(app, host=host, port=port, http=protocol, **options)


class BackgroundServer:
    """uvicorn serving ``app`` from a thread, on a free port of the loopback address
    (tests, benchmarks, notebooks).

    Example::

        with BackgroundServer(create_app(pipeline, "smollm2-135m-instruct")) as server:
            OpenAI(base_url=server.url + "/v1", api_key="none").models.list()
    """

    def __init__(self, app, host: str = "127.0.0.1", log_level: str = "warning", *,
                 header_timeout: float | None = DEFAULT_HEADER_TIMEOUT, max_connections: int | None = None):
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
