"""`ragdec bench pid`: many questions about one document, answered one by one or in one batch.

Documents: SQuAD paragraphs with all their questions (../shared/data/qa, questions grouped
by ``passage_id``; the paragraphs with the most questions first) and CoQA stories with all
their questions at once (history ignored: each question stands alone). ``--limit N``
takes the first N documents of each set.

Methods, each answering every question of a document (greedy, same prompts):
- sequential-greedy: ``Generator.generate`` per question (the reference);
- sequential-llma: LLMA per question, copying from the document;
- hf-batch: ``model.generate`` on a left-padded batch of the [document + question] prompts;
- pid / pid-llma: ``pid_generate`` (document prefilled once, questions decoded in one
  batch; rows with LLMA drafts); pid-copy: pid with the prefix KV copied per row.

Methods alternate per document, their order rotated, after a warm-up on the first
document. ``answers_per_s`` is a document's questions over the method's wall time for
them (median over documents); ``speedup_vs_sequential_greedy`` the median of per-document
ratios; ``identical_to_sequential_greedy`` the share of answers equal token for token;
``peak_memory_mb`` the most resident memory a document's run added above what the
process held before it (the peak counter reset before each run, freed heap returned to
the OS first), the largest over documents.
"""

from __future__ import annotations

import ctypes
import os
import statistics
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Sequence

from .workloads import data_dir, read_jsonl

PID_BENCH_METHODS = ("sequential-greedy", "sequential-llma", "hf-batch", "pid", "pid-llma")
KNOWN_METHODS = (*PID_BENCH_METHODS, "pid-copy")
REFERENCE = "sequential-greedy"
MANY_QUESTIONS = 8  # the target is for documents with this many questions or more


@dataclass(frozen=True)
class Document:
    dataset: str  # "squad" | "coqa"
    id: str
    text: str
    questions: tuple[str, ...]


def load_documents(data: str | None, limit: int | None = None) -> list[Document]:
    """SQuAD paragraphs (most questions first) and CoQA stories; ``limit`` per set."""
    root = data_dir(data)
    passages = {r["id"]: r["text"] for r in read_jsonl(root / "qa" / "squad_passages.jsonl")}
    by_passage: dict[str, list[str]] = defaultdict(list)
    for record in read_jsonl(root / "qa" / "squad_questions.jsonl"):
        by_passage[record["passage_id"]].append(record["question"])
    squad = [Document("squad", pid, passages[pid], tuple(qs)) for pid, qs in by_passage.items()]
    squad.sort(key=lambda d: (-len(d.questions), d.id))
    coqa = [
        Document("coqa", r["id"], r["story"], tuple(t["question"] for t in r["turns"]))
        for r in read_jsonl(root / "dialogue" / "coqa.jsonl")
    ]
    return squad[:limit] + coqa[:limit]


def qa_prompt(document: str, question: str) -> list[dict]:
    """The document first, so that every question's prompt shares it as a prefix."""
    return [{
        "role": "user",
        "content": f"Passage:\n{document}\n\nAnswer the question about the passage above in one short sentence.\n"
        f"Question: {question}",
    }]


# ---- memory ------------------------------------------------------------------------------


class PeakMemory:
    """Resident memory a block adds at its peak, in MB (Linux: VmHWM after resetting it)."""

    def __enter__(self):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed heap back to the OS: it would hide growth
        except OSError:
            pass
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset the peak RSS counter
        except OSError:
            pass
        self.baseline = _status_kb("VmRSS")
        self.peak_mb: float | None = None
        return self

    def __exit__(self, *exc):
        peak = _status_kb("VmHWM")
        if peak is not None and self.baseline is not None:
            self.peak_mb = max(0.0, (peak - self.baseline) / 1024)
        return False


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


# ---- methods -----------------------------------------------------------------------------


