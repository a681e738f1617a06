"""`ragdec free calibrate` and `ragdec free train`: FREE's exit head, or a model trained for it.

    ragdec free calibrate --model qwen2.5-coder-0.5b-instruct --exit-layer 17
    ragdec free calibrate --model qwen2.5-coder-1.5b-instruct --exit-layer 19,20,21,22
    ragdec free train --model smollm2-135m-instruct --exit-layer 10 --steps 400 --out models/smollm2-free10

``calibrate`` trains an adapter on the frozen model; ``train`` fine-tunes the model itself
with FREE's shallow-deep objective (``ragdec.training.free_train``) and writes a model
folder that every command loads by path (FREE takes its exit layer from it).

By default the adapter learns from the model's own greedy answers to benchmark-style
prompts (XSum, SQuAD, Spec-Bench qa/translation, CNN/DailyMail) past the first
CALIBRATION_SKIP of each workload, which the committed benchmarks never reach;
``--text`` trains on a corpus instead.

``register(subparsers)`` adds the command to the main parser (``ragdec.app.cli``).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

from .cli_common import DEFAULT_MODEL, write_json

# the benchmark workloads whose prompts calibration answers, and how many of each workload's
# first prompts it skips: the committed benchmarks use at most the first 12, so the adapter
# never sees a benchmark prompt
CALIBRATION_WORKLOADS = ("xsum", "squad", "specbench-qa-translation", "summarize")
CALIBRATION_SKIP = 40


def default_data() -> Path:
    """The CNN/DailyMail articles of ``$RAGDEC_DATA`` (else ``../shared/data``):
    ``summarize/llma_cnndm.jsonl``, for ``--text``."""
    from ragdec.bench.workloads import data_dir

    try:
        return data_dir() / "summarize" / "llma_cnndm.jsonl"
    except FileNotFoundError:
        raise FileNotFoundError(
            "the CNN/DailyMail articles for --text are not found: pass --text FILE, or set RAGDEC_DATA to the "
            "evaluation data folder (the one holding summarize/llma_cnndm.jsonl)"
        ) from None


def calibration_prompts(
    generator, per_workload: int, max_tokens: int, data: str | None = None, workloads: Sequence[str] = CALIBRATION_WORKLOADS
) -> list[list[int]]:
    """Chat-templated prompt ids: up to ``per_workload`` of each of ``workloads``, past its
    first CALIBRATION_SKIP, of at most ``max_tokens`` tokens.

    Raises:
        FileNotFoundError: no data folder, or one without a workload's file; the message
            says what to pass (--data, $RAGDEC_DATA, or --workloads without it).
    """
    from ragdec.bench.workloads import data_dir, load_workload

    folder = str(data_dir(data))  # no folder at all: its error says what to pass
    prompts = []
    for workload in workloads:
        try:
            workload_prompts = load_workload(workload, folder)
        except FileNotFoundError as error:  # a folder without this workload's file (a sample)
            raise FileNotFoundError(
                f"calibration workload {workload!r}: {error} (or set RAGDEC_DATA to it); or leave {workload!r} out of --workloads"
            ) from error
        taken = 0
        for prompt in workload_prompts[CALIBRATION_SKIP:]:
            ids = generator.prompt_ids(list(prompt.messages))
            if len(ids) <= max_tokens:
                prompts.append(ids)
                taken += 1
                if taken == per_workload:
                    break
    if not prompts:
        raise ValueError(f"no calibration prompt of at most {max_tokens} tokens: raise --max-prompt-tokens")
    return prompts


def cmd_free_calibrate(args) -> int:
    from ragdec.decoding.generator import Generator
    from ragdec.training.free_calibrate import CalibrationConfig, calibrate

    generator = Generator.load(args.model)
    config = CalibrationConfig(
        exit_layers=args.exit_layer, steps=args.steps, rank=args.rank, answer_tokens=args.answer_tokens,
        teacher_dtype=None if args.teacher_dtype == "model" else args.teacher_dtype,
    )
    if args.text is not None:
        data = Path(args.text) if args.text else default_data()
        if not data.exists():
            raise FileNotFoundError(f"calibration text {data} not found: pass --text FILE (.jsonl with a 'document' or 'text' field)")
        reports = calibrate(generator, config, data=data, out=args.out, progress=not args.quiet)
    else:
        prompts = calibration_prompts(generator, args.prompts, args.max_prompt_tokens, args.data, args.workloads)
        reports = calibrate(generator, config, prompts=prompts, out=args.out, progress=not args.quiet)
    for report in reports:
        source = "answer" if report.source == "answers" else "text"
        print(
            f"{report.model} exit layer {report.exit_layer}: shallow/deep top-1 agreement on "
            f"{report.heldout_positions} held-out positions {report.agreement_before:.1%} before, "
            f"{report.agreement_after:.1%} after ({report.steps} steps on {report.train_positions} {source} positions)"
        )
        for confidence, row in report.exits_after.items():
            precision = "-" if row["precision"] is None else f"{row['precision']:.1%}"
            print(f"  confidence >= {confidence}: {row['exit']:.1%} of positions would exit, {precision} of them agree")
        print(f"  adapter: {report.path}")
    if args.json:
        write_json([report.as_dict() for report in reports], args.json)
    return 0


def cmd_free_train(args) -> int:
    from ragdec.decoding.generator import Generator
    from ragdec.training.free_train import TrainConfig, train

    config = TrainConfig(
        exit_layer=args.exit_layer, steps=args.steps, lora_rank=args.lora_rank, lr=args.lr,
        shallow_weight=args.shallow_weight, sequences_per_step=args.sequences_per_step,
        answer_tokens=args.answer_tokens, eval_every=args.eval_every, checkpoint_every=args.checkpoint_every,
    )
    generator = Generator.load(args.model)
    prompts = calibration_prompts(generator, args.prompts, args.max_prompt_tokens, args.data, args.workloads)
    report = train(generator, prompts, config, Path(args.out), progress=not args.quiet)
    before = report.agreement_by_layer_before[str(report.exit_layer)]
    after = report.agreement_by_layer_after[str(report.exit_layer)]
    print(
        f"{report.model} trained for FREE at exit layer {report.exit_layer}: {report.steps} steps on "
        f"{report.train_answers} answers ({report.train_positions} positions) in {report.seconds / 60:.1f} min; "
        f"held-out exit agreement {before:.1%} before, {after:.1%} after"
    )
    print(f"  model folder: {report.out} (load it by path: --model {report.out})")
    if args.json:
        write_json(report.as_dict(), args.json)
    return 0


def _layers(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"exit layers are integers separated by commas (17 or 17,18,20), got {text!r}") from None


def _workloads(text: str) -> tuple[str, ...]:
    from ragdec.bench.workloads import WORKLOADS

    names = tuple(name.strip() for name in text.split(",") if name.strip())
    unknown = [name for name in names if name not in WORKLOADS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"workloads are names separated by commas among {', '.join(sorted(WORKLOADS))}; got {text!r}")
    return names


def _add_prompt_arguments(parser, prompts: int, max_prompt_tokens: int, answer_tokens: int, mode: str) -> None:
    """The flags that choose the prompts whose answers a command learns from."""
    parser.add_argument("--prompts", type=int, default=prompts, help=f"prompts answered per workload{mode}")
    parser.add_argument("--answer-tokens", type=int, default=answer_tokens, help="greedy tokens per answer")
    parser.add_argument("--max-prompt-tokens", type=int, default=max_prompt_tokens, help=f"skip longer prompts{mode}")
    parser.add_argument("--data", help="the benchmark data folder (default: $RAGDEC_DATA or ../shared/data)")
    parser.add_argument(
        "--workloads", type=_workloads, default=",".join(CALIBRATION_WORKLOADS), metavar="NAME,...",
        help=f"the benchmark workloads whose prompts (past the benchmarks' own) are answered{mode}",
    )


def register(subparsers) -> None:
    """Add ``free`` (``calibrate``) to an argparse subparsers object."""
    from ragdec.training.free_calibrate import CalibrationConfig

    free = subparsers.add_parser("free", help="FREE early exit: calibrate the exit head, or train a model for it")
    actions = free.add_subparsers(dest="action", required=True)
    calibrate = actions.add_parser(
        "calibrate", help="train the exit adapter by distillation from the deep model; save it under $RAGDEC_HOME/free",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    calibrate.add_argument("--model", default=DEFAULT_MODEL, help="zoo name, local folder or hub id")
    calibrate.add_argument(
        "--exit-layer", type=_layers, required=True,
        help="layers in the shallow model; several (17,18,20) train one adapter each from one teacher run",
    )
    calibrate.add_argument("--steps", type=int, default=CalibrationConfig.steps, help="optimizer steps")
    calibrate.add_argument("--rank", type=int, default=CalibrationConfig.rank, help="the adapter's rank")
    _add_prompt_arguments(calibrate, prompts=60, max_prompt_tokens=700, answer_tokens=CalibrationConfig.answer_tokens,
                          mode=" (answers mode)")
    calibrate.add_argument(
        "--text", nargs="?", const="", metavar="FILE",
        help="train on windows of a text corpus (.jsonl or text) instead of the model's own answers; "
        "without FILE: the CNN/DailyMail articles",
    )
    calibrate.add_argument(
        "--teacher-dtype", choices=("bfloat16", "float32", "model"), default=CalibrationConfig.teacher_dtype,
        help="the dtype the teacher (generation and targets) runs in; model: as loaded",
    )
    calibrate.add_argument("--out", help="adapter file (default: $RAGDEC_HOME/free/<model>/layer<L>.safetensors)")
    calibrate.add_argument("--quiet", action="store_true", help="no progress bars")
    calibrate.add_argument("--json", metavar="PATH", help="write the agreement report as JSON")
    calibrate.set_defaults(func=cmd_free_calibrate)

    from ragdec.training.free_train import TrainConfig

    train = actions.add_parser(
        "train", help="fine-tune a model with FREE's shallow-deep objective on its own answers; write a model folder",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    train.add_argument("--model", default=DEFAULT_MODEL, help="zoo name, local folder or hub id")
    train.add_argument("--exit-layer", type=int, required=True, help="layers in the shallow model")
    train.add_argument("--steps", type=int, default=TrainConfig.steps, help="optimizer steps (a resumed run goes on to this)")
    train.add_argument("--lora-rank", type=int, help="train a LoRA of this rank on the first exit-layer layers (default: every layer)")
    train.add_argument("--lr", type=float, help="learning rate (default 1e-4, with --lora-rank 1e-3)")
    train.add_argument("--shallow-weight", type=float, default=TrainConfig.shallow_weight, help="the exit head's share of the loss")
    train.add_argument("--sequences-per-step", type=int, default=TrainConfig.sequences_per_step, help="answers per optimizer step")
    _add_prompt_arguments(train, prompts=60, max_prompt_tokens=320, answer_tokens=TrainConfig.answer_tokens, mode="")
    train.add_argument("--eval-every", type=int, default=TrainConfig.eval_every, help="steps between held-out evaluations")
    train.add_argument("--checkpoint-every", type=int, default=TrainConfig.checkpoint_every, help="steps between checkpoints")
    train.add_argument("--out", required=True, help="the model folder to write (its train/ keeps the checkpoint to resume from)")
    train.add_argument("--quiet", action="store_true", help="no progress bars")
    train.add_argument("--json", metavar="PATH", help="write the training report as JSON")
    train.set_defaults(func=cmd_free_train)
