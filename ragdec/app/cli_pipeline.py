"""`ragdec ask` and `ragdec chat`: answers over a document store, streamed, with sources.

    ragdec ask "Where does the Rhine begin?" --store docs.store
    ragdec chat --store docs.store          # /reset, /sources, /quit

``register(subparsers)`` adds the commands to the main parser (``ragdec.app.cli``).
"""

from __future__ import annotations

import sys
import textwrap

from .cli_common import add_pipeline_arguments, build_pipeline, generation_params, pipeline_model, write_json


def stats_line(chunk) -> str:
    """One line: method, cache outcome, timings, and the decoder's figures (a remote
    engine's: those its server reports)."""
    info, stats = chunk.info, chunk.stats
    parts = [f"{info.method}", f"cache {info.cache}", f"{info.seconds:.2f} s", f"first text {info.ttft_s:.2f} s"]
    if stats is not None:
        parts.append(f"{stats.new_tokens} tokens at {info.tokens_per_s:.1f}/s")
        if stats.forward_passes:  # 0: a remote server that does not tell
            parts.append(f"{stats.tokens_per_forward:.2f} tokens/forward")
        if stats.drafted_tokens or info.method != "remote":
            parts.append(f"{stats.copied_share:.0%} copied")
        parts.append(f"{stats.prompt_tokens} prompt tokens ({stats.reused_prompt_tokens} reused)")
    if info.sources:
        parts.append(f"{len(info.sources)} passages, retrieval {info.retrieval_s * 1000:.0f} ms")
    if info.dropped_turns:
        parts.append(f"{info.dropped_turns} old messages dropped to fit")
    return "[" + ", ".join(parts) + "]"


def print_sources(info, out=None) -> None:
    out = out or sys.stdout
    for source in info.sources:
        head = f"[{source.number}] {source.title} (score {source.score:.3f})" if source.title else f"[{source.number}] (score {source.score:.3f})"
        print(head, file=out)
        print(textwrap.indent(textwrap.shorten(source.text, 300, placeholder=" ..."), "    "), file=out)


def _report(question: str, text: str, last, args, streamed: bool) -> dict:
    """Print what follows an answer (the answer itself unless it was streamed); return
    the answer's JSON record."""
    if not streamed:
        print(f"Q: {question}\n{text}")
    if last.finish_reason == "error":
        print(f"ragdec: error: {last.info.error}", file=sys.stderr)
    else:
        if last.info.sources and not args.no_sources:
            print("\nSources:")
            print_sources(last.info)
        print(stats_line(last), file=sys.stderr)
    return {
        "question": question, "answer": text, "finish_reason": last.finish_reason,
        "info": last.info.as_dict(), "stats": last.stats.as_dict() if last.stats else None,
    }


def _stream_answer(chunks) -> tuple[object, str]:
    """Print chunks as they come; return the last one and the whole text."""
    texts = []
    for chunk in chunks:
        print(chunk.text, end="", flush=True)
        texts.append(chunk.text)
    print()
    return chunk, "".join(texts)


def _questions(args) -> list[str]:
    """The questions: positional ones, then those of --questions-file (one per line);
    checked before a model loads."""
    if any(not question.strip() for question in args.question):
        raise ValueError('a question is empty: ask something, e.g. ragdec ask "Where does the Rhine begin?" --store DIR')
    questions = list(args.question)
    if args.questions_file:
        from pathlib import Path

        path = Path(args.questions_file).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"--questions-file {path} not found: give a text file with one question per line")
        questions += [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not questions:
        raise ValueError('no question: ask one, e.g. ragdec ask "Where does the Rhine begin?" --store DIR')
    return questions


def _requests(args, questions: list[str]):
    """One request per question; with --document, the document is every request's system
    message and reference, so the questions share it (and PiD can answer them together)."""
    from ragdec.pipelines.types import Request

    head = []
    references: tuple[str, ...] = ()
    if args.document:
        from pathlib import Path

        path = Path(args.document).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"--document {path} not found: give a text file to answer from")
        document = path.read_text(encoding="utf-8", errors="replace").strip()
        if not document:
            raise ValueError(f"--document {path} is empty")
        head = [{"role": "system", "content": f"Answer the question from this document, in one or two sentences.\n\n{document}"}]
        references = (document,)
    params = generation_params(args)
    return [Request([*head, {"role": "user", "content": q}], references, params) for q in questions]