def _answer(method: str, generator, prompts: Sequence[list[int]], document: str, max_new_tokens: int) -> list[tuple[int, ...]]:
    from ragdec.decoding.methods import GenerationParams
    from ragdec.decoding.pid import pid_generate

    if method in ("sequential-greedy", "sequential-llma"):
        params = GenerationParams(max_new_tokens=max_new_tokens, method=method.split("-")[1])
        return [generator.generate(p, params, [document]).token_ids for p in prompts]
    if method == "hf-batch":
        return _hf_batch(generator, prompts, max_new_tokens)
    if method in ("pid", "pid-llma", "pid-copy"):
        params = GenerationParams(max_new_tokens=max_new_tokens, method="pid-llma" if method == "pid-llma" else "pid")
        share = "copy" if method == "pid-copy" else "view"
        return [g.token_ids for g in pid_generate(generator, prompts, params, [document], share=share)]
    raise ValueError(f"unknown pid bench method {method!r}; methods: {', '.join(KNOWN_METHODS)}")


def _hf_batch(generator, prompts: Sequence[list[int]], max_new_tokens: int) -> list[tuple[int, ...]]:
    """``model.generate`` over the left-padded batch; each answer cut after its first EOS."""
    import torch

    pad = generator.tokenizer.pad_token_id
    if pad is None:
        pad = next(iter(generator.eos_token_ids), 0)
    width = max(len(p) for p in prompts)
    input_ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in prompts])
    attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.inference_mode():
        out = generator.model.generate(
            input_ids, attention_mask=attention_mask, do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=pad
        )
    answers = []
    for row in out[:, width:].tolist():
        end = next((i + 1 for i, t in enumerate(row) if t in generator.eos_token_ids), len(row))
        answers.append(tuple(row[:end]))
    return answers


# ---- the run -----------------------------------------------------------------------------


def run_pid_bench(data: str | None, json_path: str | None, **kwargs) -> dict:
    """Measure every method on every document; print a table; write JSON to ``json_path``
    (None or "": nowhere; the committed results go to bench/results/pid.json).

    Keyword args:
        model: the answer model (default qwen2.5-coder-0.5b-instruct).
        methods: method names (default: ``PID_BENCH_METHODS``); sequential-greedy always runs,
            as the reference.
        limit: documents per set (default: all).
        max_new_tokens: per answer (default 64).
    """
    from tqdm import tqdm

    from ragdec.bench.machine import machine_info
    from ragdec.decoding.generator import Generator, configure_threads
    from ragdec.decoding.pid import shared_prefix_len

    configure_threads()
    model = kwargs.get("model") or "qwen2.5-coder-0.5b-instruct"
    methods = list(kwargs.get("methods") or PID_BENCH_METHODS)
    unknown = [m for m in methods if m not in KNOWN_METHODS]
    if unknown:
        raise ValueError(f"unknown pid bench method(s) {unknown}; methods: {', '.join(KNOWN_METHODS)}")
    if REFERENCE not in methods:
        methods.insert(0, REFERENCE)
    max_new_tokens = kwargs.get("max_new_tokens") or 64
    documents = load_documents(data, kwargs.get("limit"))
    generator = Generator.load(model)
    prompts = [[generator.prompt_ids(qa_prompt(d.text, q)) for q in d.questions] for d in documents]

    states: dict[str, dict] = {}

    def run(method: str, i: int, max_tokens: int):
        generator.method_state = states.setdefault(method, {})  # each method learns only from its own runs
        with PeakMemory() as memory:
            start = time.perf_counter()
            answers = _answer(method, generator, prompts[i], documents[i].text, max_tokens)
            seconds = time.perf_counter() - start
        return {"answers": answers, "seconds": seconds, "peak_memory_mb": memory.peak_mb}

    for method in methods:  # warm-up: kernels, the LLMA cost model
        run(method, 0, min(16, max_new_tokens))
    states.clear()
    runs: dict[str, list[dict]] = {m: [] for m in methods}
    started = time.time()
    for i in tqdm(range(len(documents)), desc="bench pid", unit="document", file=sys.stderr):
        order = methods[i % len(methods) :] + methods[: i % len(methods)]
        for method in order:
            runs[method].append(run(method, i, max_new_tokens))
    result = {
        "machine": {**machine_info(), "load_average_1m_at_end": round(os.getloadavg()[0], 2)},
        "workload": "pid",
        "model": model,
        "settings": {
            "limit": kwargs.get("limit"),
            "max_new_tokens": max_new_tokens,
            "documents": {s: sum(d.dataset == s for d in documents) for s in ("squad", "coqa")},
            "questions": sum(len(d.questions) for d in documents),
            "mean_questions_per_document": round(statistics.mean(len(d.questions) for d in documents), 2),
            "mean_prompt_tokens": round(statistics.mean(len(p) for ps in prompts for p in ps), 1),
            "mean_shared_prefix_tokens": round(statistics.mean(shared_prefix_len(ps) for ps in prompts), 1),
            "warmup": "first document, every method, 16 tokens",
        },
        "methods": _summary(runs, range(len(documents))),
        "by_dataset": {
            name: _summary(runs, [i for i, d in enumerate(documents) if d.dataset == name])
            for name in ("squad", "coqa")
            if any(d.dataset == name for d in documents)
        },
        f"documents_with_{MANY_QUESTIONS}_or_more_questions": _summary(
            runs, [i for i, d in enumerate(documents) if len(d.questions) >= MANY_QUESTIONS]
        ),
        "targets": {"pid_speedup_vs_sequential_greedy_min": 3.0, "pid_vs_hf_batch_min": 1.5, "identical": 1.0},
        "wall_s": round(time.time() - started, 1),
    }
    print(format_table(result))
    if json_path:
        from ragdec.bench.harness import write_json

        write_json(result, json_path)
    return result


