"""`ragdec generate`: one prompt, streamed, with the decoder's figures.

    ragdec generate --prompt "What is the capital of France?" --method llma --reference-file notes.txt
    ragdec generate --prompt "..." --method bild-lossless --model qwen2.5-coder-1.5b-instruct

``register(subparsers)`` adds the command to the main parser (``ragdec.app.cli``).
"""

from __future__ import annotations

import sys
from pathlib import Path

from .cli_common import add_generation_arguments, generation_params, write_json


def cmd_generate(args) -> int:
    from ragdec.decoding.generator import Generator

    references = [Path(f).read_text(encoding="utf-8") for f in args.reference_file]
    params = generation_params(args, stop=tuple(args.stop))
    generator = Generator.load(args.model, args.dtype)
    prompt_ids = generator.prompt_ids(args.prompt, chat=not args.raw)
    texts: list[str] = []
    token_ids: list[int] = []
    for chunk in generator.stream(prompt_ids, params, references):
        print(chunk.text, end="", flush=True)
        texts.append(chunk.text)
        token_ids.extend(chunk.token_ids)
    stats = chunk.stats
    print()
    print(
        f"[{params.method}] {stats.new_tokens} tokens, prefill {stats.prefill_seconds:.2f} s "
        f"({stats.prompt_tokens} prompt tokens), decode {stats.decode_tokens_per_s:.1f} tokens/s, "
        f"{stats.tokens_per_forward:.2f} tokens/forward, {stats.forward_passes} forwards, "
        f"{stats.copied_share:.0%} copied",
        file=sys.stderr,
    )
    if args.json:
        write_json({"text": "".join(texts), "token_ids": token_ids, "finish_reason": chunk.finish_reason, "stats": stats.as_dict()}, args.json)
    return 0


def register(subparsers) -> None:
    """Add ``generate`` to an argparse subparsers object."""
    gen = subparsers.add_parser("generate", help="generate from one prompt and report decoding stats")
    gen.add_argument("--prompt", required=True)
    add_generation_arguments(gen, method=None, max_new_tokens=None, method_help="decoding method")
    gen.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    gen.add_argument("--reference-file", action="append", default=[], metavar="F", help="text a method may copy from (repeatable)")
    gen.add_argument("--raw", action="store_true", help="no chat template: the prompt is the model's input as is")
    gen.add_argument("--json", metavar="PATH", help="write text, token ids and stats as JSON")
    gen.set_defaults(func=cmd_generate)
