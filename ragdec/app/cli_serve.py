"""`ragdec serve`: the OpenAI-compatible server and its web chat.

    ragdec serve --store docs.store                     # http://127.0.0.1:8000/ (web chat)
    ragdec serve --store docs.store --port 9000 --model smollm2-135m-instruct
    ragdec serve --faq-db faq.sqlite                    # answers from curated FAQ answers where safe
    ragdec serve --store docs.store --host 0.0.0.0 --api-key KEY --allowed-host docs.example.org
    ragdec serve --store docs.store --engine openai --base-url http://10.0.0.5:8000/v1 --remote-model NAME

``register(subparsers)`` adds the command to the main parser (``ragdec.app.cli``).
"""

from __future__ import annotations

import ipaddress
import os
import sys

from .cli_common import DEFAULT_DTYPE, add_pipeline_arguments, build_pipeline, generation_params, pipeline_model
from .openai_api import DEFAULT_BODY_TIMEOUT, DEFAULT_HEADER_TIMEOUT, DEFAULT_MAX_BODY_KB
from .worker import DEFAULT_MAX_BATCH, DEFAULT_MAX_QUEUE

WILDCARD_HOSTS = ("0.0.0.0", "::", "")  # every address: not a name a client can send as Host


def build_app(args):
    """The app the flags describe: the RAG pipeline (``ragdec ask``'s flags), or the FAQ
    service over ``--faq-db``."""
    from .server import create_app

    defaults = generation_params(args)
    if args.faq_db:
        from pathlib import Path

        from ragdec.cache.backends import cache_location
        from ragdec.cache.faq import FaqService
        from ragdec.cache.lookup import QACache

        from .faq_pipeline import FaqPipeline

        if args.store:
            raise ValueError("--faq-db answers from the FAQ alone: drop --store (or serve the store without --faq-db)")
        if args.engine != "local":
            raise ValueError("--faq-db decodes in this process: drop --engine openai (or serve a store with it)")
        location = cache_location(args.faq_db)  # a file, or a postgresql:// URL that replicas share
        if isinstance(location, Path) and not location.is_file():
            raise FileNotFoundError(f"no FAQ cache at {location}: import one with `ragdec faq import FILE --db {location}`")
        model = pipeline_model(args)
        service = FaqService(QACache.open(location, create=False), model=model, max_new_tokens=args.max_new_tokens,
                             cache_generated=not args.no_cache, dtype=args.dtype or DEFAULT_DTYPE)
        service.generator  # load the model now, not on the first question
        return create_app(FaqPipeline(service), model, defaults=defaults, mode="faq", **_scheduling(args), **access_settings(args))

    # a remote engine: clients name the remote model, and --max-batch requests are in flight to it at once
    pipeline = build_pipeline(args)
    return create_app(pipeline, pipeline_model(args), engine=pipeline.engine, retriever=pipeline.retriever, defaults=defaults,
                      **_scheduling(args), **access_settings(args))


def _scheduling(args) -> dict:
    return {"max_batch": args.max_batch, "max_queue": args.max_queue or None, "request_timeout": args.request_timeout}


def api_key(args) -> str | None:
    """``--api-key``, else ``$RAGDEC_API_KEY``; None when neither is set (or empty)."""
    return args.api_key or os.environ.get("RAGDEC_API_KEY") or None


def access_settings(args) -> dict:
    """Who may talk to the app, and what one request may be: ``create_app``'s arguments."""
    hosts = list(args.allowed_host or [])
    if _address(args.host) is None and args.host not in ("localhost", ""):
        hosts.append(args.host)  # the name it was started with (an address is allowed at its port anyway)
    return {"api_key": api_key(args), "allowed_hosts": hosts, "max_body_kb": args.max_body_kb,
            "body_timeout": args.body_timeout or None, "docs": args.docs, "metrics_public": args.metrics_public}


def exposure_warnings(args) -> list[str]:
    """What to tell the user who opens the server beyond this machine."""
    if _is_loopback(args.host):
        return []
    warnings = []
    if api_key(args) is None:
        warnings.append(f"listening on {args.host or 'every address'} without an API key: anyone who can reach port "
                        f"{args.port} can ask the model and read the store; set --api-key KEY (or $RAGDEC_API_KEY)")
    if args.host in WILDCARD_HOSTS and not args.allowed_host:
        warnings.append("clients must name the server by its IP address; add --allowed-host NAME for each name they use")
    return warnings


