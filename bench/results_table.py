"""The committed benchmark results (``bench/results/*.json``) as markdown tables.

README.md and the pages under docs/ quote measured figures only through these tables: each
sits between ``<!-- results:NAME -->`` and ``<!-- /results:NAME -->``, and
``tests/test_docs.py`` checks that it equals what this module prints now, so a rerun
benchmark whose JSON is committed shows up in the docs by rerunning::

    python -m ragdec.bench.results_table             # print every table
    python -m ragdec.bench.results_table headline    # print one
    python -m ragdec.bench.results_table --write     # rewrite the marked blocks in place

Every table names the results files it reads, so a reader can find the run's machine and
settings.
"""

from __future__ import annotations

import argparse
import functools
import json
import re
import sys
from pathlib import Path
from typing import Callable, Iterable, Iterator

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parent.parent
MODEL_SIZE = {"qwen2.5-coder-0.5b-instruct": "0.5B", "qwen2.5-coder-1.5b-instruct": "1.5B"}
WORKLOADS = {"xsum": "xsum", "squad": "squad", "specbench-qa-translation": "specbench qa+translation"}


def load(name: str) -> dict:
    """One results file, by its name under bench/results/."""
    return json.loads((RESULTS / name).read_text(encoding="utf-8"))


def _x(ratio: float) -> str:
    return f"{ratio:.2f}x"


def _tps(tokens_per_s: float) -> str:
    return f"{tokens_per_s:.1f}"


def _share(share: float) -> str:
    return f"{100 * share:.1f}%"


def _count(share: float, total: int) -> str:
    return f"{round(share * total)}/{total}"


def _file(*names: str) -> str:
    return ", ".join(f"`{name}`" for name in names)


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _columns(*names: str):
    """Turn a function that yields a table's rows into one that returns the table: ``names``
    head its columns, and a last one, ``bench/results/``, heads each row's last cell (the
    results files the row reads, from ``_file``)."""

    def table(rows: Callable[..., Iterable[list[str]]]) -> Callable[..., str]:
        @functools.wraps(rows)
        def render(*args) -> str:
            return _table([*names, "bench/results/"], list(rows(*args)))

        return render

    return table


@_columns("what", "result (qwen2.5-coder-0.5b int4 unless named)")
def headline() -> Iterator[list[str]]:
    """The figures a first reader asks for: ragdec against llama.cpp, answers, a server."""
    for workload, what in (("rag", "a rag request (20 MS MARCO prompts)"), ("chat", "a chat turn (20 CoQA turns)")):
        name = f"llamacpp_{workload}_int4.json"
        methods = load(name)["methods"]
        llma, greedy = methods["llma"], methods["greedy"]
        lookup = methods["llamacpp-prompt-lookup"]
        prompts = llma["prompts"]
        yield [
            f"{what}, end to end, against llama.cpp's greedy",
            f"llma **{_x(llma['e2e_speedup_vs_llamacpp_greedy'])}**, ragdec greedy"
            f" {_x(greedy['e2e_speedup_vs_llamacpp_greedy'])}, llama.cpp prompt lookup"
            f" {_x(lookup['e2e_speedup_vs_llamacpp_greedy'])}; llma identical to greedy"
            f" {_count(llma['identical_to_greedy'], prompts)}",
            _file(name),
        ]
    methods = load("llamacpp_rag_int4.json")["methods"]
    yield [
        "rag decode, llma against ragdec's greedy",
        f"{_x(methods['llma']['speedup_vs_greedy'])} ({_tps(methods['llma']['tokens_per_s'])} against"
        f" {_tps(methods['greedy']['tokens_per_s'])} tokens/s;"
        f" {methods['llma']['mean_tokens_per_forward']:.2f} tokens a forward)",
        _file("llamacpp_rag_int4.json"),
    ]
    for name in ("qa_model_qwen0.5b_int4.json", "qa_model_qwen1.5b_int4.json"):
        result = load(name)
        settings, llma = result["settings"], result["methods"]["llma"]
        questions = settings["questions"]
        yield [
            f"{questions} SQuAD questions through the pipeline, {MODEL_SIZE[settings['model']]}"
            f" {settings['dtype']}, llma",
            f"answer contained in {_count(llma['answer_contained'], questions)}, F1"
            f" {llma['f1']:.3f}; {_tps(llma['tokens_per_s'])} new tokens/s whole request,"
            f" {llma['ttft_s']:.2f} s to the first token",
            _file(name),
        ]
    cag, in_prompt = load("cag_near_int4.json"), load("cag_near_int4_in_prompt.json")
    yield [
        f"near hits in the QA cache ({cag['near_hits']} of {cag['settings']['pairs']}"
        " Quora paraphrases), llma decode against greedy",
        f"{_x(cag['methods']['llma']['decode_speedup_vs_greedy'])} (an oracle copier's bound"
        f" {_x(cag['methods']['llma']['copy_speedup_bound'])}); with the near-hit answers in the"
        f" prompt {_x(in_prompt['methods']['llma']['decode_speedup_vs_greedy'])}",
        _file("cag_near_int4.json", "cag_near_int4_in_prompt.json"),
    ]
    load_rag = load("server_load_rag.json")
    one, eight = load_rag["runs"]["max_batch=1"], load_rag["runs"]["max_batch=8"]
    config = load_rag["config"]
    yield [
        f"one server, {config['clients']} clients x {config['requests_per_client']} rag"
        " requests, --max-batch 8 against 1",
        f"{eight['answers_per_s']:.3f} against {one['answers_per_s']:.3f} answers/s; p95 latency"
        f" {eight['latency_s']['p95']:.0f} against {one['latency_s']['p95']:.0f} s; answers that"
        f" differ from one-at-a-time: {eight['mixed']}/{eight['requests']}",
        _file("server_load_rag.json"),
    ]


