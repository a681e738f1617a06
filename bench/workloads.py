"""Benchmark workloads: prompts (as chat messages) and the references a method may copy from.

Data is read from ``--data``, ``$RAGDEC_DATA`` or ``../shared/data`` beside the project;
it is never copied into the repository.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence


@dataclass(frozen=True)
class BenchPrompt:
    messages: tuple[dict, ...]  # OpenAI-style chat messages
    references: tuple[str, ...] = ()  # text the method may copy from
    forced_answer: str | None = None  # for forced-output workloads


def data_dir(explicit: str | None = None) -> Path:
    candidates = [explicit, os.environ.get("RAGDEC_DATA"), Path(__file__).resolve().parent.parent.parent / "shared" / "data"]
    for candidate in candidates:
        if candidate and Path(candidate).is_dir():
            return Path(candidate)
    raise FileNotFoundError(
        "benchmark data not found: pass --data DIR or set RAGDEC_DATA to the folder holding rag/, summarize/, ..."
    )


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: pass --data DIR pointing at the evaluation data")
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def rag_prompt(query: str, passages: Sequence[str]) -> str:
    """The LLMA paper's RAG setting (docs, then the query), asking an instruct model for a
    complete answer grounded in the passages."""
    numbered = "\n".join(f"[{i}] {p}" for i, p in enumerate(passages, 1))
    return (
        f"docs:\n{numbered}\n\n"
        "Answer the query with a complete answer in full sentences, based on the docs above.\n"
        f"query: {query}\nanswer:"
    )


def rag(data: Path) -> list[BenchPrompt]:
    """MS MARCO queries, each with its 10 retrieved passages (llma_msmarco); the passages
    are the references."""
    return [
        BenchPrompt(({"role": "user", "content": rag_prompt(r["query"], r["docs"])},), tuple(r["docs"]), r["davinci_answer"])
        for r in read_jsonl(data / "rag" / "llma_msmarco.jsonl")
    ]


WORKLOADS: dict[str, Callable[[Path], list[BenchPrompt]]] = {"rag": rag}


def load_workload(name: str, data: str | None = None, limit: int | None = None) -> list[BenchPrompt]:
    if name not in WORKLOADS:
        raise ValueError(f"unknown workload {name!r}; workloads: {', '.join(sorted(WORKLOADS))}")
    prompts = WORKLOADS[name](data_dir(data))
    return prompts[:limit] if limit else prompts
