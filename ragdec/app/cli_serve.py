"""`ragdec serve`: the OpenAI-compatible server and its web chat.

    ragdec serve --store docs.store                     # http://127.0.0.1:8000/ (web chat)
    ragdec serve --store docs.store --port 9000 --model smollm2-135m-instruct
    ragdec serve --faq-db faq.sqlite                    # answers from curated FAQ answers where safe

``register(subparsers)`` adds the command to the main parser (``ragdec.app.cli``).
"""

from __future__ import annotations

import sys

from .cli_common import add_pipeline_arguments, build_pipeline, generation_params
from .worker import DEFAULT_MAX_BATCH, DEFAULT_MAX_QUEUE


def build_app(args):
    """The app the flags describe: the RAG pipeline (``ragdec ask``'s flags), or the FAQ
    service over ``--faq-db``."""
    from .server import create_app

    defaults = generation_params(args)
    if args.faq_db:
        from pathlib import Path

        from ragdec.cache.faq import FaqService
        from ragdec.cache.lookup import QACache

        from .faq_pipeline import FaqPipeline

        if args.store:
            raise ValueError("--faq-db answers from the FAQ alone: drop --store (or serve the store without --faq-db)")
        path = Path(args.faq_db).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"no FAQ cache at {path}: import one with `ragdec faq import FILE --db {path}`")
        service = FaqService(QACache.open(path), model=args.model, max_new_tokens=args.max_new_tokens, cache_generated=not args.no_cache)
        service.generator  # load the model now, not on the first question
        return create_app(FaqPipeline(service), args.model, defaults=defaults, mode="faq", **_scheduling(args))

    pipeline = build_pipeline(args)
    context = getattr(pipeline.generator.model.config, "max_position_embeddings", None)
    return create_app(pipeline, args.model, retriever=pipeline.retriever, defaults=defaults, context_length=context, **_scheduling(args))


def _scheduling(args) -> dict:
    return {"max_batch": args.max_batch, "max_queue": args.max_queue or None, "request_timeout": args.request_timeout}


def cmd_serve(args) -> int:
    import uvicorn

    app = build_app(args)
    print(f"ragdec: serving {args.model} at http://{args.host}:{args.port}/ (web chat; OpenAI API under /v1)", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


def register(subparsers) -> None:
    """Add ``serve`` to an argparse subparsers object."""
    serve = subparsers.add_parser("serve", help="an OpenAI-compatible server with a web chat, over a store or an FAQ")
    add_pipeline_arguments(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--faq-db", metavar="PATH", help="answer from this FAQ cache (`ragdec faq import`) instead of a store")
    serve.add_argument("--max-batch", type=int, default=DEFAULT_MAX_BATCH, metavar="N",
                       help=f"requests decoding together in one batch (default {DEFAULT_MAX_BATCH}; 1: one at a time)")
    serve.add_argument("--max-queue", type=int, default=DEFAULT_MAX_QUEUE, metavar="N",
                       help=f"requests waiting at most; past it the server answers 429 with Retry-After (default {DEFAULT_MAX_QUEUE}; 0: no bound)")
    serve.add_argument("--request-timeout", type=float, metavar="SECONDS",
                       help="end a request that waited and ran longer than this with a clear error (default: no limit)")
    serve.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    serve.set_defaults(func=cmd_serve)
