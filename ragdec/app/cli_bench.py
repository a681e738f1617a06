"""`ragdec bench WORKLOAD`: methods against Hugging Face baselines, or the pipeline, PiD,
retrieval, cache and server benchmarks (bench/).

    ragdec bench rag --methods hf-greedy,greedy,llma --limit 12 --json bench/results/llma_rag.json
    ragdec bench pid --limit 4

Each workload owns its defaults (answer length, methods, model): a flag left out reaches it
as None, so that an explicit value is always the user's. ``register(subparsers)`` adds the
command to the main parser (``ragdec.app.cli``).
"""

from __future__ import annotations

import argparse

from .cli_common import DEFAULT_MODEL, add_dtype_argument, add_method_knobs, given, method_knobs, write_json

DECODING_METHODS = ("hf-greedy", "greedy", "hf-prompt-lookup")  # the decoding workloads' default --methods


def cmd_bench(args) -> int:
    methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None
    if args.workload == "retrieval":
        from ragdec.bench.retrieval import FLAGS, run_retrieval_bench

        run_retrieval_bench(args.data, args.json, **{k: getattr(args, k) for k in FLAGS})
        return 0
    if args.workload == "cache":
        from ragdec.bench.cache import run_cache_bench

        run_cache_bench(args.data, args.json)
        return 0
    if args.workload == "cag-near":
        from ragdec.bench.cag_near import run_cag_near_bench

        run_cag_near_bench(args.data, args.json, **given(model=args.model, pairs=args.limit, max_new_tokens=args.max_new_tokens,
                                                         dtype=args.dtype, near_in_prompt=args.near_in_prompt))
        return 0
    if args.workload == "llamacpp-verify":
        from ragdec.bench.llamacpp_verify import run_llamacpp_verify_bench

        run_llamacpp_verify_bench(args.json, args.model, args.data, **given(prompts=args.limit))
        return 0
    if args.workload == "connection-cost":
        from ragdec.bench.connection_cost import run_connection_cost_bench

        run_connection_cost_bench(args.json)
        return 0
    if args.workload == "first-answer":
        from ragdec.bench.first_answer import run_first_answer_bench

        run_first_answer_bench(args.json, args.model, **given(rounds=args.limit))
        return 0
    if args.workload == "pid":
        from ragdec.bench.pid import run_pid_bench

        run_pid_bench(args.data, args.json, **given(model=args.model, methods=methods, limit=args.limit, max_new_tokens=args.max_new_tokens))
        return 0
    if args.workload == "prefill-chunk":
        from ragdec.bench.prefill_chunk import run_prefill_chunk_bench

        run_prefill_chunk_bench(args.json, args.model, args.data)
        return 0
    if args.workload == "server-load" and args.load:
        from ragdec.bench.server_batch import run_server_batch

        batches = tuple(int(b) for b in args.max_batch.split(",")) if args.max_batch else None
        run_server_batch(args.json, args.load, args.data, **given(
            model=args.model, store=args.store, clients=args.clients, requests_per_client=args.requests_per_client,
            max_batch=batches, max_new_tokens=args.max_new_tokens,
        ))
        return 0
    if args.workload == "server-load":
        from ragdec.bench.server_load import run_server_load

        result = run_server_load(args.json, **given(
            model=args.model, max_new_tokens=args.max_new_tokens, clients=args.clients, requests_per_client=args.requests_per_client,
        ))
        return 0 if result["ok"] else 1
    if args.workload in ("qa", "chat-pipeline"):
        from ragdec.bench import qa

        # through a remote server, a model named is only the tokenizer that measures prompts (none: the estimate)
        model = args.model if args.engine == "openai" else args.model or DEFAULT_MODEL
        common = dict(model=model, methods=methods, limit=args.limit) | given(max_new_tokens=args.max_new_tokens)
        if args.workload == "qa":
            qa.run_qa_bench(args.data, args.json, **common, **given(k=args.k, engine=args.engine, base_url=args.base_url, dtype=args.dtype,
                                                                     remote_model=args.remote_model))
        else:
            qa.run_chat_bench(args.data, args.json, **common, **given(turns=args.turns))
        return 0
    from ragdec.bench.harness import BenchConfig, format_table, run_bench

    knobs = method_knobs(args)
    config = BenchConfig(
        workload=args.workload,
        model=args.model or DEFAULT_MODEL,
        methods=methods or list(DECODING_METHODS),
        limit=args.limit,
        data=args.data,
        assistant=args.assistant or knobs.get("draft_model"),  # hf-assisted drafts with bild's little model
        dtype=args.dtype,
        max_prompt_tokens=args.max_prompt_tokens,
        options=knobs,
        **given(
            max_new_tokens=args.max_new_tokens, warmup=args.warmup, prompt_lookup_num_tokens=args.prompt_lookup_num_tokens,
            max_matching_ngram_size=args.max_matching_ngram_size,
        ),
    )
    result = run_bench(config)
    print(format_table(result))
    if args.json:
        write_json(result, args.json)
    return 0


