"""`ragdec bench`: every method on the same prompts in one process, alternating, after a
warm-up; medians and ratios to hf-greedy, with the machine's details.

Speeds are for the decode phase (first new token to last): the prompt's prefill is the
same work for every method and is reported apart as ``ttft_s``.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from ragdec import files

from . import forced  # noqa: F401  (registers the forced-decoding methods)
from .llamacpp import LLAMACPP_METHODS, LlamaCppEngines
from .machine import machine_info
from .quality import quality
from .runners import HF_METHODS, ForwardCounter, Run, run_hf, run_ragdec
from .workloads import load_workload

FORCED_WORKLOADS = {"rag-forced"}


@dataclass
class BenchConfig:
    workload: str
    model: str
    methods: Sequence[str]
    limit: int | None = None
    max_new_tokens: int = 128
    data: str | None = None
    assistant: str | None = None  # hf-assisted's draft model; default chosen per target
    options: dict = field(default_factory=dict)  # knobs passed to ragdec methods
    warmup: int = 1  # prompts run once per method before timing
    dtype: str | None = None  # the models' weights: float32 (None) or bfloat16
    max_prompt_tokens: int | None = None  # skip longer prompts (a float32 prefill of a long article costs minutes)
    prompt_lookup_num_tokens: int = 10  # transformers' defaults
    max_matching_ngram_size: int = 2


def default_assistant(model: str) -> str:
    """A smaller model for hf-assisted: BiLD's little model for the big one (same
    vocabulary); otherwise SmolLM2-135M, which transformers pairs across vocabularies."""
    from ragdec.decoding.bild import LITTLE_MODELS

    return LITTLE_MODELS.get(Path(model).name, "smollm2-135m-instruct")


def _int8_copy(assistant):
    import copy

    from ragdec.decoding.bild import quantize_int8

    if assistant is None:
        raise ValueError("hf-assisted:int8=1 needs an assistant model (--assistant)")
    quantized = copy.copy(assistant)
    quantized.model = quantize_int8(assistant.model)  # a quantized copy; the float model stays
    return quantized


def with_greedy(methods: Sequence[str]) -> list[str]:
    """``methods`` with ragdec's greedy added when a lossless method runs without it, so that
    every result can say whether it is identical to greedy of the same engine configuration
    (per model: a method spec's ``model=`` knob runs it on another model, whose own greedy
    is added then).

    Example: ["hf-greedy", "llma"] -> ["hf-greedy", "llma", "greedy"]; ["hf-greedy"] stays;
    ["free-lossless:model=m2"] -> [..., "greedy:model=m2"].
    """
    from ragdec.decoding.methods import LOSSLESS_METHODS, registered_methods

    registered_methods()
    out = list(methods)
    for spec in methods:
        name, options = parse_method(spec)
        if name in LOSSLESS_METHODS:
            greedy = greedy_spec(options.get("model"))
            if greedy not in out:
                out.append(greedy)
    return out


def greedy_spec(model: str | None) -> str:
    """The spec of ragdec's greedy on ``model`` (None: the bench's own model)."""
    return "greedy" if model is None else f"greedy:model={model}"


def _weights_mb(model) -> float:
    """Parameters, buffers and the tensors modules hold as plain attributes (int4's 4-bit
    weights are buffers, its int8 prompt weights attributes), each counted once."""
    import torch

    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    for module in model.modules():
        for value in vars(module).values():
            if isinstance(value, torch.Tensor):
                tensors.setdefault(id(value), value)
    return round(sum(t.numel() * t.element_size() for t in tensors.values()) / 2**20, 1)


def _median(values) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _round(value, digits=4):
    return None if value is None else round(value, digits)


def parse_method(spec: str) -> tuple[str, dict]:
    """A method with its knobs: "llma:copy_k=8:trigger_n=1" -> ("llma", {"copy_k": 8, "trigger_n": 1})."""
    name, *settings = spec.split(":")
    options = {}
    for setting in settings:
        key, sep, value = setting.partition("=")
        if not sep:
            raise ValueError(f"method setting {setting!r} in {spec!r} is not key=value")
        options[key] = _number_or_text(value)
    return name, options


def _number_or_text(value: str):
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return value


def summarize(runs: dict[str, list[Run]], texts: dict[str, list[str]] | None = None, targets=None) -> dict:
    """Per-method medians; speedups are per-prompt ratios to the reference method
    (hf-greedy, or the first method where hf-greedy did not run), then the median;
    ``identical_to_greedy`` (where ragdec's greedy ran) the share of prompts whose tokens
    equal its tokens.
    With ``texts`` (each method's decoded outputs) and ``targets`` (per prompt), ROUGE-L
    against the targets and against the reference method's output are added."""
    reference_name = "hf-greedy" if "hf-greedy" in runs else next(iter(runs))
    reference = runs[reference_name]
    suffix = reference_name.replace("-", "_")
    summary = {}
    for method, method_runs in runs.items():
        rates = [r.decode_tokens_per_s for r in method_runs]
        entry = {
            "tokens_per_s": _round(_median(rates), 3),
            "mean_tokens_per_forward": _round(_mean([r.tokens_per_forward for r in method_runs]), 3),
            "mean_new_tokens": _round(statistics.mean(len(r.token_ids) for r in method_runs), 2),
            "ttft_s": _round(_median(r.ttft_s for r in method_runs)),
            "e2e_s": _round(_median(r.e2e_s for r in method_runs)),
            "decode_s": _round(_median(r.decode_s for r in method_runs)),
            "prompts": len(method_runs),
        }
        if reference is not None:
            ratios = [
                (r.decode_tokens_per_s / ref.decode_tokens_per_s)
                for r, ref in zip(method_runs, reference)
                if r.decode_tokens_per_s and ref.decode_tokens_per_s
            ]
            entry[f"speedup_vs_{suffix}"] = _round(_median(ratios), 3)
            # what a user waits for: prefill and decode together, per prompt
            entry[f"e2e_speedup_vs_{suffix}"] = _round(_median(ref.e2e_s / r.e2e_s for r, ref in zip(method_runs, reference)), 3)
            entry[f"aggregate_speedup_vs_{suffix}"] = _round(
                sum(ref.decode_s for ref in reference) / max(1e-9, sum(r.decode_s for r in method_runs)), 3
            )
            entry[f"identical_to_{suffix}"] = _round(
                sum(r.token_ids == ref.token_ids for r, ref in zip(method_runs, reference)) / len(method_runs), 4
            )
        name, options = parse_method(method)
        greedy = runs.get(greedy_spec(options.get("model")))
        if greedy is not None and name != "greedy":
            # ragdec's own greedy in the same engine configuration (the same model): what
            # "lossless" promises
            entry["identical_to_greedy"] = _round(sum(r.token_ids == g.token_ids for r, g in zip(method_runs, greedy)) / len(method_runs), 4)
            entry["speedup_vs_greedy"] = _round(_median(
                r.decode_tokens_per_s / g.decode_tokens_per_s
                for r, g in zip(method_runs, greedy) if r.decode_tokens_per_s and g.decode_tokens_per_s
            ), 3)
        if method_runs and method_runs[0].drafted_tokens is not None:
            # of all new tokens: the share drafted (FREE: the exit rate, tokens that left at
            # the exit layer) and the share that stood (BiLD: the little model's tokens kept)
            new_tokens = max(1, sum(len(r.token_ids) for r in method_runs))
            entry["drafted_share"] = _round(sum(r.drafted_tokens for r in method_runs) / new_tokens)
            entry["accepted_draft_share"] = _round(sum(r.accepted_tokens for r in method_runs) / new_tokens)
        if texts is not None:
            entry.update(quality(texts[method], targets, texts[reference_name]))
        summary[method] = entry
    return summary


def _mean(values):
    values = [v for v in values if v is not None]
    return statistics.mean(values) if values else None


def run_bench(config: BenchConfig, progress: bool = True) -> dict:
    from tqdm import tqdm

    from ragdec.decoding.generator import Generator, configure_threads

    configure_threads()
    # with --max-prompt-tokens, --limit counts the prompts that fit: all are read first
    prompts = load_workload(config.workload, config.data, None if config.max_prompt_tokens else config.limit)
    generator = Generator.load(config.model, config.dtype)
    prompt_ids = [generator.prompt_ids(list(p.messages)) for p in prompts]
    if config.max_prompt_tokens:
        kept = [i for i, ids in enumerate(prompt_ids) if len(ids) <= config.max_prompt_tokens][: config.limit]
        prompts, prompt_ids = [prompts[i] for i in kept], [prompt_ids[i] for i in kept]
    if not prompts:
        raise ValueError(f"workload {config.workload!r} has no prompts (of at most --max-prompt-tokens tokens)")
    assistant = None
    if any(parse_method(m)[0] == "hf-assisted" for m in config.methods):
        assistant = Generator.load(config.assistant or default_assistant(config.model), config.dtype)
    counter = ForwardCounter(generator.model)
    # ragdec's weights are all read at every step, so they are what it holds resident (the
    # process's RSS right after loading says less: safetensors maps them lazily)
    memory = {"ragdec": {"weights_mb": _weights_mb(generator.model)}}
    methods = with_greedy(config.methods)
    llamacpp = None
    if any(parse_method(m)[0] in LLAMACPP_METHODS for m in methods):
        llamacpp = LlamaCppEngines(config.model, configure_threads())

    states: dict[str, dict] = {}
    assistants: dict[str, object] = {}
    # a spec's model= knob: the method runs on that model (a model trained for FREE beside
    # the original), on the same prompt ids (the models must share the tokenizer)
    others: dict[str, tuple] = {}

    def model_for(name: str | None):
        if name is None:
            return generator, counter
        if name not in others:
            other = Generator.load(name, config.dtype)
            if other.tokenizer.get_vocab() != generator.tokenizer.get_vocab():
                raise ValueError(f"model={name} has another vocabulary than {config.model}: compare models that share a tokenizer")
            others[name] = (other, ForwardCounter(other.model))
            memory[name] = {"weights_mb": _weights_mb(other.model)}
        return others[name]

    def run_one(spec: str, i: int, max_new_tokens: int) -> Run:
        method, options = parse_method(spec)
        runner, runner_counter = model_for(options.pop("model", None))
        # each method spec learns only from its own earlier runs, as if it served alone
        runner.method_state = states.setdefault(spec, {})
        if method in LLAMACPP_METHODS:
            return llamacpp.run(method, options, prompt_ids[i], max_new_tokens, runner.eos_token_ids)
        if method in HF_METHODS:
            lookup = dict(
                prompt_lookup_num_tokens=config.prompt_lookup_num_tokens,
                max_matching_ngram_size=config.max_matching_ngram_size,
            )
            if method == "hf-early-exit" and "exit_layer" in config.options:  # --exit-layer, as free's
                lookup["exit_layer"] = config.options["exit_layer"]
            lookup.update(options)
            drafter = assistant
            if lookup.pop("int8", False):  # hf-assisted:int8=1 drafts with BiLD's int8 little model
                drafter = assistants.setdefault("int8", _int8_copy(assistant))
            return run_hf(method, runner, prompt_ids[i], max_new_tokens, runner_counter, drafter, **lookup)
        options = {**config.options, **options}
        if config.workload in FORCED_WORKLOADS:
            options["forced_answer"] = prompts[i].forced_answer
        return run_ragdec(method, runner, prompt_ids[i], prompts[i].references, max_new_tokens, options)

    for i in range(min(config.warmup, len(prompts))):
        for method in methods:
            run_one(method, i, min(16, config.max_new_tokens))
    states.clear()  # nothing learnt in the warm-up carries into the timed runs
    runs: dict[str, list[Run]] = {m: [] for m in methods}
    for i in tqdm(range(len(prompts)), desc=f"bench {config.workload}", disable=not progress, unit="prompt"):
        # rotate the order so that no method always runs first (cache warmth, thermals)
        order = methods[i % len(methods) :] + methods[: i % len(methods)]
        for method in order:
            runs[method].append(run_one(method, i, config.max_new_tokens))
    return {
        "machine": machine_info(),
        "workload": config.workload,
        "model": config.model,
        "settings": {
            "limit": config.limit,
            "prompts": len(prompts),
            "max_new_tokens": config.max_new_tokens,
            "dtype": config.dtype or "float32",
            "max_prompt_tokens": config.max_prompt_tokens,
            "warmup_prompts": config.warmup,
            "mean_prompt_tokens": round(statistics.mean(len(p) for p in prompt_ids), 1),
            "assistant": (config.assistant or default_assistant(config.model)) if assistant else None,
            "prompt_lookup_num_tokens": config.prompt_lookup_num_tokens,
            "max_matching_ngram_size": config.max_matching_ngram_size,
            "options": config.options,
        },
        # what each engine holds: ragdec's weights; what each llama.cpp instance added to the
        # process's resident memory by the end of its first run (its GGUF is mapped, and
        # prompt lookup's logits_all array holds n_ctx x vocab floats)
        "engine_memory_mb": {**memory, **({"llamacpp": llamacpp.rss_mb} if llamacpp else {})},
        "methods": summarize(
            runs, {m: [generator.decode_text(r.token_ids) for r in rs] for m, rs in runs.items()}, [p.targets for p in prompts]
        ),
    }


def format_table(result: dict) -> str:
    first = next(iter(result["methods"].values()))
    ratio_columns = [c for c in first if c.startswith(("speedup_vs_", "identical_to_"))]
    quality_columns = [c for c in ("rougeL", "rougeL_vs_reference_method") if first.get(c) is not None]
    columns = ["tokens_per_s", *ratio_columns, *quality_columns, "mean_tokens_per_forward", "mean_new_tokens", "ttft_s", "e2e_s"]
    header = ["method"] + columns
    rows = [[name] + ["-" if v.get(c) is None else str(v.get(c)) for c in columns] for name, v in result["methods"].items()]
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    lines = [f"{result['workload']} on {result['model']} ({result['machine']['cpu']}, {result['machine']['cores']} cores)"]
    for row in [header] + rows:
        lines.append("  ".join(cell.ljust(width) for cell, width in zip(row, widths)))
    return "\n".join(lines)


def write_json(result: dict, path: str | Path) -> None:
    """Write atomically (``ragdec.files.write_json``): a crash never leaves half a file."""
    files.write_json(result, path)
