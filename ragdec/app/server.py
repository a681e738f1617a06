"""An OpenAI-compatible server over a ragdec pipeline, with a web chat.

    POST /v1/chat/completions   OpenAI's schema; "stream": true gives server-sent events
                                ending in "data: [DONE]"; a top-level "ragdec" object carries
                                sources, cache outcome and decoding stats
    GET  /v1/models             the one model served
    POST /v1/retrieve           {"query", "k", "mode"} -> the store's passages
    POST /v1/embeddings         OpenAI's schema, from the store's embedder (``embeddings.py``)
    GET  /metrics               Prometheus' text format (``metrics.py``)
    GET  /health                model, engine (local or remote), queue, and what became of the jobs
    GET  /                      the web chat (one static page)

Every request goes through one ``ModelWorker``: in arrival order, up to ``max_batch`` at
once, whose decodes share one batched loop (continuous batching: a request joins the
running batch between two forwards); past ``max_queue`` waiting requests the server
answers 429 with Retry-After; a request that waited and ran past ``request_timeout`` ends
with a 504 (or an error event, once streaming). A streaming client that disconnects has
its row dropped from the batch between two forward passes. Errors are OpenAI-style bodies, ``{"error": {"message", "type", "param",
"code"}}``, with a 4xx for what the client can fix.

Hostile input and hostile pages (``transport.Gate``, ``read_json``, ``transport.GuardedH11``): a request
whose Host header is not this server's name is refused (421: DNS rebinding), /v1 routes
need ``Authorization: Bearer KEY`` when the server has a key (401), a POST must be JSON
(415: a cross-origin form or text POST goes out without asking), a body past
``max_body_kb`` is refused from its Content-Length or as it streams (413) and one that
arrives too slowly is cut (408), the body's JSON is bounded in depth and number size
(``parse_body``), headers that trickle are cut (408), and connections are capped.

Example::

    app = create_app(pipeline, "smollm2-135m-instruct", engine=pipeline.engine, retriever=pipeline.retriever)
    uvicorn.run(app, host="127.0.0.1", port=8000)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from importlib import resources
from typing import Any, Sequence

try:
    from fastapi import FastAPI, Request as HttpRequest
    from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException
    from starlette.requests import ClientDisconnect
except ImportError as error:  # pragma: no cover - a dependency of ragdec
    raise ImportError("the server needs FastAPI and uvicorn: pip install fastapi==0.163.2 uvicorn==0.54.0") from error

from ragdec.decoding.methods import GenerationParams
from ragdec.pipelines.engine import Engine
from ragdec.pipelines.types import AUTO

from .build import ANSWER_MAX_NEW_TOKENS

from .openai_api import (
    DEFAULT_BODY_TIMEOUT,
    DEFAULT_MAX_BODY_KB,
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
from .embeddings import embed, embeddings_body, parse_embeddings, token_counts
from .metrics import ServerMetrics
from .transport import CLOSE, BackgroundServer, Gate, host_allowed, server_config
from .worker import DEFAULT_MAX_QUEUE, JobExpired, JobFailed, ModelWorker, QueueFull

SEARCH_MODES = ("dense", "bm25", "hybrid")

log = logging.getLogger(__name__)


def create_app(
    pipeline,
    model_name: str,
    *,
    engine: Engine | None = None,
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
    metrics_public: bool = False,
) -> FastAPI:
    """The server's app over ``pipeline``.

    Args:
        pipeline: anything with ``stream(requests) -> chunks`` (``RagPipeline``, ``FaqPipeline``).
        model_name: the id clients name in "model" (and GET /v1/models lists).
        engine: what answers the pipeline's prompts (a ``RagPipeline``'s ``engine``): /health
            describes it, and with ``max_batch`` > 1 it batches concurrent requests. None:
            the pipeline decodes on its own (the FAQ service), one request per thread.
        retriever: the store behind POST /v1/retrieve (None: that endpoint says there is none).
        defaults: method, max_new_tokens and knobs of requests that do not set them.
        context_length: the bound of ``max_tokens`` (None: the engine's context, or none).
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
        metrics_public: serve /metrics without the API key (a scraper inside the network).
    """
    if max_batch < 1:
        raise ValueError(f"max_batch must be at least 1, got {max_batch}")
    if engine is not None and max_batch > 1:
        engine.start_batching(max_batch)
    worker = ModelWorker(threads=max_batch, max_queue=max_queue, deadline_s=request_timeout)
    serving = _Serving(
        pipeline=pipeline, model_name=model_name, engine=engine, retriever=retriever,
        defaults=defaults or GenerationParams(max_new_tokens=ANSWER_MAX_NEW_TOKENS, method=AUTO),
        context_length=context_length if context_length is not None or engine is None else engine.context_length,
        mode=mode, max_batch=max_batch, max_queue=max_queue,
        worker=worker, metrics=ServerMetrics(running=lambda: worker.running, waiting=lambda: worker.waiting),
        max_body_bytes=max_body_kb * 1024, body_timeout=body_timeout, started=int(time.time()),
    )
    app = _new_app(serving, api_key, allowed_hosts, docs, metrics_public)
    _add_error_handlers(app, serving.metrics)
    _add_status_routes(app, serving)
    _add_chat_route(app, serving)
    _add_retrieve_route(app, serving)
    _add_embeddings_route(app, serving)
    return app


@dataclass(frozen=True)
class _Serving:
    """What the routes of one app share."""

    pipeline: Any  # stream(requests) -> chunks
    model_name: str  # the id clients name in "model"
    engine: Engine | None  # what answers the pipeline's prompts; None: the pipeline decodes on its own
    retriever: Any  # the store behind POST /v1/retrieve, or None
    defaults: GenerationParams  # of requests that do not set them
    context_length: int | None  # the bound of max_tokens; None: none
    mode: str  # "rag" | "faq"
    max_batch: int  # requests decoding together
    max_queue: int | None  # requests waiting at most
    worker: ModelWorker  # the queue every piece of model work goes through
    metrics: ServerMetrics  # what GET /metrics shows
    max_body_bytes: int  # the largest request body
    body_timeout: float | None  # seconds for a body to arrive after its headers
    started: int  # time.time() at start: the model card's "created"

    async def body_of(self, http: HttpRequest) -> Any:
        return await read_json(http, self.max_body_bytes, self.body_timeout)

    def health(self) -> tuple[dict, bool]:
        """/health's body, and whether the server is live (the worker's threads and the
        engine's batch, when it keeps one, running)."""
        worker = self.worker
        batch = self.engine.batch_status() if self.engine is not None else None
        live = worker.live and (batch is None or batch.alive)
        figures: dict[str, Any] = {"max_batch": self.max_batch, "rows": batch.rows if batch else worker.running}
        if batch is not None:
            figures.update(steps=batch.steps, failed_steps=batch.failed_steps, last_error=batch.last_error or None,
                           seconds_since_step=round(time.time() - batch.last_step_at, 1) if batch.rows else None)
        body = {
            "status": "ok" if live else "down",
            "model": self.model_name,
            "engine": self.engine.describe() if self.engine is not None else {"kind": "local"},
            "mode": self.mode,
            "store": str(getattr(self.retriever, "folder", "")) or None,
            "worker": {"live": live, "threads": worker.threads, "batching": batch is not None},
            "queue": {"waiting": worker.waiting, "running": worker.running, "max_queue": self.max_queue},
            "batch": figures,
            "jobs": {k: worker.counts.get(k, 0) for k in ("done", "cancelled", "failed", "expired", "refused")},
        }
        return body, live


def _new_app(serving: _Serving, api_key: str | None, allowed_hosts: Sequence[str], docs: bool,
             metrics_public: bool) -> FastAPI:
    """The FastAPI app behind the gate (Host, key, content type), which stops the worker
    and the engine's batch when it shuts down."""

    @contextlib.asynccontextmanager
    async def lifespan(_):
        yield
        serving.worker.close()
        if serving.engine is not None:
            serving.engine.stop_batching()

    shown = {"docs_url": "/docs", "redoc_url": "/redoc", "openapi_url": "/openapi.json"}
    app = FastAPI(title="ragdec", description="OpenAI-compatible answers over a ragdec pipeline", version="0.1.0", lifespan=lifespan,
                  **{name: path if docs else None for name, path in shown.items()})
    app.state.worker = serving.worker
    app.add_middleware(Gate, api_key=api_key, allowed_hosts=allowed_hosts, metrics_public=metrics_public)
    return app


def _add_error_handlers(app: FastAPI, metrics: ServerMetrics) -> None:
    """Every error in OpenAI's shape, ``{"error": {...}}``, counted in /metrics."""

    @app.exception_handler(ApiError)
    async def _api_error(_, error: ApiError):
        metrics.observe_refusal(error.status)
        return JSONResponse(error.body, status_code=error.status, headers=error.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_, error: StarletteHTTPException):
        body = ApiError(error.status_code, str(error.detail), None, "not_found" if error.status_code == 404 else None).body
        return JSONResponse(body, status_code=error.status_code)

    @app.exception_handler(Exception)
    async def _server_error(_, error: Exception):  # a bug of ours: still in OpenAI's shape, details in the log
        message = f"the server failed on this request ({type(error).__name__}): its log has the details"
        metrics.observe_refusal(500)
        return JSONResponse(ApiError(500, message, type="server_error").body, status_code=500)


def _add_status_routes(app: FastAPI, serving: _Serving) -> None:
    """GET /, /health, /v1/models and /v1/models/{id}."""
    page = resources.files("ragdec.app").joinpath("static/chat.html").read_text(encoding="utf-8")
    model_name = serving.model_name

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def web_chat():
        return HTMLResponse(page)

    @app.get("/health")
    async def health():
        body, live = serving.health()
        return JSONResponse(body, status_code=200 if live else 503)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [_model_card(model_name, serving.started)]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        if model_id != model_name:
            raise ApiError(404, f"the model {model_id!r} does not exist here: this server answers with {model_name!r}",
                           "model", "model_not_found")
        return _model_card(model_name, serving.started)

    @app.get("/metrics", include_in_schema=False)
    async def metrics():
        body, content_type = serving.metrics.render()
        return Response(body, media_type=content_type)


def _add_chat_route(app: FastAPI, serving: _Serving) -> None:
    """POST /v1/chat/completions: the request queued on the worker, its answer whole or streamed."""
    worker = serving.worker

    @app.post("/v1/chat/completions")
    async def chat_completions(http: HttpRequest):
        arrived = time.perf_counter()
        call = parse_chat(await serving.body_of(http), serving.model_name, serving.defaults, serving.context_length)
        job = _submit(worker, lambda: serving.pipeline.stream([call.request]))
        watch = asyncio.create_task(_cancel_on_disconnect(http, job))
        items = _observed(job, serving.metrics, arrived)
        try:
            if call.stream:
                return await _stream(call, job, items)
            texts, last = [], None
            async for chunk in items:
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
            raise _refusal(last) if last else ApiError(500, "the pipeline ended without an answer", type="server_error")
        return completion_body(call, "".join(texts), last, job.queue_seconds)


def _add_retrieve_route(app: FastAPI, serving: _Serving) -> None:
    """POST /v1/retrieve: the store's passages for a query, searched on the worker."""
    worker, retriever = serving.worker, serving.retriever

    @app.post("/v1/retrieve")
    async def retrieve(http: HttpRequest):
        body = await serving.body_of(http)
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
        hits = await _run_once(worker, lambda: retriever.search(query, k=k, mode=search_mode), "retrieval")
        data = [{"object": "passage", "rank": h.rank, "id": h.id, "title": h.title, "text": h.text, "score": h.score,
                 "source": h.passage.source} for h in hits]
        return {"object": "list", "query": query, "mode": search_mode, "data": data}


def _add_embeddings_route(app: FastAPI, serving: _Serving) -> None:
    """POST /v1/embeddings: the store's embedder, on the worker (``embeddings.py``)."""
    worker = serving.worker
    embedder = serving.retriever.embedder if serving.retriever is not None else None

    @app.post("/v1/embeddings")
    async def embeddings(http: HttpRequest):
        body = await serving.body_of(http)
        if embedder is None:
            raise ApiError(400, "this server has no embedder: start it with `ragdec serve --store DIR`, whose "
                           "embedder it serves", None, "no_store")
        call = parse_embeddings(body, embedder.info.name)
        tokens = token_counts(embedder, call.texts, embedder.info.max_tokens)
        vectors = await _run_once(worker, lambda: embed(embedder, call), "embedding")
        return embeddings_body(call, embedder.info.name, vectors, tokens)


async def _run_once(worker: ModelWorker, work, what: str):
    """``work()``'s one result, computed on the worker's queue like every piece of model
    work (429 when it is full, 504 past the request timeout, 500 naming ``what`` failed)."""
    job = _submit(worker, lambda: [work()])
    try:
        return [result async for result in job.items()][0]
    except JobFailed as error:
        raise ApiError(500, f"{what} failed: {error}", None, None, "server_error") from error
    except JobExpired as error:
        worker.counts["expired"] += 1
        raise _expired(error) from None


def _submit(worker: ModelWorker, work):
    """Queue ``work``, or refuse with 429 and Retry-After when the queue is full."""
    try:
        return worker.submit(work)
    except QueueFull as full:
        raise ApiError(
            429, f"the server is busy ({full}): retry after {full.retry_after} s", None, "rate_limit_exceeded",
            "rate_limit_error", headers={"Retry-After": str(full.retry_after)},
        ) from None


def _refusal(chunk) -> ApiError:
    """``error_from_chunk``, logged when the engine failed (a remote server unreachable or cut
    off): the operator sees it even where the client's status cannot tell (a stream already
    begun is a 200)."""
    if chunk.info is not None and chunk.info.engine_failed:
        log.warning("the engine failed on a request: %s", chunk.info.error)
    return error_from_chunk(chunk)


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


async def _observed(job, metrics: ServerMetrics, arrived: float):
    """``job``'s chunks, counted in ``metrics`` when the last one comes (TTFT from the first
    chunk with text, end to end from the last)."""
    first_text = None
    async for chunk in job.items():
        if first_text is None and chunk.text:
            first_text = time.perf_counter() - arrived
        if chunk.finish_reason is not None:
            metrics.observe_answer(chunk, job.queue_seconds, first_text, time.perf_counter() - arrived)
        yield chunk


async def _stream(call: ChatCall, job, chunks) -> StreamingResponse | JSONResponse:
    """Stream the answer as server-sent events. The first chunk is awaited before the
    response begins, so that a refused request (a prompt over the context, say) still gets
    its 4xx status instead of an error inside a 200 stream."""
    items = chunks.__aiter__()
    try:
        first = await items.__anext__()
    except JobFailed as error:
        raise ApiError(500, f"the model failed on this request: {error}", None, None, "server_error") from error
    except StopAsyncIteration:  # cancelled before it began: its client is gone
        raise ApiError(503, "the request was cancelled before it was answered", None, "cancelled", "server_error") from None
    except JobExpired as error:
        raise _expired(error) from None
    if first.finish_reason == "error":
        raise _refusal(first)

    async def events():
        try:
            chunk, is_first = first, True
            while True:
                if chunk.finish_reason == "error":
                    yield error_event(_refusal(chunk))
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


__all__ = ["BackgroundServer", "create_app", "host_allowed", "server_config"]  # the transport's parts, served from here too
