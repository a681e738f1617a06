"""An OpenAI-compatible server over a ragdec pipeline, with a web chat.

    POST /v1/chat/completions   OpenAI's schema; "stream": true gives server-sent events
                                ending in "data: [DONE]"; a top-level "ragdec" object carries
                                sources, cache outcome and decoding stats
    GET  /v1/models             the one model served
    POST /v1/retrieve           {"query", "k", "mode"} -> the store's passages
    GET  /health                model, queue, and what became of the jobs
    GET  /                      the web chat (one static page)

Every request goes through one ``ModelWorker``: in arrival order, up to ``max_batch`` at
once, whose decodes share one batched loop (continuous batching: a request joins the
running batch between two forwards); past ``max_queue`` waiting requests the server
answers 429 with Retry-After; a request that waited and ran past ``request_timeout`` ends
with a 504 (or an error event, once streaming). A streaming client that disconnects has
its row dropped from the batch between two forward passes. Errors are OpenAI-style bodies, ``{"error": {"message", "type", "param",
"code"}}``, with a 4xx for what the client can fix.

Hostile input and hostile pages (``_Gate``, ``read_json``, ``_GuardedH11``): a request
whose Host header is not this server's name is refused (421: DNS rebinding), /v1 routes
need ``Authorization: Bearer KEY`` when the server has a key (401), a POST must be JSON
(415: a cross-origin form or text POST goes out without asking), a body past
``max_body_kb`` is refused from its Content-Length or as it streams (413) and one that
arrives too slowly is cut (408), the body's JSON is bounded in depth and number size
(``parse_body``), headers that trickle are cut (408), and connections are capped.

Example::

    app = create_app(pipeline, "smollm2-135m-instruct", retriever=pipeline.retriever)
    uvicorn.run(app, host="127.0.0.1", port=8000)
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import time
from http import HTTPStatus
from importlib import resources
from typing import Any, Sequence

try:
    import h11
    import uvicorn
    from fastapi import FastAPI, Request as HttpRequest
    from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException
    from starlette.requests import ClientDisconnect
    from uvicorn.protocols.http.h11_impl import H11Protocol
except ImportError as error:  # pragma: no cover - a dependency of ragdec
    raise ImportError("the server needs FastAPI and uvicorn: pip install fastapi==0.163.2 uvicorn==0.54.0") from error

from ragdec.decoding.methods import GenerationParams
from ragdec.pipelines.types import AUTO

from .openai_api import (
    DEFAULT_BODY_TIMEOUT,
    DEFAULT_HEADER_TIMEOUT,
    DEFAULT_MAX_BODY_KB,
    DEFAULT_MAX_CONNECTIONS,
    ApiError,
    ChatCall,
    completion_body,
    delta_events,
    error_event,
    error_from_chunk,
    final_events,
    parse_body,
    parse_chat,
)
from .worker import DEFAULT_MAX_QUEUE, JobExpired, JobFailed, ModelWorker, QueueFull

SEARCH_MODES = ("dense", "bm25", "hybrid")
LOOPBACK_NAMES = frozenset({"127.0.0.1", "localhost", "[::1]"})
CLOSE = {"Connection": "close"}  # on a refusal sent before the body was read: read no more of it


def create_app(
    pipeline,
    model_name: str,
    *,
    retriever=None,
    defaults: GenerationParams | None = None,
    context_length: int | None = None,
    mode: str = "rag",
    max_batch: int = 1,
    max_queue: int | None = DEFAULT_MAX_QUEUE,
    request_timeout: float | None = None,
    api_key: str | None = None,
    allowed_hosts: Sequence[str] = (),
    max_body_kb: int = DEFAULT_MAX_BODY_KB,
    body_timeout: float | None = DEFAULT_BODY_TIMEOUT,
    docs: bool = False,
) -> FastAPI:
    """The server's app over ``pipeline``.

    Args:
        pipeline: anything with ``stream(requests) -> chunks`` (``RagPipeline``, ``FaqPipeline``).
        model_name: the id clients name in "model" (and GET /v1/models lists).
        retriever: the store behind POST /v1/retrieve (None: that endpoint says there is none).
        defaults: method, max_new_tokens and knobs of requests that do not set them.
        context_length: the model's context, the bound of ``max_tokens``.
        mode: "rag" or "faq", shown by /health and the web chat.
        max_batch: requests decoding together (1: one at a time).
        max_queue: requests waiting at most; past it, 429 (None: no bound).
        request_timeout: seconds from arrival to the answer's end (None: no limit).
        api_key: the key /v1 routes need as ``Authorization: Bearer KEY`` (None: none).
        allowed_hosts: Host names served besides this machine's loopback names and the
            address a request came in on (``host_allowed``).
        max_body_kb: the largest request body; past it, 413.
        body_timeout: seconds from the end of the headers to the end of the body; past
            it, 408 (None: no limit).
        docs: serve FastAPI's /docs, /redoc and /openapi.json.
    """
    defaults = defaults or GenerationParams(max_new_tokens=256, method=AUTO)
    if max_batch < 1:
        raise ValueError(f"max_batch must be at least 1, got {max_batch}")
    generator = getattr(pipeline, "generator", None)
    engine = generator.start_batching(max_batch) if max_batch > 1 and generator is not None else None
    worker = ModelWorker(threads=max_batch, max_queue=max_queue, deadline_s=request_timeout)
    started = int(time.time())
    page = resources.files("ragdec.app").joinpath("static/chat.html").read_text(encoding="utf-8")

    @contextlib.asynccontextmanager
    async def lifespan(_):
        yield
        worker.close()
        if engine is not None:
            generator.stop_batching()

    shown = {"docs_url": "/docs", "redoc_url": "/redoc", "openapi_url": "/openapi.json"}
    app = FastAPI(title="ragdec", description="OpenAI-compatible answers over a ragdec pipeline", version="0.1.0", lifespan=lifespan,
                  **{name: path if docs else None for name, path in shown.items()})
    app.state.worker = worker
    app.add_middleware(_Gate, api_key=api_key, allowed_hosts=allowed_hosts)

    @app.exception_handler(ApiError)
    async def _api_error(_, error: ApiError):
        return JSONResponse(error.body, status_code=error.status, headers=error.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_, error: StarletteHTTPException):
        body = ApiError(error.status_code, str(error.detail), None, "not_found" if error.status_code == 404 else None).body
        return JSONResponse(body, status_code=error.status_code)

    @app.exception_handler(Exception)
    async def _server_error(_, error: Exception):  # a bug of ours: still in OpenAI's shape, details in the log
        message = f"the server failed on this request ({type(error).__name__}): its log has the details"
        return JSONResponse(ApiError(500, message, type="server_error").body, status_code=500)

    async def body_of(http: HttpRequest) -> Any:
        return await read_json(http, max_body_kb * 1024, body_timeout)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def web_chat():
        return HTMLResponse(page)

    @app.get("/health")
    async def health():
        live = worker.live and (engine is None or engine.alive)
        batch = {"max_batch": max_batch, "rows": engine.rows if engine else worker.running}
        if engine is not None:
            batch.update(steps=engine.steps, failed_steps=engine.failed_steps, last_error=engine.last_error or None,
                         seconds_since_step=round(time.time() - engine.last_step_at, 1) if engine.rows else None)
        body = {
            "status": "ok" if live else "down",
            "model": model_name,
            "mode": mode,
            "store": str(getattr(retriever, "folder", "")) or None,
            "worker": {"live": live, "threads": worker.threads, "batch_engine": engine is not None},
            "queue": {"waiting": worker.waiting, "running": worker.running, "max_queue": max_queue},
            "batch": batch,
            "jobs": {k: worker.counts.get(k, 0) for k in ("done", "cancelled", "failed", "expired", "refused")},
        }
        return JSONResponse(body, status_code=200 if live else 503)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [_model_card(model_name, started)]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        if model_id != model_name:
            raise ApiError(404, f"the model {model_id!r} does not exist here: this server answers with {model_name!r}",
                           "model", "model_not_found")
        return _model_card(model_name, started)

    @app.post("/v1/chat/completions")
    async def chat_completions(http: HttpRequest):
        call = parse_chat(await body_of(http), model_name, defaults, context_length)
        job = _submit(worker, lambda: pipeline.stream([call.request]))
        watch = asyncio.create_task(_cancel_on_disconnect(http, job))
        try:
            if call.stream:
                return await _stream(call, job)
            texts, last = [], None
            async for chunk in job.items():
                texts.append(chunk.text)
                if chunk.finish_reason is not None:
                    last = chunk
        except JobFailed as error:
            raise ApiError(500, f"the model failed on this request: {error}", None, None, "server_error") from error
        except JobExpired as error:
            worker.counts["expired"] += 1
            raise _expired(error) from None
        finally:
            watch.cancel()
        if last is None or last.finish_reason == "error":
            raise error_from_chunk(last) if last else ApiError(500, "the pipeline ended without an answer", type="server_error")
        return completion_body(call, "".join(texts), last, job.queue_seconds)

    @app.post("/v1/retrieve")
    async def retrieve(http: HttpRequest):
        body = await body_of(http)
        if retriever is None:
            raise ApiError(400, "this server has no document store: start it with `ragdec serve --store DIR`", None, "no_store")
        query = body.get("query") if isinstance(body, dict) else None
        if not isinstance(query, str) or not query.strip():
            raise ApiError(400, "'query' must be a non-empty string", "query")
        k = body.get("k", 5)
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= 100:
            raise ApiError(400, f"'k' must be an integer between 1 and 100 (got {k!r})", "k")
        search_mode = body.get("mode", "dense")
        if search_mode not in SEARCH_MODES:
            raise ApiError(400, f"'mode' must be one of {', '.join(SEARCH_MODES)} (got {search_mode!r})", "mode")
        job = _submit(worker, lambda: [retriever.search(query, k=k, mode=search_mode)])
        try:
            hits = [hits async for hits in job.items()][0]
        except JobFailed as error:
            raise ApiError(500, f"retrieval failed: {error}", None, None, "server_error") from error
        except JobExpired as error:
            worker.counts["expired"] += 1
            raise _expired(error) from None
        data = [{"object": "passage", "rank": h.rank, "id": h.id, "title": h.title, "text": h.text, "score": h.score,
                 "source": h.passage.source} for h in hits]
        return {"object": "list", "query": query, "mode": search_mode, "data": data}

    return app


def _submit(worker: ModelWorker, work):
    """Queue ``work``, or refuse with 429 and Retry-After when the queue is full."""
    try:
        return worker.submit(work)
    except QueueFull as full:
        raise ApiError(
            429, f"the server is busy ({full}): retry after {full.retry_after} s", None, "rate_limit_exceeded",
            "rate_limit_error", headers={"Retry-After": str(full.retry_after)},
        ) from None


def _expired(error: JobExpired) -> ApiError:
    return ApiError(504, f"the request took too long ({error}): ask again, or for fewer tokens", None, "timeout", "server_error")


def _model_card(model_name: str, created: int) -> dict:
    return {"id": model_name, "object": "model", "created": created, "owned_by": "ragdec"}


async def read_json(http: HttpRequest, max_bytes: int, timeout: float | None) -> Any:
    """The request's body as JSON (``parse_body``), read whole within ``max_bytes`` and
    ``timeout`` seconds: 413 from the Content-Length before a byte is read, or as soon as a
    chunked body passes the bound; 408 when it arrives too slowly. Both close the
    connection, so the rest of the body is never read."""
    declared = http.headers.get("content-length")  # digits: h11 checked them
    if declared is not None and int(declared) > max_bytes:
        raise _too_large(f"{int(declared):,} bytes", max_bytes)

    async def read() -> bytes:
        chunks, size = [], 0
        async for chunk in http.stream():
            size += len(chunk)
            if size > max_bytes:
                raise _too_large(f"over {max_bytes:,} bytes", max_bytes)
            chunks.append(chunk)
        return b"".join(chunks)

    try:
        raw = await asyncio.wait_for(read(), timeout)
    except asyncio.TimeoutError:
        raise ApiError(408, f"the body did not arrive within {timeout:g} s of the headers: send it at once", None,
                       "body_timeout", headers=CLOSE) from None
    except ClientDisconnect:
        raise ApiError(400, "the connection closed before the body ended", None, "body_incomplete") from None
    return parse_body(raw)


def _too_large(size: str, max_bytes: int) -> ApiError:
    return ApiError(413, f"the body is {size}, over this server's limit of {max_bytes // 1024:,} KB (ragdec serve "
                    "--max-body-kb): send less text, or index long documents with `ragdec index build`", None,
                    "body_too_large", headers=CLOSE)


async def _cancel_on_disconnect(http: HttpRequest, job) -> None:
    """Cancel ``job`` if its client goes away before the answer begins to stream (while
    queued, or waiting for a whole answer). A stream's own end cancels it after that."""
    while not job.completed:
        if await http.is_disconnected():
            job.cancel()
            return
        await asyncio.sleep(0.25)


