"""The FAQ service as a pipeline, so the server and the web chat can answer from it.

``FaqService.ask`` serves a curated answer when the cache says it is safe and generates
one otherwise (with the closest FAQ answers as copyable references). Here its answer
becomes a ``Chunk``: ``info.method`` is "cache" for a served answer and "llma" for a
generated one, ``info.cache`` the lookup's outcome (exact, semantic, near, miss), and
``info.sources`` the FAQ entry served or the FAQ answers given as references.

FAQ questions stand alone: the last user message is the question, earlier turns are not
used. A generated answer comes as one chunk (``FaqService`` does not stream).
"""

from __future__ import annotations

import time
from dataclasses import fields
from typing import Iterator, Sequence

from ragdec.decoding.seam import DecodeStats
from ragdec.pipelines.prompts import RequestError, split_messages
from ragdec.pipelines.types import AnswerInfo, Chunk, Request, Source

_STATS_FIELDS = {f.name for f in fields(DecodeStats)}


class FaqPipeline:
    """Answers requests with ``service`` (a ``ragdec.cache.faq.FaqService``).

    Example::

        pipeline = FaqPipeline(FaqService(QACache.open("faq.sqlite"), model="smollm2-135m-instruct"))
        chunk, = pipeline.stream([Request([{"role": "user", "content": "How do I reset my password?"}])])
        chunk.info.method, chunk.info.cache      # ("cache", "semantic") when an FAQ answer was safe
    """

    def __init__(self, service):
        self.service = service

    @property
    def model_name(self) -> str:
        return self.service.model

    def stream(self, requests: Sequence[Request]) -> Iterator[Chunk]:
        for index, request in enumerate(requests):
            yield self._answer(index, request)

    def _answer(self, index: int, request: Request) -> Chunk:
        started = time.perf_counter()
        try:
            _, _, question = split_messages(request.messages)
            self.service.max_new_tokens = request.params.max_new_tokens
            answer = self.service.ask(question)
        except (RequestError, ValueError) as error:
            return Chunk(index, "", "error", None, AnswerInfo("none", "off", error=str(error)))
        seconds = time.perf_counter() - started
        lookup = answer.lookup
        if answer.generated:
            sources = tuple(Source(i, 0, "similar FAQ answer", text, lookup.score) for i, text in enumerate(lookup.references, 1))
        else:
            sources = (Source(1, lookup.entry_id or 0, lookup.matched_question or "", answer.text, lookup.score),)
        stats = DecodeStats(**{k: v for k, v in answer.stats.items() if k in _STATS_FIELDS}) if answer.stats else None
        info = AnswerInfo(
            "llma" if answer.generated else "cache", lookup.outcome, sources, seconds, ttft_s=seconds,
            tokens_per_s=stats.new_tokens / seconds if stats and seconds > 0 else 0.0,
        )
        return Chunk(index, answer.text, answer.finish_reason or "stop", stats, info)
