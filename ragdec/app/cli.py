"""The `ragdec` command line: the parser of every command, and ``main``.

Each command lives in its own module (``cli_<name>.py``, with ``register(subparsers)``);
what commands share (decoding flags, method knobs, the answering pipeline, the JSON
writer) is in ``cli_common.py``. Command modules import nothing of each other, and
import heavy packages only when they run, so `ragdec --help` stays fast.
"""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    from . import cli_bench, cli_cache, cli_free, cli_generate, cli_index, cli_models, cli_pipeline, cli_serve

    parser = argparse.ArgumentParser(prog="ragdec", description="Fast retrieval-augmented and conversational answering.")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in (cli_models, cli_generate, cli_bench, cli_pipeline, cli_index, cli_cache, cli_free, cli_serve):
        command.register(sub)
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
