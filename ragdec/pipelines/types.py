"""What goes into a pipeline and what comes out: Request in, Chunks out.

Every app (the command line, the server, the LangChain classes) speaks only these types,
so a remote pipeline can stand in for the local one without changing them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Iterator, Mapping, Protocol, Sequence

from ragdec.decoding.methods import GenerationParams
from ragdec.decoding.seam import DecodeStats

Message = Mapping[str, str]  # OpenAI-style: {"role": "system" | "user" | "assistant", "content": "..."}

AUTO = "auto"  # the method name that lets the router choose


@dataclass(frozen=True)
class Request:
    messages: Sequence[Message]  # OpenAI-style chat messages, history included; the last is the user's
    references: Sequence[str] = ()  # copyable text given by the caller (a document, earlier answers)
    params: GenerationParams = field(default_factory=lambda: GenerationParams(method=AUTO))


@dataclass(frozen=True)
class Source:
    """A passage an answer was given, numbered as in the prompt so answers can cite [n]."""

    number: int  # [n] in the prompt
    id: int  # the passage's id in the store
    title: str
    text: str
    score: float  # the retriever's score (cosine, or fused rank score in hybrid search)

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Chunk:
    index: int  # which request (OpenAI choices[].index)
    text: str  # new text since the previous chunk of this request
    finish_reason: str | None = None  # "stop" | "length" | "error" on a request's last chunk
    stats: DecodeStats | None = None  # on the last chunk, when the model decoded
    info: "AnswerInfo | None" = None  # on the last chunk: method, cache outcome, sources, timings


@dataclass(frozen=True)
class AnswerInfo:
    """What the last chunk of a request tells besides the decoder's stats."""

    method: str  # the decoding method that ran ("cache" when the cache answered)
    cache: str  # "exact" | "semantic" | "near" | "miss" | "off"
    sources: tuple[Source, ...] = ()  # the passages in the prompt
    seconds: float = 0.0  # request in to last chunk out, retrieval and cache included
    ttft_s: float = 0.0  # request in to first text out
    retrieval_s: float = 0.0
    tokens_per_s: float = 0.0  # new tokens per second of the whole request
    dropped_turns: int = 0  # oldest history messages left out to fit the context
    error: str = ""  # set with finish_reason "error": what went wrong and what to do
    engine_failed: bool = False  # with error: the engine failed (a remote server unreachable, erring, cut off), not the request
    warnings: tuple[str, ...] = ()  # what failed around a finished answer (its cache write), logged too

    def as_dict(self) -> dict:
        out = asdict(self)
        out["sources"] = [s.as_dict() for s in self.sources]
        return out


class Pipeline(Protocol):
    def stream(self, requests: Sequence[Request]) -> Iterator[Chunk]:
        """Answer ``requests``, yielding chunks of each as they come (by ``Chunk.index``)."""
        ...


def collect(pipeline: Pipeline, requests: Sequence[Request]) -> list[Chunk]:
    """Run ``requests`` to the end; per request, in order, one ``Chunk`` that joins all of
    its chunks: the whole text, with the last chunk's finish reason, stats and info (a
    stream that ended without a last chunk gives finish reason "error" and no info).

    Example: chunks (0, "Par"), (1, "Ber"), (0, "is", "stop"), (1, "lin", "stop") ->
    [Chunk(0, "Paris", "stop", ...), Chunk(1, "Berlin", "stop", ...)].
    """
    texts: dict[int, list[str]] = {i: [] for i in range(len(requests))}
    last: dict[int, Chunk] = {}
    for chunk in pipeline.stream(requests):
        texts[chunk.index].append(chunk.text)
        if chunk.finish_reason is not None:
            last[chunk.index] = chunk
    answers = []
    for i in range(len(requests)):
        end = last.get(i)
        if end is None:
            answers.append(Chunk(i, "".join(texts[i]), "error"))
        else:
            answers.append(Chunk(i, "".join(texts[i]), end.finish_reason, end.stats, end.info))
    return answers
