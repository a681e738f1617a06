"""FAQ answering: curated answers served from the cache where safe, otherwise generated
with the near-hit answers as references.

An FAQ file is JSON Lines, one question a line::

    {"id": 1, "question": "How do I delete my Facebook account?",
     "answers": ["Go to Settings ...", "..."], "paraphrases": ["Removing my FB account.", ...]}

``answers`` may be one string under ``answer``; the first answer is the one served.
Paraphrases, when given, are stored as further keys of the same answer (exact hits for
them, and a paraphrase close to a user's wording lifts the score of the right answer).
Entries are curated (model ``human``): valid whatever model answers, never expired.

Asking goes through the FAQ policy (``QACache.policy("faq")``): serve the best entry when it
scores above the threshold, beats the best entry with another answer by the margin, and
every number and name in the question appears in it. Otherwise the model answers, with the
closest FAQ answers in its prompt and as LLMA references (it copies what fits at the cost
of one forward pass per copied span), and the answer is cached for the next asker.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ragdec.files import iter_jsonl

from .lookup import Lookup, QACache
from .store import HUMAN, NewEntry

DEFAULT_FAQ_MODEL = "qwen2.5-coder-0.5b-instruct"
SYSTEM_PROMPT = "You answer questions for a help desk. Answer briefly and precisely."


@dataclass(frozen=True)
class FaqRecord:
    id: str  # the record's id in its file (its line number when it has none)
    question: str  # the canonical question
    answers: tuple[str, ...]  # best first; the first is served
    paraphrases: tuple[str, ...] = ()  # other wordings of the question


@dataclass(frozen=True)
class ImportReport:
    records: int  # FAQ questions read
    entries: int  # cache entries written (questions and paraphrases)
    path: str  # the file imported


@dataclass(frozen=True)
class FaqAnswer:
    text: str  # what the user gets
    lookup: Lookup  # how the cache answered (outcome, score, references, reason)
    generated: bool  # True when the model wrote it
    stats: dict | None = None  # decoding stats when generated
    finish_reason: str | None = None  # "stop" | "length" when generated (only "stop" answers are cached)


def read_faq(path: str | Path) -> list[FaqRecord]:
    """FAQ records from JSON Lines (see the module docstring).

    Raises:
        FileNotFoundError: no file.
        ValueError: a record without a question or an answer (its line number is given).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: pass a JSON Lines file of {{\"question\", \"answers\"[, \"paraphrases\"]}} records")
    records = []
    for number, record in iter_jsonl(path):
        try:
            answers = record.get("answers", [record["answer"]] if "answer" in record else [])
            answers = [answers] if isinstance(answers, str) else answers
            question = record["question"]
            if not isinstance(question, str) or not question.strip():
                raise ValueError("empty question")
            if not answers or not all(isinstance(a, str) and a.strip() for a in answers):
                raise ValueError("no answer")
            paraphrases = [p for p in record.get("paraphrases", []) if isinstance(p, str) and p.strip()]
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            raise ValueError(
                f"{path}, line {number}: expected {{\"question\": str, \"answers\": [str, ...], \"paraphrases\": [str, ...]}} ({error})"
            ) from error
        records.append(FaqRecord(str(record.get("id", number)), question, tuple(answers), tuple(paraphrases)))
    if not records:
        raise ValueError(f"{path} holds no FAQ records")
    return records


def faq_entries(records: Sequence[FaqRecord], source: str, with_paraphrases: bool = True) -> list[NewEntry]:
    """Cache entries of ``records``: each question, and each paraphrase when asked, keyed to
    the record's first answer."""
    entries = []
    for record in records:
        tag = f"faq:{source}#{record.id}"
        questions = [record.question] + (list(record.paraphrases) if with_paraphrases else [])
        entries += [NewEntry(q, record.answers[0], HUMAN, "", tag) for q in dict.fromkeys(questions)]
    return entries


def import_faq(cache: QACache, path: str | Path, with_paraphrases: bool = True, progress: bool = False) -> ImportReport:
    """Read ``path`` and cache its questions (and paraphrases); importing again replaces
    the entries of questions already there."""
    records = read_faq(path)
    entries = faq_entries(records, Path(path).name, with_paraphrases)
    cache.put_many(entries, progress=progress)
    return ImportReport(len(records), len(entries), str(path))


@dataclass(frozen=True)
class ParaphraseScores:
    """How paraphrase queries meet the curated entries: what FAQ calibration sweeps."""

    top: object  # float [n]: cosine of the best curated entry
    margin: object  # float [n]: over the best entry with another answer
    guard_pass: object  # bool [n]: the specifics guard on the best entry
    right: object  # bool [n]: the best entry is the query's own record


def score_questions(cache: QACache, questions: Sequence[str], vectors=None):
    """How ``questions`` meet the curated entries in ``cache``: (top [n], margin [n],
    guard_pass [n], best entries [n]) under the specifics guard. ``vectors`` [n, d]: their
    embeddings when the caller has them."""
    import numpy as np

    from .lookup import assess

    if vectors is None:
        from .calibration import embed_unique

        vectors = embed_unique(cache.embedder, list(questions))
    top, margin, guard_pass, best = [], [], [], []
    for question, vector in zip(questions, vectors):
        assessment = assess(question, cache.candidates(vector, HUMAN, curated_only=True), "specifics")
        top.append(assessment.best.score if assessment.best else -1.0)
        margin.append(assessment.margin)
        guard_pass.append(bool(assessment.verdict))
        best.append(assessment.best.entry if assessment.best else None)
    return np.array(top), np.array(margin), np.array(guard_pass, dtype=bool), best


def score_paraphrases(cache: QACache, records: Sequence[FaqRecord], vectors=None, source: str = "") -> ParaphraseScores:
    """Assess every paraphrase of ``records`` against the curated entries in ``cache`` (the
    records imported without their paraphrases; ``source``: the file name they were
    imported under). ``vectors`` [n, d]: the paraphrases' embeddings, in record order."""
    import numpy as np

    queries = [(record.id, paraphrase) for record in records for paraphrase in record.paraphrases]
    if not queries:
        raise ValueError("no paraphrases to calibrate with: FAQ records need a \"paraphrases\" list")
    top, margin, guard_pass, best = score_questions(cache, [q for _, q in queries], vectors)
    suffixes = [f"{source}#{record_id}" if source else f"#{record_id}" for record_id, _ in queries]
    right = np.array([entry is not None and entry.source.endswith(suffix) for entry, suffix in zip(best, suffixes)])
    return ParaphraseScores(top, margin, guard_pass, right)


def faq_messages(question: str, references: Sequence[str]) -> list[dict]:
    """The chat for a generated answer: the closest FAQ answers go in the prompt too, so the
    model can use them and the LLMA decoder finds its copies in the references."""
    messages = [{"role": "system", "content": SYSTEM_PROMPT}]
    if references:
        related = "\n\n".join(f"[{i}] {text}" for i, text in enumerate(references, 1))
        messages.append({"role": "system", "content": f"Answers to similar questions (they may not fit this one):\n{related}"})
    messages.append({"role": "user", "content": question})
    return messages


class FaqService:
    """Answers questions from a cache of curated answers, generating when not safe.

    Example::

        service = FaqService(QACache.open("faq.sqlite"), model="qwen2.5-coder-0.5b-instruct")
        service.ask("How can I remove my facebook account?").generated   # False: the FAQ answer
        service.ask("Removing my FB account.").generated   # True when "FB" is nowhere in the entry (guard)
        service.ask("How do I delete my Instagram account?")     # generated, FAQ answers as references
    """

    def __init__(self, cache: QACache, model: str = DEFAULT_FAQ_MODEL, max_new_tokens: int = 256, cache_generated: bool = True,
                 dtype: str | None = None):
        self.cache = cache
        self.model = model  # zoo name, folder or hub id: also the cache's model key
        self.dtype = dtype  # the model's weights (``Generator.load``; None: float32); the app passes its default, int4
        self.max_new_tokens = max_new_tokens
        self.cache_generated = cache_generated  # store generated answers for the next asker
        self._generator = None

    @property
    def generator(self):
        if self._generator is None:
            from ragdec.decoding.generator import Generator

            self._generator = Generator.load(self.model, self.dtype)
        return self._generator

    def ask(self, question: str) -> FaqAnswer:
        """The FAQ answer when safe; else the model's, with the near FAQ answers (and near
        earlier generated answers) as references.

        Three steps: (1) an exact hit on any entry; (2) curated entries under the FAQ policy;
        (3) answers this model generated before, under the strict paraphrase policy (the FAQ
        policy's looser wording check is for curated answers only).
        """
        if not question.strip():
            raise ValueError('the question is empty: ask something, e.g. ragdec faq ask "How do I ...?"')
        exact = self.cache.exact(question, model=self.model)
        if exact is not None:
            return FaqAnswer(exact.answer, exact, generated=False)
        vector = self.cache.embed(question)
        curated = self.cache.similar(question, model=self.model, policy="faq", vector=vector, curated_only=True)
        if curated.served:
            return FaqAnswer(curated.answer, curated, generated=False)
        earlier = self.cache.similar(question, model=self.model, policy="pairs", vector=vector)
        if earlier.served:
            return FaqAnswer(earlier.answer, earlier, generated=False)
        references = tuple(dict.fromkeys(curated.references + earlier.references))
        lookup = curated if curated.score >= earlier.score else earlier
        lookup = Lookup("near" if references else "miss", None, references, lookup.score, lookup.entry_id,
                        lookup.matched_question, lookup.reason)
        return self._generate(question, lookup, vector)

    def _generate(self, question: str, lookup: Lookup, vector) -> FaqAnswer:
        from ragdec.decoding.methods import GenerationParams

        generator = self.generator
        prompt_ids = generator.prompt_ids(faq_messages(question, lookup.references))
        params = GenerationParams(max_new_tokens=self.max_new_tokens, method="llma")
        generation = generator.generate(prompt_ids, params, references=list(lookup.references))
        text = generation.text.strip()
        if self.cache_generated and text and generation.finish_reason == "stop":
            self.cache.put(question, text, model=self.model, vector=vector)
        return FaqAnswer(text, lookup, generated=True, stats=generation.stats.as_dict(), finish_reason=generation.finish_reason)