def _is_loopback(host: str) -> bool:
    address = _address(host)
    return host == "localhost" or (address is not None and address.is_loopback)


def _address(host: str):
    """``host`` as an IP address, or None for a name (which may resolve anywhere)."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def cmd_serve(args) -> int:
    import uvicorn

    from .server import server_config

    app = build_app(args)
    for warning in exposure_warnings(args):
        print(f"ragdec: warning: {warning}", file=sys.stderr)
    through = f" through {args.base_url}" if args.engine == "openai" else ""
    print(f"ragdec: serving {pipeline_model(args)}{through} at http://{args.host}:{args.port}/ (web chat; OpenAI API under /v1)",
          file=sys.stderr)
    config = server_config(app, args.host, args.port, header_timeout=args.header_timeout or None,
                           max_connections=args.max_connections, log_level=args.log_level)
    uvicorn.Server(config).run()
    return 0


def register(subparsers) -> None:
    """Add ``serve`` to an argparse subparsers object."""
    serve = subparsers.add_parser("serve", help="an OpenAI-compatible server with a web chat, over a store or an FAQ")
    add_pipeline_arguments(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--faq-db", metavar="PATH|URL", help="answer from this FAQ cache (`ragdec faq import`; a file or a "
                       "postgresql:// URL) instead of a store")
    serve.add_argument("--max-batch", type=int, default=DEFAULT_MAX_BATCH, metavar="N",
                       help=f"requests decoding together in one batch (default {DEFAULT_MAX_BATCH}; 1: one at a time); "
                       "with --engine openai, requests in flight to the server at once")
    serve.add_argument("--max-queue", type=int, default=DEFAULT_MAX_QUEUE, metavar="N",
                       help=f"requests waiting at most; past it the server answers 429 with Retry-After (default {DEFAULT_MAX_QUEUE}; 0: no bound)")
    serve.add_argument("--request-timeout", type=float, metavar="SECONDS",
                       help="end a request that waited and ran longer than this with a clear error (default: no limit)")
    access = serve.add_argument_group("access and limits", "who may talk to the server, and what one request may take")
    access.add_argument("--api-key", metavar="KEY", help="require Authorization: Bearer KEY on every /v1 route "
                        "(default: $RAGDEC_API_KEY, which keeps the key out of `ps`; unset: no key)")
    access.add_argument("--allowed-host", action="append", metavar="NAME", help="a Host name to answer besides "
                        "127.0.0.1, localhost, [::1] and --host (NAME at any port, NAME:PORT at one, * any); repeatable; "
                        "other names get 421, which stops DNS rebinding")
    access.add_argument("--max-body-kb", type=int, default=DEFAULT_MAX_BODY_KB, metavar="KB",
                        help=f"largest request body; past it, 413 (default {DEFAULT_MAX_BODY_KB})")
    access.add_argument("--body-timeout", type=float, default=DEFAULT_BODY_TIMEOUT, metavar="SECONDS",
                        help=f"time for a body to arrive after its headers; past it, 408 (default {DEFAULT_BODY_TIMEOUT:g}; 0: no limit)")
    access.add_argument("--header-timeout", type=float, default=DEFAULT_HEADER_TIMEOUT, metavar="SECONDS",
                        help=f"time for a request's headers to arrive; past it, 408 and the connection closes "
                        f"(default {DEFAULT_HEADER_TIMEOUT:g}; 0: no limit)")
    access.add_argument("--max-connections", type=int, metavar="N",
                        help="open connections at most; one past it gets 503 with Retry-After (default: as many as the "
                        "descriptor limit and a quarter of the free memory allow; 0: no bound)")
    access.add_argument("--docs", action="store_true", help="serve FastAPI's /docs, /redoc and /openapi.json (default: off)")
    access.add_argument("--metrics-public", action="store_true", help="serve GET /metrics without the API key, for a "
                        "Prometheus scraper that sends none (default: /metrics needs the key when there is one)")
    serve.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    serve.set_defaults(func=cmd_serve)