def register(subparsers) -> None:
    """Add ``bench`` to an argparse subparsers object."""
    from ragdec.bench import retrieval as retrieval_bench

    bench = subparsers.add_parser("bench", help="benchmark methods against Hugging Face baselines on one workload")
    bench.add_argument(
        "workload", help="decoding workload (rag, rag-forced, cag, summarize, specbench, chat); pipeline workload "
        "(qa, chat-pipeline: methods greedy,llma by default); pid (many questions per document); or retrieval, or cache; "
        "or server-load (ragdec serve under concurrent loopback clients; --load rag|chat: once per --max-batch); "
        "or prefill-chunk (what a chunked prefill costs against a decode step); or llamacpp-verify (what a verify "
        "forward of k tokens costs on llama.cpp and whether its rows equal one-at-a-time decoding); or cag-near (duplicate "
        "questions: the QA cache's near hits as llma's references, greedy vs llma; --limit: pairs, default 40); or "
        "connection-cost (what one open connection costs `ragdec serve` in memory); or first-answer (how long `make demo`'s "
        "first question waits for its first text on a fresh machine, with and without `models prepare` timing the "
        "draft costs; --limit: rounds, default 2)"
    )
    bench.add_argument("--model", help=f"the answer model (default {DEFAULT_MODEL}; server-load without --load: smollm2-135m-instruct)")
    bench.add_argument(
        "--methods",
        help=f"comma-separated (default {','.join(DECODING_METHODS)}; qa and chat-pipeline: greedy,llma; pid: its five); "
        "hf-greedy is the reference; knobs per method as name:key=value, "
        "e.g. llma:copy_k=8 or hf-prompt-lookup:prompt_lookup_num_tokens=3",
    )
    bench.add_argument("--limit", type=int, help="first N prompts only")
    bench.add_argument(
        "--max-new-tokens", type=int,
        help="most tokens per answer (default: the workload's, 128 for decoding and pipeline "
        "workloads, 64 for pid, 16 for server-load)",
    )
    bench.add_argument("--max-prompt-tokens", type=int, help="skip prompts longer than this (then --limit counts the rest)")
    bench.add_argument("--data", help="evaluation data folder (default: $RAGDEC_DATA or ../shared/data)")
    bench.add_argument("--assistant", help="draft model for hf-assisted")
    bench.add_argument("--warmup", type=int, help="prompts run untimed first (default 1)")
    bench.add_argument("--prompt-lookup-num-tokens", type=int, help="hf-prompt-lookup's draft length (default 10)")
    bench.add_argument("--max-matching-ngram-size", type=int, help="hf-prompt-lookup's longest match (default 2)")
    add_method_knobs(bench)
    add_dtype_argument(bench)
    bench.add_argument("--near-in-prompt", action=argparse.BooleanOptionalAction, default=None,
                       help="cag-near: the near-hit answers also go into the prompt as passages, as the pipeline does by "
                       "default (RagSettings.near_in_prompt); --no-near-in-prompt: the decoder's references only")
    bench.add_argument("--json", metavar="PATH", help="write the results as JSON")
    bench.add_argument("-k", type=int, help="qa: passages retrieved per question (default 5)")
    bench.add_argument("--turns", type=int, help="chat-pipeline: questions asked per CoQA story (default 5)")
    bench.add_argument("--engine", metavar="local|openai|loopback", help="qa: local (default: the methods in process); openai: the "
                       "questions through the server at --base-url; loopback: one method (--methods, default greedy) in "
                       "process and through `ragdec serve` of --model on 127.0.0.1, alternating: the remote path's overhead")
    bench.add_argument("--base-url", metavar="URL", help="qa --engine openai: the server's API root, e.g. http://127.0.0.1:8001/v1")
    bench.add_argument("--remote-model", metavar="NAME", help="qa --engine openai: the model the server answers with")
    bench.add_argument("--clients", type=int, help="server-load: concurrent clients (default 20); with --load, 16")
    bench.add_argument("--requests-per-client", "--requests", type=int, dest="requests_per_client",
                       help="server-load: requests each client sends (default 10); with --load, 4")
    bench.add_argument("--load", choices=("rag", "chat"), help="server-load: SQuAD questions over a store, or CoQA "
                       "conversations with kept history, once per --max-batch value (default: the smollm2 load)")
    bench.add_argument("--max-batch", metavar="N,N", help="server-load --load: the server's batch sizes to compare (default 1,8)")
    bench.add_argument("--store", metavar="DIR", help="server-load --load rag: a store of the SQuAD passages (default: built)")
    retrieval_bench.add_arguments(bench.add_argument_group("retrieval workload"))
    bench.set_defaults(func=cmd_bench)