def _summary(runs: dict[str, list[dict]], documents) -> dict:
    """Per method over ``documents`` (indices): medians of per-document figures."""
    documents = list(documents)
    if not documents:
        return {}
    reference = runs[REFERENCE]
    out = {}
    for method, method_runs in runs.items():
        rates, ratios, same, answers, seconds = [], [], 0, 0, 0.0
        for i in documents:
            run, ref = method_runs[i], reference[i]
            n = len(run["answers"])
            rates.append(n / run["seconds"])
            ratios.append(ref["seconds"] / run["seconds"])
            same += sum(a == b for a, b in zip(run["answers"], ref["answers"]))
            answers += n
            seconds += run["seconds"]
        peaks = [method_runs[i]["peak_memory_mb"] for i in documents if method_runs[i]["peak_memory_mb"] is not None]
        out[method] = {
            "answers_per_s": round(statistics.median(rates), 3),
            "speedup_vs_sequential_greedy": round(statistics.median(ratios), 3),
            "identical_to_sequential_greedy": round(same / answers, 4),
            "peak_memory_mb": round(max(peaks), 1) if peaks else None,
            "aggregate_answers_per_s": round(answers / seconds, 3),
            "mean_new_tokens": round(statistics.mean(len(a) for i in documents for a in method_runs[i]["answers"]), 2),
            "documents": len(documents),
            "answers": answers,
        }
    if "hf-batch" in out:
        for method in ("pid", "pid-llma"):
            if method in out:
                ratios = [runs["hf-batch"][i]["seconds"] / runs[method][i]["seconds"] for i in documents]
                out[method]["speedup_vs_hf_batch"] = round(statistics.median(ratios), 3)
    return out


def format_table(result: dict) -> str:
    columns = ["answers_per_s", "speedup_vs_sequential_greedy", "identical_to_sequential_greedy", "peak_memory_mb", "mean_new_tokens"]
    lines = [f"pid on {result['model']} ({result['machine']['cpu']}, {result['machine']['cores']} cores)"]
    sections = {"all": result["methods"], **result["by_dataset"]}
    for title, methods in sections.items():
        header = [title] + columns
        rows = [[name] + ["-" if v.get(c) is None else str(v.get(c)) for c in columns] for name, v in methods.items()]
        widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
        for row in [header] + rows:
            lines.append("  ".join(cell.ljust(width) for cell, width in zip(row, widths)))
        lines.append("")
    return "\n".join(lines).rstrip()