@_columns("workload, ragdec's weights", "llamacpp-greedy tok/s (e2e s)", "llamacpp-prompt-lookup", "ragdec greedy",
          "ragdec llma", "llma identical to greedy")
def llamacpp() -> Iterator[list[str]]:
    """ragdec's greedy and llma beside llama.cpp's greedy and prompt lookup, per dtype."""
    for workload in ("rag", "chat"):
        for dtype in ("float32", "bfloat16", "int4"):
            name = f"llamacpp_{workload}_{dtype}.json"
            methods = load(name)["methods"]
            base = methods["llamacpp-greedy"]

            def cell(method: str) -> str:
                result = methods[method]
                return f"{_tps(result['tokens_per_s'])}, e2e {_x(result['e2e_speedup_vs_llamacpp_greedy'])}"

            yield [
                f"{workload}, {dtype}",
                f"{_tps(base['tokens_per_s'])} ({base['e2e_s']:.2f})",
                cell("llamacpp-prompt-lookup"),
                cell("greedy"),
                cell("llma"),
                _count(methods["llma"]["identical_to_greedy"], methods["llma"]["prompts"]),
                _file(name),
            ]


@_columns("workload (prompts)", "bild", "ROUGE-L bild / greedy", "bild-lossless", "bild-lossless / hf-assisted tok/s",
          "bild-lossless identical")
def _bild(prefix: str) -> Iterator[list[str]]:
    for workload, label in WORKLOADS.items():
        name = f"{prefix}_{workload}.json"
        result = load(name)
        methods = result["methods"]
        bild, lossless, greedy = methods["bild"], methods["bild-lossless"], methods["hf-greedy"]
        assisted = methods.get("hf-assisted")
        yield [
            f"{label} ({result['settings']['prompts']})",
            _x(bild["speedup_vs_hf_greedy"]),
            f"{bild['rougeL']:.3f} / {greedy['rougeL']:.3f}",
            _x(lossless["speedup_vs_hf_greedy"]),
            _x(lossless["tokens_per_s"] / assisted["tokens_per_s"]) if assisted else "-",
            _count(lossless["identical_to_hf_greedy"], lossless["prompts"]),
            _file(name),
        ]


def bild() -> str:
    """BiLD (1.5B verifying, 0.5B drafting) over the big model's hf-greedy, float32."""
    return _bild("bild")


def bild_bf16() -> str:
    """The same in bfloat16, against bfloat16 hf-greedy."""
    return _bild("bild_bf16")


@_columns("model, workload (prompts)", "hf-greedy tok/s", "hf-early-exit", "free (exit rate)",
          "free ROUGE-L (greedy's)", "free-lossless (drafted, kept)")
def free() -> Iterator[list[str]]:
    """FREE's early exit on the frozen models with a calibrated exit head, float32."""
    for model in ("qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-1.5b-instruct"):
        for workload, label in WORKLOADS.items():
            name = f"free_{model}_{workload}.json"
            result = load(name)
            methods, settings = result["methods"], result["settings"]
            greedy, early, free_, lossless = (
                methods["hf-greedy"],
                methods["hf-early-exit"],
                methods["free"],
                methods["free-lossless"],
            )
            layer = settings.get("options", {}).get("exit_layer", "default")
            yield [
                f"{MODEL_SIZE[model]} {label} ({settings['prompts']}), layer {layer}",
                _tps(greedy["tokens_per_s"]),
                _x(early["speedup_vs_hf_greedy"]),
                f"{_x(free_['speedup_vs_hf_greedy'])} ({_share(free_['drafted_share'])})",
                f"{free_['rougeL']:.3f} ({greedy['rougeL']:.3f})",
                f"{_x(lossless['speedup_vs_hf_greedy'])} ({_share(lossless['drafted_share'])},"
                f" {_share(lossless['accepted_draft_share'])})",
                _file(name),
            ]


@_columns("model", "exit layer: agreement before -> after calibration")
def free_calibration() -> Iterator[list[str]]:
    """Held-out top-1 agreement of FREE's calibrated exit head with the deep model."""
    for model in ("qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-1.5b-instruct"):
        name = f"free_calibration_{model}.json"
        layers = sorted(load(name), key=lambda run: run["exit_layer"])
        yield [
            MODEL_SIZE[model],
            ", ".join(
                f"{run['exit_layer']}: {_share(run['agreement_before'])} -> {_share(run['agreement_after'])}"
                for run in layers
            ),
            _file(name),
        ]