def cmd_ask(args) -> int:
    questions = _questions(args)
    requests = _requests(args, questions)
    if len(requests) == 1:  # one prompt does not repay compiling the int4 prompt path
        from ragdec.decoding.int4 import compile_prompts

        compile_prompts(False)
    pipeline = build_pipeline(args)
    results = []
    try:
        if len(requests) > 1 and args.document is not None:
            # questions about one document go in one batch (PiD); their answers come
            # interleaved, so each is printed whole when it ends
            texts: dict[int, list[str]] = {i: [] for i in range(len(requests))}
            for chunk in pipeline.stream(requests):
                texts[chunk.index].append(chunk.text)
                if chunk.finish_reason is not None:
                    results.append(_report(questions[chunk.index], "".join(texts[chunk.index]), chunk, args, streamed=False))
        else:
            for i, request in enumerate(requests):
                if len(requests) > 1:
                    print(f"Q: {questions[i]}")
                last, text = _stream_answer(pipeline.stream([request]))
                results.append(_report(questions[i], text, last, args, streamed=True))
        if any(r["finish_reason"] == "error" for r in results):
            return 2
    finally:
        if pipeline.cache is not None:
            pipeline.cache.close()
    if args.json:
        write_json({"answers": results}, args.json)
    return 0


CHAT_HELP = "/reset forgets the conversation, /sources lists the last answer's passages, /quit leaves"


def cmd_chat(args) -> int:
    from ragdec.pipelines.chat import ChatSession

    pipeline = build_pipeline(args)
    session = ChatSession(pipeline, generation_params(args))
    print(f"ragdec chat with {pipeline_model(args)}" + (f" at {args.base_url}" if args.engine == "openai" else "")
          + (f" over {args.store}" if args.store else "") + f". {CHAT_HELP}.", file=sys.stderr)
    try:
        while True:
            try:
                line = input("you> ").strip()
            except EOFError:
                print()
                return 0
            if not line:
                continue
            if line in ("/quit", "/exit"):
                return 0
            if line == "/reset":
                session.reset()
                print("(conversation forgotten)", file=sys.stderr)
                continue
            if line == "/sources":
                if session.last_info and session.last_info.sources:
                    print_sources(session.last_info)
                else:
                    print("(no passages for the last answer)", file=sys.stderr)
                continue
            if line.startswith("/"):
                print(f"(unknown command {line.split()[0]}: {CHAT_HELP})", file=sys.stderr)
                continue
            print("ragdec> ", end="", flush=True)
            last, _ = _stream_answer(session.ask(line))
            if last.finish_reason == "error":
                print(f"(error: {last.info.error})", file=sys.stderr)
            else:
                print(stats_line(last), file=sys.stderr)
    finally:
        if pipeline.cache is not None:
            pipeline.cache.close()


def register(subparsers) -> None:
    """Add ``ask`` and ``chat`` to an argparse subparsers object."""
    ask = subparsers.add_parser("ask", help="answer questions over a document store, with sources and stats")
    ask.add_argument("question", nargs="*", help="one or more questions")
    ask.add_argument("--questions-file", metavar="F", help="more questions, one per line")
    ask.add_argument("--document", metavar="F", help="answer from this text file (instead of, or besides, --store); "
                     "several questions about it are answered in one batch (PiD)")
    add_pipeline_arguments(ask)
    ask.add_argument("--no-sources", action="store_true", help="do not list the passages")
    ask.add_argument("--json", metavar="PATH", help="write answers, sources and stats as JSON")
    ask.set_defaults(func=cmd_ask)

    chat = subparsers.add_parser("chat", help="an interactive conversation over a document store")
    add_pipeline_arguments(chat)
    chat.set_defaults(func=cmd_chat)
