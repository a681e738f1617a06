"""Benchmark workloads: prompts (as chat messages) and the references a method may copy from.

Data is read from ``--data``, ``$RAGDEC_DATA`` or ``../shared/data`` beside the project;
it is never copied into the repository, which holds only the small samples the tests read
(``tests/data``, laid out alike).
"""

from __future__ import annotations

import ast
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from ragdec import files


@dataclass(frozen=True)
class BenchPrompt:
    messages: tuple[dict, ...]  # OpenAI-style chat messages
    references: tuple[str, ...] = ()  # text the method may copy from
    forced_answer: str | None = None  # for forced-output workloads
    targets: tuple[str, ...] = ()  # reference outputs (gold summary, answers) that ROUGE-L scores against


def data_dir(explicit: str | None = None) -> Path:
    """The evaluation data folder: ``explicit`` (``--data``), else ``$RAGDEC_DATA``, else
    ``../shared/data`` beside the project. A folder named but absent is an error, not a
    reason to read another one.

    Raises:
        FileNotFoundError: saying what to pass.
    """
    hint = "pass --data DIR or set RAGDEC_DATA to the folder holding rag/, summarize/, qa/, ..."
    for source, named in (("--data", explicit), ("RAGDEC_DATA", os.environ.get("RAGDEC_DATA"))):
        if named:
            if not Path(named).is_dir():
                raise FileNotFoundError(f"benchmark data folder {named} (from {source}) not found: {hint}")
            return Path(named)
    beside = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
    if beside.is_dir():
        return beside
    raise FileNotFoundError(f"benchmark data not found: {hint}")


def read_jsonl(path: Path) -> list[dict]:
    """Every record of a data file (``ragdec.files.read_jsonl``), or what to pass when it is missing."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: pass --data DIR pointing at the evaluation data")
    return files.read_jsonl(path)


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


def xsum(data: Path) -> list[BenchPrompt]:
    """XSum documents to summarize in one sentence; the gold summary is the target. Nothing
    is given to copy from (BiLD and FREE need none)."""
    return [
        BenchPrompt(
            ({"role": "user", "content": f"Summarize the following article in one sentence.\n\n{r['document']}"},),
            targets=(r["summary"],),
        )
        for r in read_jsonl(data / "summarize" / "xsum.jsonl")
    ]


def squad(data: Path) -> list[BenchPrompt]:
    """SQuAD questions with their passage in the prompt; the gold answers are the targets."""
    passages = {r["id"]: r for r in read_jsonl(data / "qa" / "squad_passages.jsonl")}
    prompts = []
    for r in read_jsonl(data / "qa" / "squad_questions.jsonl"):
        passage = passages.get(r["passage_id"])
        if passage is None:
            continue
        answers = r["answers"]
        if isinstance(answers, str):  # stored as the text of a Python list
            answers = ast.literal_eval(answers) if answers.startswith("[") else [answers]
        content = (
            f"{passage['title']}\n{passage['text']}\n\n"
            f"Answer the question with a short answer taken from the passage above.\nquestion: {r['question']}"
        )
        prompts.append(BenchPrompt(({"role": "user", "content": content},), targets=tuple(answers)))
    return prompts


def specbench_qa_translation(data: Path) -> list[BenchPrompt]:
    """Spec-Bench's qa (Natural Questions, no passage) and translation (WMT, German to
    English) categories, first turn, interleaved; translations carry their reference."""
    rows = read_jsonl(data / "specbench" / "question.jsonl")
    by_category = {
        category: [
            BenchPrompt(({"role": "user", "content": r["turns"][0]},), targets=tuple(r.get("reference") or ()))
            for r in rows
            if r["category"] == category
        ]
        for category in ("qa", "translation")
    }
    return _interleave(by_category["qa"], by_category["translation"])


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
    "xsum": xsum,
    "squad": squad,
    "specbench-qa-translation": specbench_qa_translation,
}


def load_workload(name: str, data: str | None = None, limit: int | None = None) -> list[BenchPrompt]:
    if name not in WORKLOADS:
        raise ValueError(f"unknown workload {name!r}; workloads: {', '.join(sorted(WORKLOADS))}")
    prompts = WORKLOADS[name](data_dir(data))
    return prompts[:limit] if limit else prompts
