"""`ragdec free calibrate`: train FREE's exit adapter for a model at an exit layer.

    ragdec free calibrate --model qwen2.5-coder-0.5b-instruct --exit-layer 12

``register(subparsers)`` adds the command to the main parser (``ragdec.app.cli``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

DEFAULT_MODEL = "qwen2.5-coder-0.5b-instruct"


def default_data() -> Path:
    """The CNN/DailyMail articles of ``$RAGDEC_DATA`` (else ``../shared/data``):
    ``summarize/llma_cnndm.jsonl``, news prose that none of the BiLD/FREE benchmark
    workloads (xsum, squad, specbench-qa-translation) prompts with."""
    import os

    root = Path(os.environ.get("RAGDEC_DATA") or Path(__file__).resolve().parents[2].parent / "shared" / "data")
    return root / "summarize" / "llma_cnndm.jsonl"


def cmd_free_calibrate(args) -> int:
    from ragdec.decoding.free_calibrate import CalibrationConfig, calibrate
    from ragdec.decoding.generator import Generator

    data = Path(args.data) if args.data else default_data()
    if not data.exists():
        raise FileNotFoundError(f"calibration text {data} not found: pass --data FILE (.jsonl with a 'document' or 'text' field)")
    generator = Generator.load(args.model)
    config = CalibrationConfig(exit_layer=args.exit_layer, steps=args.steps, seq_len=args.seq_len,
                               train_sequences=args.train_sequences, rank=args.rank)
    report = calibrate(generator, data, config, out=args.out, progress=not args.quiet)
    print(
        f"{report.model} exit layer {report.exit_layer}: shallow/deep top-1 agreement on "
        f"{report.heldout_positions} held-out positions {report.agreement_before:.1%} before, "
        f"{report.agreement_after:.1%} after ({report.steps} steps on {report.train_positions} positions)"
    )
    print(f"adapter: {report.path}")
    if args.json:
        from ragdec.app.cli import _write_json  # through a temp file, renamed into place

        _write_json(report.as_dict(), args.json)
    return 0


def register(subparsers) -> None:
    """Add ``free`` (``calibrate``) to an argparse subparsers object."""
    from ragdec.decoding.free_calibrate import CalibrationConfig

    free = subparsers.add_parser("free", help="FREE early exit: calibrate the exit head")
    actions = free.add_subparsers(dest="action", required=True)
    calibrate = actions.add_parser(
        "calibrate", help="train the exit adapter by distillation from the deep model; save it under $RAGDEC_HOME/free",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    calibrate.add_argument("--model", default=DEFAULT_MODEL, help="zoo name, local folder or hub id")
    calibrate.add_argument("--exit-layer", type=int, required=True, help="layers in the shallow model")
    calibrate.add_argument("--steps", type=int, default=CalibrationConfig.steps, help="optimizer steps")
    calibrate.add_argument("--rank", type=int, default=CalibrationConfig.rank, help="the adapter's rank")
    calibrate.add_argument("--seq-len", type=int, default=64, help="tokens per training sequence")
    calibrate.add_argument(
        "--train-sequences", type=int, default=CalibrationConfig.train_sequences, help="training windows (up to 4 per document)"
    )
    calibrate.add_argument("--data", help="text to distil on (.jsonl or text); default: the CNN/DailyMail articles")
    calibrate.add_argument("--out", help="adapter file (default: $RAGDEC_HOME/free/<model>/layer<L>.safetensors)")
    calibrate.add_argument("--quiet", action="store_true", help="no progress bars")
    calibrate.add_argument("--json", metavar="PATH", help="write the agreement report as JSON")
    calibrate.set_defaults(func=cmd_free_calibrate)
