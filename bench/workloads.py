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


def cag(data: Path) -> list[BenchPrompt]:
    """Cache-assisted generation: the prompt holds only the query; the reference is the
    stored answer of a similar earlier question (the davinci answer stands in for it)."""
    return [
        BenchPrompt(
            ({"role": "user", "content": f"Answer the query with a complete answer in full sentences.\nquery: {r['query']}\nanswer:"},),
            (r["davinci_answer"],),
        )
        for r in read_jsonl(data / "rag" / "llma_msmarco.jsonl")
    ]


def summarize(data: Path) -> list[BenchPrompt]:
    """CNN/DailyMail articles (the LLMA paper's Alpaca prompt) and XSum documents,
    interleaved; the document is the reference."""
    cnndm = [
        BenchPrompt(({"role": "user", "content": r["prompt"]},), tuple(r["docs"]) if isinstance(r["docs"], list) else (r["docs"],))
        for r in read_jsonl(data / "summarize" / "llma_cnndm.jsonl")
    ]
    xsum = [
        BenchPrompt(
            ({"role": "user", "content": f"Summarize the following article in a few sentences.\n\n{r['document']}"},),
            (r["document"],),
        )
        for r in read_jsonl(data / "summarize" / "xsum.jsonl")
    ]
    return _interleave(cnndm, xsum)


def specbench(data: Path) -> list[BenchPrompt]:
    """Spec-Bench's RAG (NQ question + passages) and summarization categories, first turn;
    the turn's text (passages, article) is the reference."""
    rows = read_jsonl(data / "specbench" / "question.jsonl")
    by_category = {
        category: [BenchPrompt(({"role": "user", "content": r["turns"][0]},), (r["turns"][0],)) for r in rows if r["category"] == category]
        for category in ("rag", "summarization")
    }
    return _interleave(by_category["rag"], by_category["summarization"])


CHAT_TURN = 3  # answer the 3rd question of each story, after two earlier turns


def chat(data: Path) -> list[BenchPrompt]:
    """CoQA: each prompt holds the story and the previous turns of the conversation; the
    story and the earlier answers are the references."""
    prompts = []
    for r in read_jsonl(data / "dialogue" / "coqa.jsonl"):
        turns = r["turns"][:CHAT_TURN]
        if len(turns) < CHAT_TURN:
            continue
        messages = [{"role": "system", "content": f"Answer questions about this story.\n\n{r['story']}"}]
        for turn in turns[:-1]:
            messages += [{"role": "user", "content": turn["question"]}, {"role": "assistant", "content": turn["answer"]}]
        messages.append({"role": "user", "content": turns[-1]["question"]})
        prompts.append(BenchPrompt(tuple(messages), (r["story"], *(t["answer"] for t in turns[:-1]))))
    return prompts


def _interleave(*lists: list[BenchPrompt]) -> list[BenchPrompt]:
    """a1, b1, a2, b2, ...: so that --limit takes from every source."""
    out = []
    for group in zip(*lists):
        out.extend(group)
    for lst in lists:
        out.extend(lst[min(len(x) for x in lists) :])
    return out


WORKLOADS: dict[str, Callable[[Path], list[BenchPrompt]]] = {
    "rag": rag,
    "rag-forced": rag,
    "cag": cag,
    "summarize": summarize,
    "specbench": specbench,
    "chat": chat,
}


def load_workload(name: str, data: str | None = None, limit: int | None = None) -> list[BenchPrompt]:
    if name not in WORKLOADS:
        raise ValueError(f"unknown workload {name!r}; workloads: {', '.join(sorted(WORKLOADS))}")
    prompts = WORKLOADS[name](data_dir(data))
    return prompts[:limit] if limit else prompts