@_columns("model", "dtype", "method", "questions", "answer contained", "F1", "new tokens/s, whole request",
          "decode tokens/s", "s to first token")
def qa() -> Iterator[list[str]]:
    """Whole requests through the RAG pipeline: SQuAD questions over all their paragraphs."""
    for path in sorted(RESULTS.glob("qa_model_*.json")):
        result = load(path.name)
        settings = result["settings"]
        for method, figures in result["methods"].items():
            questions = settings["questions"]
            yield [
                MODEL_SIZE.get(settings["model"], settings["model"]),
                settings.get("dtype", "not recorded"),
                method,
                str(questions),
                _count(figures["answer_contained"], questions),
                f"{figures['f1']:.3f}",
                _tps(figures["tokens_per_s"]),
                _tps(figures["decode_tokens_per_s"]),
                f"{figures['ttft_s']:.2f}",
                _file(path.name),
            ]


@_columns("load, clients x requests", "max batch", "answered", "mixed", "answers/s", "tokens/s", "latency p50 / p95 s",
          "mean queue / prefill / decode s", "peak RSS MB")
def server_load() -> Iterator[list[str]]:
    """Many clients on one `ragdec serve`, one request at a time against a batch of 8."""
    for load_name in ("rag", "chat"):
        name = f"server_load_{load_name}.json"
        result = load(name)
        config = result["config"]
        for batch, run in result["runs"].items():
            split = run["time_split_mean_s"]
            yield [
                f"{load_name}, {config['clients']} x {config['requests_per_client']}",
                batch.split("=")[1],
                f"{run['answered']}/{run['requests']}",
                str(run["mixed"]),
                f"{run['answers_per_s']:.3f}",
                f"{run['tokens_per_s']:.2f}",
                f"{run['latency_s']['p50']:.0f} / {run['latency_s']['p95']:.0f}",
                f"{split['queue']:.1f} / {split['prefill']:.1f} / {split['decode']:.1f}",
                f"{run['peak_rss_mb']:.0f}",
                _file(name),
            ]


@_columns("near hits", "outcomes", "llma decode vs greedy", "end to end", "tokens a forward", "identical",
          "oracle bound / after a one-token match")
def cag_near() -> Iterator[list[str]]:
    """Second questions of Quora duplicate pairs that hit the QA cache near: greedy and llma."""
    for name in ("cag_near_int4.json", "cag_near_int4_in_prompt.json"):
        result = load(name)
        llma, outcomes = result["methods"]["llma"], result["outcomes"]
        yield [
            "near-hit answers in the prompt" if result["settings"]["near_in_prompt"] else "references only",
            f"{result['near_hits']} near, {_share(outcomes['semantic'])} semantic,"
            f" {_share(outcomes['miss'])} miss",
            _x(llma["decode_speedup_vs_greedy"]),
            _x(llma["e2e_speedup_vs_greedy"]),
            f"{llma['mean_tokens_per_forward']:.2f}",
            _count(llma["identical_to_greedy"], result["near_hits"]),
            f"{_x(llma['copy_speedup_bound'])} / {_x(llma['lookup_speedup_bound'])}",
            _file(name),
        ]


TABLES: dict[str, Callable[[], str]] = {
    "headline": headline,
    "llamacpp": llamacpp,
    "bild": bild,
    "bild_bf16": bild_bf16,
    "free": free,
    "free_calibration": free_calibration,
    "qa": qa,
    "server_load": server_load,
    "cag_near": cag_near,
}

BLOCK = re.compile(r"(<!-- results:(?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /results:(?P=name) -->)", re.DOTALL)


def marked_files() -> list[Path]:
    """The markdown files that may hold marked tables: README.md and docs/*.md."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def blocks(text: str) -> list[tuple[str, str]]:
    """(name, body) of every marked table in a markdown text."""
    return [(match["name"], match["body"]) for match in BLOCK.finditer(text)]


def render(name: str) -> str:
    """A table as it stands between its markers (with its trailing newline)."""
    if name not in TABLES:
        raise SystemExit(f"no results table {name!r}; the tables are: {', '.join(TABLES)}")
    return TABLES[name]() + "\n"


def rewrite(text: str) -> str:
    """``text`` with every marked table replaced by the current one."""
    return BLOCK.sub(lambda match: match.group(1) + render(match["name"]) + match.group(4), text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help=f"tables to print (default all): {', '.join(TABLES)}")
    parser.add_argument("--write", action="store_true", help="rewrite the marked tables in README.md and docs/*.md")
    args = parser.parse_args(argv)
    if args.write:
        for path in marked_files():
            text = path.read_text(encoding="utf-8")
            if rewrite(text) != text:
                path.write_text(rewrite(text), encoding="utf-8")
                print(f"rewrote {path.relative_to(ROOT)}")
        return 0
    for name in args.names or TABLES:
        print(f"<!-- results:{name} -->\n{render(name)}<!-- /results:{name} -->\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
