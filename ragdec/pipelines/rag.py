"""The answer pipeline: QA cache, retrieval, prompt, decoder, cache write-back.

One pipeline serves single questions (RAG) and conversations (chat): a request's messages
carry its history, the history feeds the same reference index as the passages, and the
question is rewritten with its context for retrieval.

    cache lookup ── exact / semantic hit ──> the stored answer, at once
        │ near hit: the stored answers join the references
        v
    retrieval (question + last turns) -> top-k passages fitted to a token budget
        v
    chat messages: system prompt | history | numbered passages + question
        v
    engine, streamed: in-process decoding (router: llma when there is anything to copy),
        or an OpenAI-compatible server sent the same messages (engine.py, remote.py)
        v
    answer written back to the cache (standalone questions over the store only), before
    its last chunk: a failed write is logged and told in ``info.warnings``, the answer stands
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, replace
from typing import Iterator, Sequence

from ragdec.decoding.generator import Generator
from ragdec.decoding.methods import GenerationParams

from .engine import Engine, EngineError, LocalEngine
from .limits import check_limits
from .prompts import (PLAIN_SYSTEM_PROMPT, SYSTEM_PROMPT, Prompt, RequestError, Source, build_prompt, fit_sources, retrieval_query,
                      split_messages, user_message)
from .router import Router, default_method
from .types import AUTO, AnswerInfo, Chunk, Request

BATCH_METHODS = frozenset({"pid", "pid-llma"})  # methods that answer a group of requests at once
NEAR_ANSWER_TITLE = "An earlier answer to a similar question"  # a near-hit answer as a passage

log = logging.getLogger(__name__)


@dataclass
class RagSettings:
    k: int = 5  # passages retrieved per question
    search_mode: str = "dense"  # "dense" | "bm25" | "hybrid"
    # the passages' share of the prompt: each token is read before the first word of the answer
    # (bench/results/pipeline_qa.json: ttft_s against mean_prompt_tokens)
    passage_tokens: int = 1024
    max_prompt_tokens: int = 3072  # history is cut to fit this (oldest turns first)
    system_prompt: str = SYSTEM_PROMPT  # unless the request brings its own
    plain_system_prompt: str = PLAIN_SYSTEM_PROMPT  # the same, for a pipeline without a store
    cache_answers: bool = True  # write generated answers to the QA cache
    reuse_prefix: bool = True  # keep the KV of the system prompt and history across requests
    # near-hit answers also go into the prompt, as passages after the store's ("an earlier
    # answer to a similar question"), so the model sees what it may copy: near hits answer
    # closer to the earlier answer and copy more of it (bench/results/cag_near_int4_in_prompt.json
    # against cag_near_int4.json); off: they are the decoder's references only, and a near
    # hit is answered from the passages as a miss would be
    near_in_prompt: bool = True


@dataclass(frozen=True)
class _Answering:
    """What the phases before decoding found out about one request, for its last chunk."""

    index: int  # the request's place in the batch (``Chunk.index``)
    started: float  # time.perf_counter() when the request came in
    question: str  # the user's last message: the QA cache's key
    standalone: bool  # no system prompt, history or references: its answer may be cached
    outcome: str  # the cache lookup's outcome, as ``AnswerInfo.cache`` tells it ("off": no lookup)
    cache_warnings: tuple[str, ...]  # what failed in the lookup (answered without the cache)
    sources: tuple[Source, ...]  # the passages in the prompt
    retrieval_s: float  # the search's seconds


class RagPipeline:
    """Answers requests with ``engine``, over ``retriever`` and ``cache`` when given.

    Args:
        engine: an ``Engine`` (engine.py), or a ``Generator`` to decode in process with.

    Example::

        pipeline = RagPipeline(Generator.load("qwen2.5-coder-0.5b-instruct"), Retriever.open("docs.store"))
        for chunk in pipeline.stream([Request([{"role": "user", "content": "Where does the Rhine begin?"}])]):
            print(chunk.text, end="")
        chunk.info.sources, chunk.stats.tokens_per_forward     # on the last chunk
    """

    def __init__(self, engine: Engine | Generator, retriever=None, cache=None, settings: RagSettings | None = None,
                 router: Router | None = None):
        self.engine: Engine = LocalEngine(engine) if isinstance(engine, Generator) else engine
        self.retriever = retriever  # ragdec.retrieval.Retriever, or None to answer from the request alone
        self.cache = cache  # ragdec.cache.QACache, or None
        self.settings = settings or RagSettings()
        self.router = router or Router(default=default_method(self.engine.name))

    @property
    def store_version(self) -> str:
        """What cached answers are tied to: the retrieval store's generation."""
        manifest = getattr(self.retriever, "manifest", None)
        return f"{manifest.generation}@{manifest.updated_at}" if manifest is not None else ""

    def stream(self, requests: Sequence[Request]) -> Iterator[Chunk]:
        for group in self._groups(requests):
            if len(group) > 1:
                yield from self._answer_group(group, [requests[i] for i in group])
            else:
                yield from self._answer(group[0], requests[group[0]])

    def _groups(self, requests: Sequence[Request]) -> list[list[int]]:
        """Indices of the requests answered together, in order of first appearance: those
        sharing everything but the question (system prompt with its document, history,
        references, params) that leave the method to the router or ask for PiD. Only
        without a store (retrieval gives each question passages of its own), and only by an
        engine that answers groups (a remote engine answers each request on its own).

        Example: [doc+q1, doc+q2, other+q3, doc+q4] -> [[0, 1, 3], [2]].
        """
        groups: dict[object, list[int]] = {}
        for i, request in enumerate(requests):
            params = request.params
            key: object = ("alone", i)
            if (self.retriever is None and self.engine.answers_groups and len(request.messages) > 1
                    and params.method in (AUTO, *BATCH_METHODS)):
                key = json.dumps(
                    [[dict(m) for m in request.messages[:-1]], list(request.references), params.max_new_tokens,
                     list(params.stop), params.method, dict(params.options)], sort_keys=True, default=str,
                )
            groups.setdefault(key, []).append(i)
        return list(groups.values())

    # ---- one request: its phases --------------------------------------------------------

    def _answer(self, index: int, request: Request) -> Iterator[Chunk]:
        """1. the QA cache, 2. retrieval, 3. the prompt, 4. the engine's answer streamed,
        5. the write-back to the cache (before the last chunk)."""
        started = time.perf_counter()
        try:
            check_limits(request)
            system, history, question = split_messages(request.messages)
        except RequestError as error:
            yield _error(index, str(error))
            return
        # a standalone question over the store: its answer depends on the question alone
        standalone = system is None and not history and not request.references

        # 1. the QA cache, keyed on the user's question (never on the assembled prompt)
        lookup, cache_warnings = self._look_up(question) if self.cache is not None and standalone else (None, ())
        outcome = lookup.outcome if lookup is not None else "off"
        if lookup is not None and lookup.served:
            seconds = time.perf_counter() - started
            yield Chunk(index, lookup.answer, "stop", None, AnswerInfo("cache", outcome, seconds=seconds, ttft_s=seconds))
            return

        # 2. retrieval, on the question with its context
        sources, retrieval_s = self._retrieve(question, history, lookup)
        references = self._references(sources, history, system, request.references, lookup)

        # 3. the prompt: history cut to fit what the answer needs
        try:
            prompt = self._prompt(system, history, question, sources, request.params.max_new_tokens)
        except RequestError as error:
            yield _error(index, str(error), outcome)
            return

        # 4. and 5.
        answering = _Answering(index, started, question, standalone, outcome, cache_warnings, tuple(sources), retrieval_s)
        yield from self._decode(answering, prompt, request.params, references)

    def _look_up(self, question: str):
        """The cache's lookup, or None with what went wrong: a shared cache that is down
        (PostgreSQL unreachable) makes the request a miss, answered all the same."""
        try:
            return self.cache.lookup(question, model=self.engine.name, store_version=self.store_version), ()
        except Exception as error:  # noqa: BLE001 - a cache that cannot be read must not fail the answer
            log.warning("the QA cache could not be read for %r: %s: %s", question[:80], type(error).__name__, error)
            return None, (f"the QA cache could not be read, answered without it ({type(error).__name__}: {error})",)

    def _retrieve(self, question: str, history: list, lookup) -> tuple[list[Source], float]:
        """The passages that fit their budget, numbered [1], [2], ... (the store's, then a
        near hit's answers when ``near_in_prompt``), and the seconds the search took."""
        settings = self.settings
        sources: list[Source] = []
        retrieval_s = 0.0
        if self.retriever is not None:
            t0 = time.perf_counter()
            hits = self.retriever.search(retrieval_query(question, history), k=settings.k, mode=settings.search_mode)
            retrieval_s = time.perf_counter() - t0
            sources = fit_sources(
                [Source(h.rank, h.id, h.title, h.text, h.score) for h in hits], settings.passage_tokens, self.engine.count_tokens
            )
        if settings.near_in_prompt and lookup is not None and lookup.outcome == "near":
            sources += fit_sources(
                [Source(max((s.number for s in sources), default=0) + 1 + i, -1, NEAR_ANSWER_TITLE, text, lookup.score)
                 for i, text in enumerate(lookup.references)],
                settings.passage_tokens, self.engine.count_tokens,
            )
        return sources, retrieval_s

    @staticmethod
    def _references(sources: list[Source], history: list, system: str | None, given: Sequence[str], lookup) -> list[str]:
        """What the decoder may copy: passages, earlier turns, the caller's system message
        (where a chain puts its context), the caller's references, and a near hit's
        answers (what still fits gets copied)."""
        near = list(lookup.references) if lookup is not None else []
        return [s.text for s in sources] + [m["content"] for m in history] + ([system] if system else []) + list(given) + near

    def _prompt(self, system: str | None, history: list, question: str, sources: list[Source], max_new_tokens: int) -> Prompt:
        """The chat templated within the prompt's limit: the caller's system prompt or the
        pipeline's, the newest history that fits, the numbered passages and the question.

        Raises:
            RequestError: the question and its passages alone do not fit.
        """
        settings = self.settings
        system = system or (settings.system_prompt if self.retriever is not None else settings.plain_system_prompt)
        prompt = build_prompt(self.engine.template, system, history, user_message(question, sources),
                              self._prompt_limit(max_new_tokens))
        return prompt if settings.reuse_prefix else replace(prompt, prefix_len=0)

    def _decode(self, answering: "_Answering", prompt: Prompt, params: GenerationParams,
                references: list[str]) -> Iterator[Chunk]:
        """The engine's answer by the method the router picks, streamed; the last chunk
        carries the stats and what the pipeline knows, after the write-back."""
        index, started = answering.index, answering.started
        method = self.engine.method or self.router.choose(params.method, bool(references))
        first_text_at = None
        texts: list[str] = []
        try:
            for chunk in self.engine.stream(prompt, replace(params, method=method), references):
                if chunk.text and first_text_at is None:
                    first_text_at = time.perf_counter()
                texts.append(chunk.text)
                if chunk.finish_reason is None:
                    if chunk.text:
                        yield Chunk(index, chunk.text)
                    continue
                # 5. write back, for the next asker: before the last chunk, so that a failed
                # write is told with the answer instead of failing it after it was sent
                warnings = answering.cache_warnings + self._maybe_write_back(answering, "".join(texts).strip(), chunk.finish_reason)
                seconds = time.perf_counter() - started
                info = AnswerInfo(
                    method, answering.outcome, answering.sources, seconds,
                    ttft_s=(first_text_at or time.perf_counter()) - started,
                    retrieval_s=answering.retrieval_s,
                    tokens_per_s=chunk.stats.new_tokens / seconds if seconds > 0 else 0.0,
                    dropped_turns=prompt.dropped_turns,
                    warnings=warnings,
                )
                yield Chunk(index, chunk.text, chunk.finish_reason, chunk.stats, info)
        except EngineError as error:  # a remote server unreachable, erring, or cut off mid-answer
            log.info("the engine failed on a request: %s", error)  # the chunk tells it; the server logs it as a warning
            seconds = time.perf_counter() - started
            info = AnswerInfo(method, answering.outcome, answering.sources, seconds,
                              ttft_s=(first_text_at or time.perf_counter()) - started, retrieval_s=answering.retrieval_s,
                              dropped_turns=prompt.dropped_turns, error=str(error), engine_failed=True)
            yield Chunk(index, "", "error", None, info)
        except ValueError as error:  # an unknown method, a prompt over the model's context
            yield _error(index, str(error), answering.outcome)

    def _maybe_write_back(self, answering: "_Answering", answer: str, finish_reason: str) -> tuple[str, ...]:
        """Cache a finished answer to a standalone question (when the settings say so);
        what went wrong, if it failed (the answer is good all the same)."""
        if not (self.cache is not None and answering.standalone and self.settings.cache_answers and answer
                and finish_reason == "stop"):
            return ()
        try:
            self.cache.put(answering.question, answer, model=self.engine.name, store_version=self.store_version)
        except Exception as error:  # noqa: BLE001 - a full disk or a locked database must not fail the answer
            log.warning("the answer to %r was not written to the QA cache: %s: %s", answering.question[:80],
                        type(error).__name__, error)
            return (f"the answer was not written to the QA cache ({type(error).__name__}: {error})",)
        return ()

    # ---- a group sharing one document: PiD ----------------------------------------------

    def _answer_group(self, indices: list[int], requests: list[Request]) -> Iterator[Chunk]:
        """Answer requests that share all but the question in one PiD batch: the shared
        prompt prefix (system prompt, document, history) is prefilled once and every answer
        decodes in the same forwards; each row equals what answering it alone gives."""
        started = time.perf_counter()
        rows: list[tuple[int, Prompt]] = []  # (request index, its prompt)
        history: list = []
        for index, request in zip(indices, requests):
            try:
                check_limits(request)
                system, history, question = split_messages(request.messages)
                limit = self._prompt_limit(request.params.max_new_tokens)
                rows.append((index, build_prompt(
                    self.engine.template, system or self.settings.plain_system_prompt, history, question, limit,
                )))
            except RequestError as error:
                yield _error(index, str(error))
        if not rows:
            return
        first = requests[0]
        references = list(first.references) + [m["content"] for m in history]
        method = self.router.choose(first.params.method, bool(references), len(rows), BATCH_METHODS)
        first_text_at: dict[int, float] = {}
        try:
            chunks = self.engine.stream_group([prompt for _, prompt in rows], replace(first.params, method=method), references)
            for row, chunk in chunks:
                index, prompt = rows[row]
                if chunk.text and index not in first_text_at:
                    first_text_at[index] = time.perf_counter()
                if chunk.finish_reason is None:
                    if chunk.text:
                        yield Chunk(index, chunk.text)
                    continue
                seconds = time.perf_counter() - started
                info = AnswerInfo(
                    method, "off", (), seconds, ttft_s=first_text_at.get(index, time.perf_counter()) - started,
                    tokens_per_s=chunk.stats.new_tokens / seconds if seconds > 0 else 0.0, dropped_turns=prompt.dropped_turns,
                )
                yield Chunk(index, chunk.text, chunk.finish_reason, chunk.stats, info)
        except ValueError as error:  # a prompt over the model's context, a bad option
            for index, _ in rows:
                yield _error(index, str(error))

    # ---- helpers ----------------------------------------------------------------------

    def _prompt_limit(self, max_new_tokens: int) -> int:
        return min(self.settings.max_prompt_tokens, self.engine.context_length - max_new_tokens)


def _error(index: int, message: str, outcome: str = "off") -> Chunk:
    return Chunk(index, "", "error", None, AnswerInfo("none", outcome, error=message))


def question_request(question: str, method: str = AUTO, max_new_tokens: int = 256, **options) -> Request:
    """A one-question request: ``question_request("Where does the Rhine begin?")``."""
    return Request([{"role": "user", "content": question}], params=GenerationParams(max_new_tokens=max_new_tokens, method=method, options=options))