async def _stream(call: ChatCall, job) -> StreamingResponse | JSONResponse:
    """Stream the answer as server-sent events. The first chunk is awaited before the
    response begins, so that a refused request (a prompt over the context, say) still gets
    its 4xx status instead of an error inside a 200 stream."""
    items = job.items().__aiter__()
    try:
        first = await items.__anext__()
    except JobFailed as error:
        raise ApiError(500, f"the model failed on this request: {error}", None, None, "server_error") from error
    except StopAsyncIteration:  # cancelled before it began: its client is gone
        raise ApiError(503, "the request was cancelled before it was answered", None, "cancelled", "server_error") from None
    except JobExpired as error:
        raise _expired(error) from None
    if first.finish_reason == "error":
        raise error_from_chunk(first)

    async def events():
        try:
            chunk, is_first = first, True
            while True:
                if chunk.finish_reason == "error":
                    yield error_event(error_from_chunk(chunk))
                    yield "data: [DONE]\n\n"
                    return
                for event in delta_events(call, chunk, is_first):
                    yield event
                if chunk.finish_reason is not None:
                    job.completed = True  # the answer is out: what the pipeline does after it is not cancelled
                    for event in final_events(call, chunk, job.queue_seconds):
                        yield event
                    return
                chunk, is_first = await items.__anext__(), False
        except JobFailed as error:
            yield error_event(ApiError(500, f"the model failed on this request: {error}", type="server_error"))
            yield "data: [DONE]\n\n"
        except JobExpired as error:
            yield error_event(_expired(error))
            yield "data: [DONE]\n\n"
        finally:
            job.cancel()  # the client went away mid-stream (no-op after the end): stop decoding

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(events(), media_type="text/event-stream", headers=headers)


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


class _Gate:
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


class _GuardedH11(H11Protocol):
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
    """uvicorn's settings for ``app``: h11 with the header deadline (``_GuardedH11``), at
    most ``max_connections`` connections served (uvicorn's ``limit_concurrency``: a request
    on one more gets 503, text/plain), uvicorn's keep-alive timeout between requests (5 s)
    and h11's bound on a request head (16 KiB, past it 400); ``options`` go to uvicorn."""
    protocol = type("GuardedH11Protocol", (_GuardedH11,), {"header_timeout": header_timeout})
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
